"""The ranking engines: protocol semantics, fast vs reference agreement, grouping, configs.

Agreement runs on the briefly trained mini checkpoint (bundled Fashion-MNIST, 28x28, 10
classes) with small protocols so the file fits the CI budget; ``slow`` versions use more
images.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupernet import Supernet, SupernetConfig, Track1Space, load_checkpoint, load_data
from fastsupernet.data import normalize
from fastsupernet.metrics import kendall_tau
from fastsupernet.ranking.engines import (
    ENGINES,
    PRECISIONS,
    FastEngine,
    Protocol,
    RankData,
    ReferenceEngine,
    make_engine,
    prefix_sharing,
    prepare_data,
)
from fastsupernet.ranking.tree import build_plan, candidate_macs, layer_modules, network_macs, plan_macs, spatial_sizes

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fmnist():
    return load_data("fashion-mnist")


@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    return load_checkpoint(trained_checkpoint).build_supernet()


def _archs(n: int, seed: int) -> list:
    space = Track1Space()
    return [space.largest(), space.smallest()] + space.sample_many(n - 2, seed=seed)


def _scores(engine, archs) -> list:
    out = list(engine.score(archs))
    assert sorted(c.index for c in out) == list(range(len(archs)))
    return sorted(out, key=lambda c: c.index)


# ----------------------------------------------------------------------------- protocol and data
@pytest.mark.parametrize("kw, word", [
    (dict(recal_fraction=0.0), "recal_fraction"),
    (dict(recal_fraction=1.5), "recal_fraction"),
    (dict(recal_images=0), "recal_images"),
    (dict(recal_batch=0), "recal_batch"),
    (dict(eval_images=-1), "eval_images"),
    (dict(recal_seed=1.5), "recal_seed"),
    (dict(recal_batch=True), "recal_batch"),
])
def test_protocol_rejects_bad_values(kw, word):
    with pytest.raises(ValueError, match=word):
        Protocol(**kw)


def test_protocol_to_dict_is_plain():
    d = Protocol(recal_images=5, eval_images=7).to_dict()
    assert d == {"recal_fraction": 0.1, "recal_seed": 0, "recal_images": 5, "recal_batch": 128, "eval_images": 7}


def test_prepare_data_selects_split_prefix_in_order(fmnist):
    proto = Protocol(recal_fraction=0.05, recal_seed=3, recal_images=40, recal_batch=16, eval_images=30)
    rd = prepare_data(fmnist, proto)
    rx, _ = fmnist.recalibration_split(0.05, 3)
    assert torch.equal(rd.recal_x, normalize(rx[:40], fmnist.info))
    assert torch.equal(rd.eval_x, normalize(fmnist.test_images[:30], fmnist.info))
    assert torch.equal(rd.eval_y, fmnist.test_labels[:30])
    assert rd.recal_batch == 16 and rd.recal_x.dtype == torch.float32


def test_prepare_data_too_many_images_names_counts(fmnist):
    with pytest.raises(ValueError, match=r"recal_images=5000 exceeds the 1200 images"):
        prepare_data(fmnist, Protocol(recal_images=5000))
    with pytest.raises(ValueError, match=r"eval_images=99999 exceeds the 2000 test images"):
        prepare_data(fmnist, Protocol(eval_images=99999))


def test_make_engine_rejects_bad_names(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=8, eval_images=8))
    with pytest.raises(ValueError, match="engine must be one of"):
        make_engine("fastest", trained, rd)
    with pytest.raises(ValueError, match="precision must be one of"):
        make_engine("fast", trained, rd, precision="fp16")
    for name in ENGINES:
        with pytest.raises(ValueError, match="bf16.*needs a CUDA device"):
            make_engine(name, trained, rd, precision="bf16")
    assert set(PRECISIONS) == {"fp32", "tf32", "bf16"}


def test_invalid_candidate_is_named(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=8, eval_images=8))
    good = str(Track1Space().largest())
    for name in ENGINES:
        with pytest.raises(ValueError, match=r"candidate 1: .*position 1 value 5"):
            list(make_engine(name, trained, rd).score([good, "5" + good[2:]]))


# ----------------------------------------------------------------------------- protocol semantics
def _hand_loop_logits(model: Supernet, arch, rd: RankData, images: torch.Tensor) -> torch.Tensor:
    """The protocol written out with torch.nn on the exported static network."""
    net = model.export(arch)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        for s in range(0, rd.recal_x.shape[0], rd.recal_batch):
            net(rd.recal_x[s : s + rd.recal_batch])
        net.eval()
        return net(images)


def test_reference_engine_is_the_protocol_with_a_short_last_batch(trained, fmnist):
    # 100 images in batches of 32: the last batch has 4 images and weighs as much as the others
    rd = prepare_data(fmnist, Protocol(recal_images=100, recal_batch=32, eval_images=64))
    arch = Track1Space().sample(7)
    ref = make_engine("reference", trained, rd)
    want = _hand_loop_logits(trained, arch, rd, rd.eval_x)
    got = ref._logits(arch, rd.eval_x)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # the last batch counts: dropping it changes the statistics, hence the logits
    rd_drop = RankData(rd.recal_x[:96], rd.eval_x, rd.eval_y, 32)
    assert not torch.allclose(_hand_loop_logits(trained, arch, rd_drop, rd.eval_x), want, rtol=RTOL, atol=ATOL)
    (score,) = list(ref.score([arch]))
    assert score.acc == pytest.approx((want.argmax(1) == rd.eval_y).double().mean().item())
    assert score.loss == pytest.approx(F.cross_entropy(want, rd.eval_y).item(), rel=1e-5)


def test_reference_engine_restores_model_state(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=32, recal_batch=16, eval_images=16))
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    momenta = [m.momentum for m in trained.conv_layers()]
    trained.train()
    list(make_engine("reference", trained, rd).score(_archs(3, 0)))
    assert trained.training
    assert [m.momentum for m in trained.conv_layers()] == momenta
    for k, v in trained.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- fast vs reference
def test_fast_matches_reference_logits_and_predictions(trained, fmnist):
    """Per candidate: logits allclose on every image, at most 2 of 1,024 predictions differ."""
    rd = prepare_data(fmnist, Protocol(recal_images=48, recal_batch=32, eval_images=1024))
    archs = Track1Space().sample_many(2, seed=11)
    fast, ref = make_engine("fast", trained, rd), make_engine("reference", trained, rd)
    got = fast._logits(archs, rd.eval_x)
    for k, a in enumerate(archs):
        want = ref._logits(a, rd.eval_x)
        torch.testing.assert_close(got[k], want, rtol=RTOL, atol=ATOL)
        assert int((got[k].argmax(1) != want.argmax(1)).sum()) <= 2


def _tau_check(trained, rd, n):
    archs = _archs(n, seed=5)
    f = _scores(make_engine("fast", trained, rd), archs)
    r = _scores(make_engine("reference", trained, rd), archs)
    assert len({c.acc for c in r}) > 5  # the ranking is not degenerate
    assert kendall_tau([c.acc for c in f], [c.acc for c in r]) >= 0.99
    assert kendall_tau([c.loss for c in f], [c.loss for c in r]) >= 0.99
    for a, b in zip(f, r):
        assert abs(a.acc - b.acc) <= 2 / rd.eval_x.shape[0]
        assert a.loss == pytest.approx(b.loss, rel=1e-4)


def test_fast_vs_reference_kendall_tau_100_candidates(trained, fmnist):
    _tau_check(trained, prepare_data(fmnist, Protocol(recal_images=16, recal_batch=16, eval_images=64)), 100)


@pytest.mark.slow
def test_fast_vs_reference_kendall_tau_100_candidates_full(trained, fmnist):
    _tau_check(trained, prepare_data(fmnist, Protocol(recal_images=512, recal_batch=128, eval_images=1024)), 100)


# ----------------------------------------------------------------------------- independence, memory
def test_candidate_result_independent_of_the_others(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=48, recal_batch=16, eval_images=32))
    archs = _archs(12, seed=2)
    fast = make_engine("fast", trained, rd)
    together = fast._logits(archs, rd.eval_x)
    for k in (0, 5, 11):
        alone = fast._logits([archs[k]], rd.eval_x)[0]
        assert torch.equal(alone, together[k])


def test_memory_limit_splits_into_groups_with_identical_results(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=40, recal_batch=16, eval_images=24))
    archs = _archs(10, seed=4)
    big = make_engine("fast", trained, rd, memory_limit_bytes=1 << 30)
    one = _scores(big, archs)
    assert big.stats.groups == 1
    # room for a bit more than one network per group
    single = big._bytes_per_image([r for r in trained.run_widths(archs[0])]) * rd.recal_batch
    small = make_engine("fast", trained, rd, memory_limit_bytes=int(single * 1.6))
    many = _scores(small, archs)
    assert small.stats.groups >= 4
    assert [(c.acc, c.loss) for c in one] == [(c.acc, c.loss) for c in many]
    with pytest.raises(ValueError, match="memory_limit_bytes=1000 is too small"):
        list(make_engine("fast", trained, rd, memory_limit_bytes=1000).score(archs))


def test_candidate_groups_are_the_order_score_yields(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=16, recal_batch=16, eval_images=16))
    archs = _archs(10, seed=5)
    archs.append(archs[3])  # a duplicate is in its twin's group
    single = make_engine("fast", trained, rd)._bytes_per_image(trained.run_widths(archs[0])) * rd.recal_batch
    fast = make_engine("fast", trained, rd, memory_limit_bytes=int(single * 1.6))
    groups = fast.candidate_groups(archs)
    assert len(groups) >= 4 and sorted(i for g in groups for i in g) == list(range(len(archs)))
    yielded = [s.index for s in fast.score(archs)]
    assert [set(g) for g in groups] == [set(yielded[a:a + len(g)]) for a, g in
                                        zip([sum(map(len, groups[:k])) for k in range(len(groups))], groups)]


def test_group_working_memory_does_not_grow_with_candidates(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=16, recal_batch=16, eval_images=16))
    fast = make_engine("fast", trained, rd, memory_limit_bytes=64 << 20)
    nets = sorted({a.widths for a in Track1Space().sample_many(3000, seed=0)})
    groups = fast._groups(nets)
    assert len(groups) > 1 and sum(map(len, groups)) == len(nets)
    for g in groups:
        plan = build_plan(trained, [nets[j] for j in g])
        need = fast._bytes_per_image([lv.channels for lv in plan.levels]) * rd.recal_batch
        assert need <= 64 << 20


def test_duplicates_scored_once_reported_for_each(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=16, recal_batch=16, eval_images=32))
    a = Track1Space().sample(1)
    twin = Track1Space().parse(list(a.widths) + [4 if a.values[-1] != 4 else 8])  # same network, other 20th value
    archs = [a, str(Track1Space().largest()), twin, a]
    fast = make_engine("fast", trained, rd)
    s = _scores(fast, archs)
    assert fast.stats.candidates == 4 and fast.stats.networks == 2
    assert s[0].acc == s[2].acc == s[3].acc and s[0].loss == s[2].loss == s[3].loss
    assert list(fast.score([])) == []


# ----------------------------------------------------------------------------- other supernet options
def _random_bn(model: Supernet, seed: int) -> Supernet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.conv_layers():
            m.bn_weight.copy_(0.5 + torch.rand(m.bn_weight.shape, generator=g))
            m.bn_bias.copy_(0.2 * torch.randn(m.bn_bias.shape, generator=g))
    return model


@pytest.mark.parametrize("config", [
    SupernetConfig.enhanced(branches=(1, 2, 4), classifier_branches=2),
    SupernetConfig(branches=(2, 2, 2), shortcut="projection"),
    SupernetConfig(branches=(1, 1, 1), shortcut="projection", residual_activation="prelu", width_map=((4, 5),)),
], ids=["enhanced", "projection", "projection-prelu-map"])
@pytest.mark.parametrize("route", ["kernel", "class"])
def test_fast_matches_reference_on_supernet_options(fmnist, config, route):
    torch.manual_seed(0)
    model = _random_bn(Supernet(Track1Space(), config, in_channels=1, num_classes=10), 1)
    for blocks in model.stages:
        for i, blk in enumerate(blocks):
            if hasattr(blk, "prelu"):
                blk.prelu.data.fill_(0.1 + 0.1 * i)
    rd = prepare_data(fmnist, Protocol(recal_images=40, recal_batch=16, eval_images=32))
    space = Track1Space()
    rng = random.Random(3)
    archs = _archs(5, seed=8)
    # blocks that keep their width (identity shortcut under "projection") next to ones that change it
    for _ in range(3):
        v = list(space.sample(rng).values)
        v[2] = v[0]
        v[4] = v[2]
        v[10] = v[8]
        archs.append(space.parse(v))
    fast = FastEngine(model, rd, conv_route=route, class_chunk=2)
    ref = make_engine("reference", model, rd)
    got = fast._logits(archs, rd.eval_x)
    for k, a in enumerate(archs):
        torch.testing.assert_close(got[k], ref._logits(a, rd.eval_x), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- prefix sharing
def test_prefix_sharing_bookkeeping():
    model = Supernet()
    space = model.space
    a = space.sample(0)
    v = list(a.values)
    k = 7
    v[k] = next(c for c in space.choices[k] if c != v[k])
    b = space.parse(v)
    mods, sizes = layer_modules(model), spatial_sizes(model, 32)
    from fastsupernet.ranking.tree import _node_macs

    run, run_b = model.run_widths(a), model.run_widths(b)
    head = sum(_node_macs(model, mods, sizes, run, d, 3) for d in range(k))
    # position k (a conv1, one branch group): the two siblings are one unit at the wider width
    narrower = min(_node_macs(model, mods, sizes, r, k, 3) for r in (run, run_b))
    total, shared = prefix_sharing(model, [a, b])
    assert total == candidate_macs(model, a) + candidate_macs(model, b)
    assert shared == total - head - narrower
    assert prefix_sharing(model, [a, a, a]) == (3 * candidate_macs(model, a), candidate_macs(model, a))
    assert prefix_sharing(model, []) == (0, 0)
    # conv1 of the first block at 32x32: widths stem -> position 1, 3x3
    assert _node_macs(model, mods, sizes, run, 1, 3) == run[0] * run[1] * 9 * 32 * 32


@pytest.mark.parametrize("config", [SupernetConfig(), SupernetConfig.enhanced(branches=(1, 2, 4))],
                         ids=["one-group", "enhanced"])
def test_plan_levels_pack_each_unit_once(config):
    """A unit per parent node, branch group and shortcut kind, as wide as its widest node."""
    model = Supernet(config=config)
    remap = model.config.remap
    space = Track1Space()
    nets = sorted({a.widths for a in space.sample_many(60, seed=1)})
    # and families of siblings: networks equal but for one position, every choice there
    for k in (0, 3, 4, 9, 14):
        base = list(space.sample(k).values)
        nets += [space.parse(base[:k] + [c] + base[k + 1:]).widths for c in space.choices[k]]
    nets = sorted(set(nets))
    plan = build_plan(model, nets)
    mods = layer_modules(model)
    for d, lv in enumerate(plan.levels):
        conv, sc = mods[d]
        units: dict = {}
        for n in nets:
            run = tuple(remap(w) for w in n)
            kind = model.uses_shortcut_conv(sc.layer, run) if sc is not None else None
            key = (n[:d], conv.groups.offset_of(n[d]), kind)
            units[key] = max(units.get(key, 0), run[d])
        assert len(lv.run) == len(units) and lv.channels == sum(units.values())
        assert sorted(lv.run) == sorted(units.values())
    assert len(plan.leaf_of) == len(nets)
    # every network's leaf: a unit at least as wide as the network's last width
    last = plan.levels[-1]
    assert all(last.run[u] >= w == remap(n[-1]) for u, w, n in zip(plan.leaf_of, plan.leaf_width, nets))
    total, shared = network_macs(model, nets)
    assert shared == plan_macs(model, plan) < total


def test_nested_siblings_match_reference_and_do_not_depend_on_each_other(trained, fmnist):
    """Siblings at a conv1, a conv2 whose widths mix identity and conv shortcuts, and the stem."""
    rd = prepare_data(fmnist, Protocol(recal_images=40, recal_batch=16, eval_images=48))
    space = Track1Space()
    base = list(space.sample(21).values)
    archs = []
    for k in (0, 5, 6):
        for c in space.choices[k]:
            v = list(base)
            v[k] = c
            archs.append(space.parse(v))
    archs = list({a.widths: a for a in archs}.values())
    fast, ref = make_engine("fast", trained, rd), make_engine("reference", trained, rd)
    together = fast._logits(archs, rd.eval_x)
    plan = build_plan(trained, sorted(a.widths for a in archs))
    assert any(len(lv.run) < len({n[: d + 1] for n in plan.networks}) for d, lv in enumerate(plan.levels))
    for k in (0, 3, len(archs) - 1):
        torch.testing.assert_close(together[k], ref._logits(archs[k], rd.eval_x), rtol=RTOL, atol=ATOL)
        assert torch.equal(fast._logits([archs[k]], rd.eval_x)[0], together[k])


def test_fast_engine_is_a_fast_engine(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=8, eval_images=8))
    assert isinstance(make_engine("fast", trained, rd), FastEngine)
    assert isinstance(make_engine("reference", trained, rd), ReferenceEngine)


# ----------------------------------------------------------------------------- GPU paths, run on CPU
def _interpreted_triton():
    if torch.cuda.is_available():
        pytest.skip("CPU-interpreter check; the GPU paths are checked by benchmarks/gpu_rank.py")
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["plain-relu", "affine-residual-prelu", "residual-none"])
@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (2, 8, 4, 5), (2, 68, 5, 7)], ids=lambda s: "x".join(map(str, s)))
def test_bn_act_kernel_matches_float64(layout, case, shape):
    """Odd sizes (one element at a time), rows of 4k elements (vectors), several tiles per row."""
    _interpreted_triton()
    from fastsupernet.ranking.triton_bn import bn_act

    g = torch.Generator().manual_seed(0)
    y = torch.randn(*shape, generator=g)
    r = torch.randn(*shape, generator=g)
    c = shape[1]
    if layout == "channels_last":
        y, r = y.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    s, t, rs, rt = (torch.randn(c, generator=g) for _ in range(4))
    slope = torch.tensor([0.3])
    want = y.double() * s.double().view(1, -1, 1, 1) + t.double().view(1, -1, 1, 1)
    kw = {}
    if case == "plain-relu":
        want, act = want.clamp_min(0), "relu"
    elif case == "affine-residual-prelu":
        want = want + r.double() * rs.double().view(1, -1, 1, 1) + rt.double().view(1, -1, 1, 1)
        want, act = torch.where(want > 0, want, 0.3 * want), "prelu"
        kw = dict(residual=r, r_scale=rs, r_shift=rt, slope=slope)
    else:
        want, act = want + r.double(), "none"
        kw = dict(residual=r.contiguous())  # other layout than y: made to match
    got = bn_act(y.clone(memory_format=torch.preserve_format), s, t, activation=act, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_fast_engine_fused_light_pass_matches(trained, fmnist):
    """The GPU recalibration pass (one Triton kernel per level) gives the CPU path's numbers."""
    _interpreted_triton()
    rd = prepare_data(fmnist, Protocol(recal_images=8, recal_batch=8, eval_images=8))
    archs = [Track1Space().smallest(), Track1Space().sample(2)]
    plain = make_engine("fast", trained, rd)
    fused = make_engine("fast", trained, rd)
    fused._fused_light = True
    torch.testing.assert_close(fused._logits(archs, rd.eval_x), plain._logits(archs, rd.eval_x), rtol=RTOL, atol=ATOL)


def test_class_route_with_the_fused_light_pass_matches(trained, fmnist):
    """The class route as it runs on CUDA: its BN passes (eval, and shortcut convs without an
    activation) through the Triton bn_act kernel."""
    _interpreted_triton()
    rd = prepare_data(fmnist, Protocol(recal_images=8, recal_batch=8, eval_images=8))
    archs = [Track1Space().smallest(), Track1Space().sample(2), Track1Space().sample(3)]
    plain = make_engine("fast", trained, rd)
    fused = make_engine("fast", trained, rd, conv_route="class")
    fused._fused_light = True
    torch.testing.assert_close(fused._logits(archs, rd.eval_x), plain._logits(archs, rd.eval_x), rtol=RTOL, atol=ATOL)


def _emulated_triton_conv(seen: list):
    """Stands in for ``multi_conv2d_triton`` on CPU: the reference conv in float32 on the given
    dtype's values, output in x's dtype and memory format (as the Triton kernel does)."""
    from fastsupernet.ops import reference

    def conv(x, weight, io, iw, ow, ro, stride, padding, scale, shift, residual, activation, slope, stats, *,
             input_precision="ieee"):
        seen.append((x.dtype, weight.dtype, x.is_contiguous(memory_format=torch.channels_last), input_precision))
        y = reference.multi_conv2d(x.float(), weight.float(), io, iw, ow, ro, stride=stride, padding=padding,
                                   scale=scale, shift=shift, residual=None if residual is None else residual.float(),
                                   activation=activation, prelu_slope=slope)
        s, q = reference.channel_stats(reference.multi_conv2d(x.float(), weight.float(), io, iw, ow, ro,
                                                              stride=stride, padding=padding))
        fmt = torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format
        empty = torch.empty(0, dtype=torch.float64)
        out = y.to(x.dtype).contiguous(memory_format=fmt)
        return (out, s, q) if stats else (out, empty, empty)

    return conv


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_fast_engine_gpu_precision_plumbing(trained, fmnist, monkeypatch, precision):
    """The CUDA tf32/bf16 path (Triton conv, channels_last, bf16 activations and weights) with
    an emulated Triton conv on CPU: tf32 gives the fp32 numbers, bf16 the same predictions
    up to rounding."""
    pytest.importorskip("triton")
    import fastsupernet.ops.triton_conv as triton_conv

    seen: list = []
    monkeypatch.setattr(triton_conv, "multi_conv2d_triton", _emulated_triton_conv(seen))
    rd = prepare_data(fmnist, Protocol(recal_images=128, recal_batch=64, eval_images=64))
    archs = Track1Space().sample_many(3, seed=9)
    plain = make_engine("fast", trained, rd)
    gpu = make_engine("fast", trained, rd)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gpu.precision, gpu._act_dtype, gpu._triton = precision, dtype, True
    gpu._weights = {k: w.to(dtype) for k, w in gpu._weights.items()}
    got, want = gpu._logits(archs, rd.eval_x), plain._logits(archs, rd.eval_x)
    assert seen and all(s[0] == s[1] == dtype and s[2] for s in seen)
    assert all(s[3] == ("tf32" if precision == "tf32" else "ieee") for s in seen)
    if precision == "tf32":
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    else:
        assert not torch.equal(got, want)
        assert (got.argmax(-1) != want.argmax(-1)).float().mean() <= 0.1


# ----------------------------------------------------------------------------- the class route
def test_class_route_matches_reference_and_does_not_depend_on_the_others(trained, fmnist):
    """conv_route="class": one F.conv2d per chunk of a width class, padded chunks."""
    rd = prepare_data(fmnist, Protocol(recal_images=48, recal_batch=16, eval_images=64))
    space = Track1Space()
    base = list(space.sample(7).values)
    crafted = []  # the first two widths vary: every deeper level is one class of up to 16 units
    for c0 in space.choices[0]:
        for c1 in space.choices[1]:
            crafted.append(space.parse([c0, c1] + base[2:]))
    archs = _archs(6, seed=2) + crafted[:10]
    fast = FastEngine(trained, rd, conv_route="class", class_chunk=3)
    ref = make_engine("reference", trained, rd)
    together = fast._logits(archs, rd.eval_x)
    # some class ran in more than one chunk, and some chunk was padded
    sizes = [g for classes, _, _ in fast._class_plans.values() for _, _, _, g in classes]
    assert any(g > 3 for g in sizes) and any(g % 3 for g in sizes)
    for k in (0, 5, 6, 11, 15):
        torch.testing.assert_close(together[k], ref._logits(archs[k], rd.eval_x), rtol=RTOL, atol=ATOL)
        assert torch.equal(fast._logits([archs[k]], rd.eval_x)[0], together[k])
    got = _scores(make_engine("fast", trained, rd, conv_route="class"), archs)
    want = _scores(make_engine("fast", trained, rd), archs)
    for a, b in zip(got, want):
        assert abs(a.acc - b.acc) <= 1 / 64 and a.loss == pytest.approx(b.loss, rel=1e-4)


# ----------------------------------------------------------------------------- the triton route
@pytest.mark.parametrize("route", ["triton", "triton_tf32x3"])
def test_triton_route_matches_reference(monkeypatch, route):
    """conv_route="triton": every level through the Triton kernel (here its interpreter, on 4x4
    images), with channels_last weights and activations, so that the layers of Track-1 widths
    take the 4-channel vector path; agrees with the reference engine, and a network's logits do
    not depend on the others in its group. "triton_tf32x3" asks the dot for three TF32 products
    (which the interpreter computes in float32)."""
    triton_conv = pytest.importorskip("fastsupernet.ops.triton_conv")
    if not triton_conv._interpreted():
        pytest.skip("CPU tensors need Triton imported with TRITON_INTERPRET=1")
    monkeypatch.setenv(triton_conv.CONFIG_ENV_VAR, "4")  # large tiles: few interpreted programs
    chosen, precisions = [], set()
    real = triton_conv._vector_widths
    monkeypatch.setattr(triton_conv, "_vector_widths",
                        lambda *a: chosen.append((real(*a), a[2] is not None)) or chosen[-1][0])
    real_conv = triton_conv.multi_conv2d_triton
    monkeypatch.setattr(triton_conv, "multi_conv2d_triton",
                        lambda *a, **k: precisions.add(k.get("input_precision")) or real_conv(*a, **k))
    torch.manual_seed(0)
    model = _random_bn(Supernet(Track1Space(), in_channels=1, num_classes=10), 2)
    rd = prepare_data(load_data("fashion-mnist@4"), Protocol(recal_images=16, recal_batch=16, eval_images=8))
    archs = _archs(3, seed=4)
    fast = FastEngine(model, rd, conv_route=route)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in fast._weights.values())
    got = fast._logits(archs, rd.eval_x)
    ref = make_engine("reference", model, rd)
    for k, a in enumerate(archs):
        want = ref._logits(a, rd.eval_x)
        # 16 values per channel at the last stage's BN amplify float32 rounding; the compiled
        # kernel route is as far from the reference here (1.2e-5 to 1.4e-5 on logits of size 3-6)
        torch.testing.assert_close(got[k], want, rtol=RTOL, atol=2e-5 * float(want.abs().max()))
    # every call but the stem's (one input channel) reads and writes 4 channels per vector,
    # residuals (identity shortcuts copied into place, shortcut convs) included
    vector = [v["VEC_X"] == 4 for v, _ in chosen]
    with_residual = [v["VEC_X"] == 4 for v, res in chosen if res]
    assert with_residual and all(with_residual)
    assert sum(not ok for ok in vector) <= 2  # the stem, once per recalibration and evaluation batch
    assert precisions == {"tf32x3" if route == "triton_tf32x3" else "ieee"}
    assert torch.equal(fast._logits(archs[1:2], rd.eval_x)[0], got[1])


def test_triton_route_needs_the_interpreter_on_cpu(monkeypatch, fmnist):
    triton_conv = pytest.importorskip("fastsupernet.ops.triton_conv")
    monkeypatch.setattr(triton_conv, "_interpreted", lambda: False)
    rd = prepare_data(fmnist, Protocol(recal_images=8, eval_images=8))
    with pytest.raises(ValueError, match="conv_route 'triton' on CPU needs TRITON_INTERPRET=1"):
        FastEngine(Supernet(Track1Space(), in_channels=1, num_classes=10), rd, conv_route="triton")
    with pytest.raises(ValueError, match="conv_route 'triton_tf32x3' computes fp32 convolutions; precision 'tf32'"):
        FastEngine(Supernet(Track1Space(), in_channels=1, num_classes=10), rd, "tf32", conv_route="triton_tf32x3")


def test_class_route_bad_values(trained, fmnist):
    rd = prepare_data(fmnist, Protocol(recal_images=8, eval_images=8))
    with pytest.raises(ValueError, match="conv_route must be one of .*'cudnn'"):
        make_engine("fast", trained, rd, conv_route="cudnn")
    with pytest.raises(ValueError, match="conv_route 'class' is an option of the fast engine"):
        make_engine("reference", trained, rd, conv_route="class")
    with pytest.raises(ValueError, match="class_chunk must be an int >= 1, got 0"):
        FastEngine(trained, rd, conv_route="class", class_chunk=0)
