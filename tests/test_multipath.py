"""K paths of a supernet in one pass (``forward_paths``) against the loop of single paths.

Logits and every gradient (input and all parameters) must equal those of
``torch.stack([model(x, a) for a in archs])``: float64 to 1e-9 relative (the exactness check,
on the reference and the compiled backend), float32 to 1e-3 of each tensor's largest magnitude
(a smoke test of the float32 kernels: train-mode BN over 2 images and the PReLU slopes' sums
with cancellation amplify rounding). The float32 cases use fixed seeds: at these sizes some
inputs sit on a ReLU kink, where a 1e-6 relative perturbation of the input moves some
gradients by 5% even in float64, so a float32 run then differs from the loop by that much
whichever kernel it uses. Also the
batched conv backward (one multi_conv2d for the input gradient, one multi_conv2d_weight_grad
for the weight gradient) against aten's convolution backward per candidate.
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch

from fastsupernet import ops
from fastsupernet.multipath import build_plan, forward_paths, model_tensors, run_plan
from fastsupernet.ops.conv import BACKWARD_ENV_VAR, conv_backward
from fastsupernet.space import ChannelSpace, StageSpec, Track1Space
from fastsupernet.supernet import Supernet, SupernetConfig

HAS_CPP = "cpp" in ops.available_backends("cpu", "multi_conv2d")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="compiled extension not built")

TRACK1 = Track1Space()
# a small space with Fashion-MNIST-like input (1 channel, 10 classes): odd sizes after stride 2
SMALL = ChannelSpace((2, 4), [StageSpec(1, 1, (2, 4)), StageSpec(2, 2, (2, 4, 6, 8))], trailing_choices=[(1, 2)])

CONFIGS = {
    "plain": SupernetConfig(),
    "enhanced-branches": SupernetConfig.enhanced((2, 4, 4), classifier_branches=2),
    "projection": SupernetConfig(shortcut="projection"),
    "prelu-projection": SupernetConfig(residual_activation="prelu", shortcut="projection", branches=(1, 2, 3)),
}


def make_model(config: SupernetConfig, dtype: torch.dtype, space=TRACK1, in_channels=3, num_classes=7) -> Supernet:
    torch.manual_seed(0)
    m = Supernet(space, config, in_channels=in_channels, num_classes=num_classes).to(dtype)
    with torch.no_grad():  # BN and PReLU away from their defaults, so that they matter
        for layer in m.conv_layers():
            layer.bn_weight.uniform_(0.5, 1.5)
            layer.bn_bias.uniform_(-0.3, 0.3)
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.5, 2.0)
        for name, p in m.named_parameters():
            if name.endswith("prelu"):
                p.uniform_(0.05, 0.5)
    return m


def archs_for(space, k: int, seed: int, duplicate: bool = False) -> list:
    archs = [space.largest()] + space.sample_many(k - 1, seed=seed) if k > 1 else [space.sample(seed)]
    if k > 2:
        archs[-1] = space.smallest()
    if duplicate:
        archs.append(archs[1 % len(archs)])
    return archs


def loop_vs_batched(model, x, archs, backend, train):
    """(logits, grads) of the loop and of forward_paths, on the same random linear loss."""
    model.train(train)
    params = [p for _, p in model.named_parameters()]
    xs = x.detach().clone().requires_grad_()
    ref = torch.stack([model(xs, a) for a in archs])
    weights = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(5))
    ref_grads = torch.autograd.grad((ref * weights).sum(), [xs] + params, allow_unused=True)
    xb = x.detach().clone().requires_grad_()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    out = model.forward_paths(xb, archs, backend=backend)
    for k, v in model.named_buffers():  # forward_paths never updates BN running statistics
        assert torch.equal(v, buffers[k]), k
    grads = torch.autograd.grad((out * weights).sum(), [xb] + params, allow_unused=True)
    return ref, out, ref_grads, grads


def assert_grads_close(ref_grads, grads, names, tol):
    for name, a, b in zip(["x"] + names, grads, ref_grads):
        if b is None:  # a parameter no path uses
            assert a is None or a.abs().max() == 0, name
            continue
        assert a is not None, name
        scale = b.abs().max().clamp_min(1e-30)
        err = (a - b).abs().max() / scale
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


CASES = [
    # (config, dtype, backend, K, duplicate)
    ("plain", torch.float64, "reference", 1, False),
    ("plain", torch.float64, "reference", 5, True),
    ("enhanced-branches", torch.float64, "reference", 6, True),
    ("projection", torch.float64, "reference", 4, False),
    ("prelu-projection", torch.float64, "reference", 4, True),
    ("plain", torch.float64, "cpp", 4, True),
    ("enhanced-branches", torch.float64, "cpp", 5, False),
    ("prelu-projection", torch.float64, "cpp", 3, False),
    ("plain", torch.float32, "cpp", 1, False),
    ("enhanced-branches", torch.float32, "cpp", 6, True),
    ("projection", torch.float32, "cpp", 5, True),
    ("prelu-projection", torch.float32, "cpp", 4, False),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config, dtype, backend, k, duplicate", CASES)
def test_forward_paths_matches_loop(config, dtype, backend, k, duplicate, train):
    if backend == "cpp" and not HAS_CPP:
        pytest.skip("compiled extension not built")
    model = make_model(CONFIGS[config], dtype)
    seed = zlib.crc32(repr((config, k, duplicate)).encode()) % 1000  # the same in every process
    archs = archs_for(TRACK1, k, seed, duplicate)
    x = torch.randn(2, 3, 12, 12, dtype=dtype, generator=torch.Generator().manual_seed(seed)).to(dtype)
    ref, out, ref_grads, grads = loop_vs_batched(model, x, archs, backend, train)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert out.shape == (len(archs), 2, model.num_classes)
    assert ((out - ref).abs().max() / ref.abs().max()) <= tol
    assert_grads_close(ref_grads, grads, [n for n, _ in model.named_parameters()], tol)


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if HAS_CPP else []))
def test_other_space_channels_classes_resolution(backend):
    """One input channel, 10 classes, 14x14 images (7x7 and 4x4 after the strides)."""
    dtype = torch.float64
    model = make_model(SupernetConfig.enhanced((2, 3)), dtype, space=SMALL, in_channels=1, num_classes=10)
    archs = archs_for(SMALL, 4, 3, duplicate=True)
    x = torch.randn(3, 1, 14, 14, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        ref, out, ref_grads, grads = loop_vs_batched(model, x, archs, backend, train)
        assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-9
        assert_grads_close(ref_grads, grads, [n for n, _ in model.named_parameters()], 1e-9)


def test_plan_and_runner_are_usable_alone():
    """build_plan + run_plan on the model's tensors is forward_paths; the plan lays paths out in order."""
    model = make_model(SupernetConfig.enhanced(), torch.float64).eval()
    archs = archs_for(TRACK1, 3, 11)
    plan = build_plan(model, archs)
    assert plan.num_paths == 3 and len(plan.blocks) == 9
    widths = [model.run_widths(a) for a in archs]
    assert plan.stem.in_offsets == (0, 0, 0) and plan.stem.out_widths == tuple(w[0] for w in widths)
    conv1 = plan.blocks[0].conv1
    assert conv1.in_offsets == (0, widths[0][0], widths[0][0] + widths[1][0])
    assert plan.feature_widths == tuple(w[-1] for w in widths)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    a = run_plan(plan, x, model_tensors(model), training=False, backend="reference")
    b = forward_paths(model, x, archs, backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_paths_errors():
    model = make_model(SupernetConfig(), torch.float32)
    with pytest.raises(ValueError, match="at least one architecture"):
        model.forward_paths(torch.randn(1, 3, 8, 8), [])
    with pytest.raises(ValueError, match="expects"):
        model.forward_paths(torch.randn(1, 1, 8, 8), [TRACK1.largest()])
    with pytest.raises(ValueError, match="has 3 values"):
        model.forward_paths(torch.randn(1, 3, 8, 8), ["16-16-16"])


# --------------------------------------------------------------------------- batched conv backward
def conv_case(seed: int, dtype=torch.float64):
    rng = random.Random(seed)
    k = rng.randint(1, 5)
    kernel = rng.choice([1, 3])
    stride = rng.choice([1, 2])
    padding = kernel // 2 if rng.random() < 0.8 else rng.randint(0, kernel - 1)
    h, w, n = rng.randint(3, 11), rng.randint(3, 11), rng.randint(1, 5)
    in_w = [rng.randint(1, 7) for _ in range(k)]
    out_w = [rng.randint(1, 9) for _ in range(k)]
    shared = rng.random() < 0.3
    in_off = [0] * k if shared else [sum(in_w[:i]) for i in range(k)]
    if not shared and rng.random() < 0.3:  # a gap: channels nobody reads
        in_off = [o + 1 for o in in_off]
    cin = max(in_w) if shared else in_off[-1] + in_w[-1] + 1
    rows = sum(out_w) + 3
    row_off = [rng.randint(0, rows - o) for o in out_w]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g, dtype=dtype)
    if rng.random() < 0.3:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(rows, max(in_w) + 1, kernel, kernel, generator=g, dtype=dtype)
    ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    grad = torch.randn(n, sum(out_w), ho, wo, generator=g, dtype=dtype)
    return x, weight, grad, (in_off, in_w, out_w, row_off), stride, padding


@needs_cpp
@pytest.mark.parametrize("dtype, cpu_kernel", [(torch.float64, ""), (torch.float32, ""), (torch.float32, "avx2"),
                                               (torch.float32, "generic")])
def test_batched_conv_backward_matches_aten_loop(monkeypatch, dtype, cpu_kernel):
    """The CPU's own kernels (AVX-512 where it has it), AVX2 and the portable ones
    (FASTSUPERNET_CPU_KERNEL=avx2 / generic)."""
    if cpu_kernel:
        monkeypatch.setenv("FASTSUPERNET_CPU_KERNEL", cpu_kernel)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for seed in range(25):
        x, weight, grad, meta, stride, padding = conv_case(seed, dtype)
        args = (grad, x, weight, None, meta, stride, padding, None, None, None, "none", None, (True, True) + (False,) * 4)
        monkeypatch.setenv(BACKWARD_ENV_VAR, "loop")
        gx_loop, gw_loop = conv_backward(*args)[:2]
        monkeypatch.setenv(BACKWARD_ENV_VAR, "batched")
        gx, gw = conv_backward(*args)[:2]
        assert gx.shape == x.shape and gw.shape == weight.shape
        for a, b in ((gx, gx_loop), (gw, gw_loop)):
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            assert err <= tol, (seed, err)
        read = torch.zeros_like(weight, dtype=torch.bool)
        for iw, ow, ro in zip(meta[1], meta[2], meta[3]):
            read[ro : ro + ow, :iw] = True
        assert gw[~read].abs().sum() == 0


def test_backward_mode_env(monkeypatch):
    from fastsupernet.ops.conv import backward_mode

    monkeypatch.delenv(BACKWARD_ENV_VAR, raising=False)
    assert backward_mode(torch.device("cpu")) == "batched"
    assert backward_mode(torch.device("cuda")) == "loop"
    monkeypatch.setenv(BACKWARD_ENV_VAR, "loop")
    assert backward_mode(torch.device("cpu")) == "loop"
    monkeypatch.setenv(BACKWARD_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=BACKWARD_ENV_VAR):
        backward_mode(torch.device("cpu"))


@needs_cpp
def test_weight_grad_op_checks():
    x, weight, grad, meta, stride, padding = conv_case(3, torch.float32)
    op = torch.ops.fastsupernet.multi_conv2d_weight_grad.default
    torch.library.opcheck(op, (grad, x, weight, *meta, stride, padding), test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        op(grad[:, 1:], x, weight, *meta, stride, padding)
    with pytest.raises(ValueError, match="out of range"):
        op(grad, x, weight, meta[0], meta[1], meta[2], [weight.shape[0]] * len(meta[2]), stride, padding)
    with pytest.raises(TypeError, match="share a dtype"):
        op(grad.double(), x, weight, *meta, stride, padding)
