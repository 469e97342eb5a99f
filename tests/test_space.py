import random

import pytest

from fastsupernet.space import Arch, ChannelSpace, StageSpec, Track1Space, get_space, space_from_dict

EXAMPLE = "16-4-12-16-8-16-16-24-12-8-16-4-32-52-52-52-20-40-8-44"


@pytest.fixture(scope="module")
def space():
    return Track1Space()


def test_track1_shape(space):
    assert space.num_positions == 20
    assert space.num_network_positions == 19
    assert space.choices[0] == (4, 8, 12, 16)
    assert all(space.choices[p] == (4, 8, 12, 16) for p in range(7))
    assert all(space.choices[p] == tuple(range(4, 33, 4)) for p in range(7, 13))
    assert all(space.choices[p] == tuple(range(4, 65, 4)) for p in range(13, 20))
    assert space.size() == 4**7 * 8**6 * 16**6 == 2**56
    assert [space.stage_of_position(p) for p in (0, 6, 7, 12, 13, 18)] == [0, 0, 1, 1, 2, 2]


def test_parse_round_trip(space):
    a = space.parse(EXAMPLE)
    assert str(a) == EXAMPLE
    assert space.parse(str(a)) == a
    assert space.parse(a.values) == a
    assert a.widths == a.values[:19]
    assert hash(a) == hash(space.parse(EXAMPLE))
    assert space.canonical(" " + EXAMPLE + "\n") == EXAMPLE
    with pytest.raises(Exception):
        a.values = (1,)  # immutable


def test_trailing_position_kept_but_same_network(space):
    a = space.parse(EXAMPLE)
    b = space.parse(EXAMPLE.rsplit("-", 1)[0] + "-4")
    assert str(b).endswith("-4") and a != b
    assert a.widths == b.widths
    assert space.macs(a) == space.macs(b) and space.params(a) == space.params(b)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("16-4-12", "has 3 values, expected 20"),
        (EXAMPLE + "-4", "has 21 values"),
        (EXAMPLE.replace("16-4-12", "16-x-12", 1), "position 2 value 'x' is not an integer"),
        (EXAMPLE.replace("16-4-12", "16-4.0-12", 1), "position 2 value '4.0' is not an integer"),
        ("20" + EXAMPLE[2:], "position 1 value 20 is not allowed; allowed [4, 8, 12, 16]"),
        (EXAMPLE.replace("-24-", "-36-", 1), "position 8 value 36 is not allowed; allowed [4, 8, 12, 16, 20, 24, 28, 32]"),
        (EXAMPLE[:-2] + "66", "position 20 value 66 is not allowed"),
        (EXAMPLE[:-2], "position 20 value '' is not an integer"),
    ],
)
def test_parse_errors_name_position_value_allowed(space, text, needle):
    with pytest.raises(ValueError) as e:
        space.parse(text)
    assert needle in str(e.value)


def test_parse_sequence_errors(space):
    with pytest.raises(ValueError, match="position 3 value '12' is not an integer"):
        space.parse([16, 4, "12"] + [4] * 17)
    with pytest.raises(ValueError, match="position 1 value True"):
        space.parse([True] + [4] * 19)


def test_sampling_seeded_uniform(space):
    assert space.sample_many(50, seed=3) == space.sample_many(50, seed=3)
    assert space.sample_many(50, seed=3) != space.sample_many(50, seed=4)
    rng = random.Random(0)
    draws = [space.sample(rng) for _ in range(4000)]
    for a in draws[:50]:
        assert space.parse(str(a)) == a
    # every choice of a 16-way position appears near 1/16 of the time
    counts = {w: 0 for w in space.choices[15]}
    for a in draws:
        counts[a.values[15]] += 1
    assert min(counts.values()) > 4000 / 16 * 0.7 and max(counts.values()) < 4000 / 16 * 1.3


def test_macs_full_width(space):
    assert space.macs(space.largest()) == 42_653_952  # 42.65M at 32x32, 1x1 shortcut everywhere
    # hand count of the smallest network
    s = space.smallest()
    stem = 3 * 4 * 9 * 32 * 32
    st1 = 6 * 4 * 4 * 9 * 1024 + 3 * 4 * 4 * 1024
    st2 = (4 * 4 * 9 * 256 + 5 * 4 * 4 * 9 * 256) + 3 * 4 * 4 * 256
    st3 = (4 * 4 * 9 * 64 + 5 * 4 * 4 * 9 * 64) + 3 * 4 * 4 * 64
    assert space.macs(s) == stem + st1 + st2 + st3 + 4 * 100


def test_macs_resolution_channels_and_options(space):
    a = space.largest()
    m28 = space.macs(a, resolution=28, in_channels=1, num_classes=10)
    # 28 -> 14 -> 7
    stem = 1 * 16 * 9 * 784
    st1 = 6 * 16 * 16 * 9 * 784 + 3 * 16 * 16 * 784
    st2 = 16 * 32 * 9 * 196 + 5 * 32 * 32 * 9 * 196 + (16 * 32 + 2 * 32 * 32) * 196
    st3 = 32 * 64 * 9 * 49 + 5 * 64 * 64 * 9 * 49 + (32 * 64 + 2 * 64 * 64) * 49
    assert m28 == stem + st1 + st2 + st3 + 640
    # identity shortcuts where widths agree: full width keeps only the two stride-2 projections
    proj = space.macs(a, shortcut="projection")
    assert space.macs(a) - proj == 3 * 16 * 16 * 1024 + 2 * 32 * 32 * 256 + 2 * 64 * 64 * 64
    # the width map widens 4 -> 5
    s = space.smallest()
    assert space.macs(s, width_map={4: 5}) > space.macs(s)
    with pytest.raises(ValueError, match="shortcut"):
        space.macs(a, shortcut="none")


def test_params_full_width(space):
    a = space.largest()
    convs = sum(cin * cout * L.kernel**2 + 2 * cout for L, cin, cout, _ in space.layer_shapes(a))
    assert space.params(a) == convs + 64 * 100 + 100
    assert space.params(a, residual_activation="prelu") == space.params(a) + 9


def test_custom_space_and_dict_round_trip():
    sp = ChannelSpace([2, 4], [StageSpec(2, 1, (2, 4)), StageSpec(1, 2, (4, 8, 12))], name="tiny")
    assert sp.num_positions == 1 + 4 + 2
    assert sp.size() == 2 * 2**4 * 3**2
    a = sp.parse("4-2-4-4-4-12-8")
    assert str(a) == "4-2-4-4-4-12-8"
    assert space_from_dict(sp.to_dict()) == sp
    assert isinstance(space_from_dict(Track1Space().to_dict()), Track1Space)
    assert get_space("track1") == Track1Space()
    with pytest.raises(ValueError, match="unknown space"):
        get_space("nope")
    with pytest.raises(ValueError, match="strictly increasing"):
        StageSpec(1, 1, (8, 4))
    with pytest.raises(ValueError, match="stride"):
        StageSpec(1, 3, (4,))
    assert isinstance(a, Arch)


@pytest.mark.parametrize("shortcut", ["all", "projection"])
@pytest.mark.parametrize("width_map", [None, {4: 5, 8: 9}])
def test_costs_vectorised_match_layer_shapes(space, shortcut, width_map):
    archs = space.sample_many(200, seed=5) + [space.smallest(), space.largest()]
    macs, params = space.costs(archs, resolution=28, in_channels=1, num_classes=10, shortcut=shortcut, width_map=width_map)
    for i, a in enumerate(archs):
        shapes = space.layer_shapes(a, resolution=28, in_channels=1, shortcut=shortcut, width_map=width_map)
        last = (width_map or {}).get(a.widths[-1], a.widths[-1])
        assert macs[i] == sum(ci * co * L.kernel**2 * h * h for L, ci, co, h in shapes) + last * 10
        assert params[i] == sum(ci * co * L.kernel**2 + 2 * co for L, ci, co, _ in shapes) + (last + 1) * 10
