import pytest
import torch

from fastsupernet.space import ChannelSpace, StageSpec, Track1Space
from fastsupernet.supernet import BranchGroups, Supernet, SupernetConfig, split_groups

SPACE = Track1Space()


def layouts():
    """Every branch count of every stage at least once, plus mixed ones."""
    out = [((min(g, 4), min(g, 8), g), g) for g in range(1, 17)]
    out += [((3, 5, 7), 2), ((2, 8, 11), 13)]
    return out


def test_split_groups_even_earlier_take_remainder():
    assert split_groups(list(range(16)), 3) == (tuple(range(6)), tuple(range(6, 11)), tuple(range(11, 16)))
    assert split_groups([4, 8, 12, 16], 4) == ((4,), (8,), (12,), (16,))
    assert split_groups([4, 8, 12, 16], 1) == ((4, 8, 12, 16),)
    assert [len(g) for g in split_groups(list(range(8)), 3)] == [3, 3, 2]
    with pytest.raises(ValueError, match="between 1 and the number of width choices"):
        split_groups([4, 8], 3)


def test_group_rows_use_remapped_widths():
    cfg = SupernetConfig.enhanced(branches=(4, 2, 4))
    net = Supernet(SPACE, cfg, in_channels=3, num_classes=10)
    g = net.stem.groups
    assert g.rows == (5, 9, 12, 16) and g.offsets == (0, 5, 14, 26)
    assert net.stem.weight.shape == (42, 3, 3, 3)
    conv = net.stages[1][0].conv1  # stage 2, choices 4..32, G=2
    assert conv.groups.groups == ((4, 8, 12, 16), (20, 24, 28, 32))
    assert conv.groups.rows == (16, 32)
    assert conv.weight.shape == (48, 16, 3, 3)  # columns: stage 1's largest width
    assert net.stages[2][0].shortcut.weight.shape == (16 + 32 + 48 + 64, 32, 1, 1)
    # packed BN follows the conv
    assert conv.bn_weight.shape == conv.running_var.shape == (48,)
    # the group is chosen by the original width: 8 runs as 9 channels in group 1 of the stem
    assert g.offset_of(8) == 5


def test_classifier_grouped_by_input_width():
    net = Supernet(SPACE, SupernetConfig(classifier_branches=4), in_channels=3, num_classes=10)
    assert net.classifier_weight.shape == (40, 64)
    assert net.classifier_groups.offset_of(4) == 0 and net.classifier_groups.offset_of(64) == 30
    with pytest.raises(ValueError, match="branch count 17"):
        Supernet(SPACE, SupernetConfig(classifier_branches=17))


@pytest.mark.parametrize("branches, cls_g", layouts())
@pytest.mark.parametrize("enhanced", [False, True])
def test_export_matches_supernet(branches, cls_g, enhanced):
    torch.manual_seed(sum(branches) * 31 + cls_g + enhanced)
    cfg = SupernetConfig.enhanced(branches, cls_g) if enhanced else SupernetConfig(branches=branches, classifier_branches=cls_g)
    net = Supernet(SPACE, cfg, in_channels=3, num_classes=10)
    # non-trivial BN state so eval mode exercises the running statistics
    with torch.no_grad():
        for m in net.conv_layers():
            m.bn_weight.uniform_(0.5, 1.5)
            m.bn_bias.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    archs = SPACE.sample_many(3, seed=branches[2] * 7 + cls_g) + [SPACE.largest(), SPACE.smallest()]
    for arch in archs:
        x = torch.randn(3, 3, 8, 8) * 2 + 0.5
        for training in (True, False):
            net.train(training)
            static = net.export(arch)
            assert static.training == training
            y_static = static(x)
            y_super = net(x, arch)
            torch.testing.assert_close(y_super, y_static, rtol=1e-5, atol=1e-6)


def test_export_projection_shortcut_and_running_stats():
    torch.manual_seed(0)
    net = Supernet(SPACE, SupernetConfig(shortcut="projection", branches=(2, 3, 5)), in_channels=1, num_classes=10)
    arch = SPACE.parse("16-16-16-16-16-16-16-32-32-32-32-32-32-64-64-64-64-64-64-64")
    static = net.export(arch)
    # stride-1 blocks keeping their width use identity shortcuts; stage transitions project
    assert [b.shortcut_conv is None for st in static.stages for b in st] == [True, True, True, False, True, True, False, True, True]
    x = torch.randn(4, 1, 12, 12) + 1
    net.train()
    static.train()
    torch.testing.assert_close(net(x, arch), static(x), rtol=1e-5, atol=1e-6)
    # train-mode forwards updated the same running statistics in place, through the slice
    blk = net.stages[2][1].conv2
    off = blk.groups.offset_of(64)
    torch.testing.assert_close(blk.running_mean[off : off + 64], static.stages[2][1].bn2.running_mean)
    assert blk.running_mean.abs().sum() > 0
    assert int(blk.num_batches_tracked) == 1
    # the parameter count of the export is what the space predicts
    n = sum(p.numel() for p in static.parameters())
    assert n == SPACE.params(arch, in_channels=1, num_classes=10, shortcut="projection")


def test_weights_are_read_in_place_and_grads_land_in_slice():
    torch.manual_seed(1)
    net = Supernet(SPACE, SupernetConfig(branches=(1, 2, 4)), in_channels=3, num_classes=5)
    arch = SPACE.parse("8-4-12-16-8-16-16-24-12-8-16-4-32-20-52-52-20-40-8-44")
    loss = net(torch.randn(2, 3, 8, 8), arch).square().sum()
    loss.backward()
    conv = net.stages[2][0].conv1  # width 20 -> group 1 of 4 ({20..32}), rows start at 16
    g = conv.weight.grad
    assert g.shape == conv.weight.shape
    off = conv.groups.offset_of(20)
    assert off == 16
    inside = g[off : off + 20, :32]
    assert inside.abs().sum() > 0
    mask = torch.ones_like(g, dtype=torch.bool)
    mask[off : off + 20, :32] = False
    assert g[mask].abs().sum() == 0
    # the classifier reads 44 input columns of group 0
    assert net.classifier_weight.grad[:, 44:].abs().sum() == 0


def test_grow_from_shared_keeps_every_candidate():
    torch.manual_seed(2)
    base = Supernet(SPACE, SupernetConfig.enhanced((1, 1, 1), 1), in_channels=3, num_classes=10).eval()
    grown = base.grow((4, 8, 16), classifier_branches=4).eval()
    assert grown.config.branches == (4, 8, 16) and grown.config.width_map == base.config.width_map
    assert grown.stages[2][2].conv2.weight.shape[0] == sum(w if w not in (4, 8) else w + 1 for w in range(4, 65, 4))
    x = torch.randn(2, 3, 8, 8)
    for arch in SPACE.sample_many(6, seed=5):
        torch.testing.assert_close(grown(x, arch), base(x, arch), rtol=1e-5, atol=1e-6)


def test_grow_nested_and_copy_rule():
    torch.manual_seed(3)
    two = Supernet(SPACE, SupernetConfig(branches=(2, 2, 2), classifier_branches=2), in_channels=3, num_classes=10)
    four = two.grow((4, 4, 4), 4).eval()
    two.eval()
    x = torch.randn(2, 3, 8, 8)
    for arch in SPACE.sample_many(6, seed=6):  # 4 groups nest inside 2: same function
        torch.testing.assert_close(four(x, arch), two(x, arch), rtol=1e-5, atol=1e-6)
    # non-nested: 3 -> 4 groups on stage 3 ({4..24},{28..44},{48..64} -> {4..16},{20..32},{36..48},{52..64})
    three = Supernet(SPACE, SupernetConfig(branches=(1, 1, 3)), in_channels=3, num_classes=10)
    g4 = three.grow((1, 1, 4))
    src, dst = three.stages[2][1].conv1, g4.stages[2][1].conv1
    for grp, off, rows in zip(dst.groups.groups, dst.groups.offsets, dst.groups.rows):
        s_off = src.groups.offset_of(grp[-1])  # the old group holding the new group's largest width
        torch.testing.assert_close(dst.weight[off : off + rows], src.weight[s_off : s_off + rows], rtol=0, atol=0)
        torch.testing.assert_close(dst.running_var[off : off + rows], src.running_var[s_off : s_off + rows], rtol=0, atol=0)
    assert src.groups.offset_of(32) == 16 * 0 + 24  # 32 sits in old group 1, which starts after 24 rows


def test_custom_space_and_bad_input():
    sp = ChannelSpace([2, 4], [StageSpec(2, 1, (2, 4)), StageSpec(1, 2, (4, 8, 12))])
    net = Supernet(sp, SupernetConfig(branches=(2, 3)), in_channels=2, num_classes=3)
    x = torch.randn(2, 2, 6, 6)
    arch = sp.parse("4-2-4-4-4-12-8")
    net.eval()
    torch.testing.assert_close(net(x, arch), net.export(arch)(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="3 entries, the space has 2 stages"):
        Supernet(sp, SupernetConfig(branches=(1, 1, 1)))
    with pytest.raises(ValueError, match="input has 3 channels"):
        net(torch.randn(1, 3, 6, 6), arch)
    with pytest.raises(ValueError, match="position 1 value 3"):
        net(x, "3-2-4-4-4-12-8")
    with pytest.raises(ValueError, match="residual_activation"):
        SupernetConfig(residual_activation="gelu")
    with pytest.raises(ValueError, match="unknown supernet option"):
        SupernetConfig.from_dict({"branchez": [1]})
    assert SupernetConfig.from_dict(SupernetConfig.enhanced((2, 3, 4)).to_dict()) == SupernetConfig.enhanced((2, 3, 4))


def test_layer_slices_describe_forward():
    net = Supernet(SPACE, SupernetConfig.enhanced((2, 2, 2), 2), in_channels=3, num_classes=10)
    arch = SPACE.parse("4-8-12-16-8-16-16-24-12-8-16-4-32-52-52-52-20-40-8-44")
    sl = {s.name: s for s in net.layer_slices(arch)}
    assert sl["stem"].out_width == 5 and sl["stem"].in_width == 3 and sl["stem"].row_offset == 0
    assert sl["stages.0.0.conv1"].in_width == 5 and sl["stages.0.0.conv1"].out_width == 9
    assert sl["stages.2.0.shortcut"].row_offset == net.stages[2][0].shortcut.groups.offset_of(52)
    assert sl["classifier"].in_width == 9 and sl["classifier"].row_offset == 0
    assert len(sl) == 1 + 27 + 1
