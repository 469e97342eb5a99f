import gzip
import hashlib
import json
import math
import os
import time
from pathlib import Path

import pytest

from fastsupernet import io as fio
from fastsupernet.io import ChallengeFileError, Score
from fastsupernet.space import Track1Space

SPACE = Track1Space()
A1 = "16-4-12-16-8-16-16-24-12-8-16-4-32-52-52-52-20-40-8-44"
A2 = "16-8-16-16-8-12-12-20-12-4-12-32-32-24-48-8-52-16-12-36"
A3 = "8-4-4-12-16-12-12-32-20-12-24-32-24-28-12-8-28-52-56-48"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def dump(path: Path, obj) -> Path:
    return write(path, json.dumps(obj))


# ---------------------------------------------------------------------------- bundled data
def test_bundled_files_exist_and_match_recorded_hashes():
    cands = fio.official_candidates_path()
    gt = fio.ground_truth_path()
    assert cands.is_file() and gt.is_file()
    assert "shared" not in str(cands) and "shared" not in str(gt)
    raw = gzip.decompress(cands.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == "2b6201013080ff3d53d95ceb12c1e142007eecb4a393f023f797841455cfb159"
    assert hashlib.sha256(gt.read_bytes()).hexdigest() == (
        "208700b5a923272dc8e6f061350ae4b3fe3d58ca2b3402ea6dfa30d32f4c0f16"
    )
    # deterministic gzip: no timestamp
    assert cands.read_bytes()[4:8] == b"\0\0\0\0"


def test_all_official_candidates_parse_fast():
    t0 = time.perf_counter()
    cands = fio.read_candidates(fio.official_candidates_path())
    elapsed = time.perf_counter() - t0
    assert len(cands) == 50000
    assert list(cands)[:3] == ["arch1", "arch2", "arch3"]
    assert list(cands)[-1] == "arch50000"
    assert str(cands["arch1"]) == A1
    assert elapsed < 10, elapsed


def test_ground_truth_reads_as_fractions_and_agrees_with_candidates():
    gt = fio.read_scores(fio.ground_truth_path())
    assert len(gt) == 1000
    assert gt["arch1"].acc == 0.539 and str(gt["arch1"].arch) == A1
    assert all(0 < s.acc < 1 for s in gt.values())
    assert fio.read_meta(fio.ground_truth_path()) is None
    cands = fio.read_candidates(fio.official_candidates_path())
    assert all(cands[i] == s.arch for i, s in gt.items())


def test_resolve_data_path_aliases(tmp_path):
    assert fio.resolve_data_path("official") == fio.official_candidates_path()
    assert fio.resolve_data_path("gt1000") == fio.ground_truth_path()
    assert fio.resolve_data_path("./official") == Path("official")
    assert fio.resolve_data_path(tmp_path / "x.json") == tmp_path / "x.json"


# ---------------------------------------------------------------------------- round trips
def test_candidates_keep_file_order(tmp_path):
    p = dump(tmp_path / "c.json", {"arch10": {"arch": A1}, "arch2": {"arch": A2}, "zz": {"arch": A3, "x": 1}})
    c = fio.read_candidates(p)
    assert list(c) == ["arch10", "arch2", "zz"]
    assert [str(a) for a in c.values()] == [A1, A2, A3]


def test_submission_round_trip_with_loss_extra_and_meta(tmp_path):
    scores = {
        "arch3": Score(SPACE.parse(A3), 0.61, 1.25),
        "arch1": Score(SPACE.parse(A1), 0.5, None, {"rank": 7}),
        "arch2": {"arch": A2, "acc": 1 / 3, "loss": 2},
    }
    meta = {"recipe": "x", "seeds": [0, 1], "command": "python -m fastsupernet rank"}
    p = tmp_path / "sub.json"
    fio.write_submission(p, scores, meta)
    raw = json.loads(p.read_text())
    assert list(raw) == ["arch3", "arch1", "arch2", "_meta"]
    assert raw["arch3"] == {"arch": A3, "acc": 0.61, "loss": 1.25}
    assert raw["arch1"] == {"arch": A1, "acc": 0.5, "rank": 7}
    back = fio.read_scores(p)
    assert list(back) == ["arch3", "arch1", "arch2"]
    assert back["arch3"] == scores["arch3"]
    assert back["arch1"] == scores["arch1"]
    assert back["arch2"] == Score(SPACE.parse(A2), 1 / 3, 2.0)
    assert fio.read_meta(p) == meta
    assert set(fio.read_candidates(p)) == {"arch1", "arch2", "arch3"}  # _meta skipped
    hash(back["arch1"])  # hashable despite the extra dict


def test_write_candidates_round_trip(tmp_path):
    p = tmp_path / "c.json"
    fio.write_candidates(p, [A1, SPACE.parse(A2)], meta={"seed": 3})
    assert [str(a) for a in fio.read_candidates(p).values()] == [A1, A2]
    assert list(fio.read_candidates(p)) == ["arch1", "arch2"]
    assert fio.read_meta(p) == {"seed": 3}


def test_gz_read_write(tmp_path):
    scores = {"arch1": Score(SPACE.parse(A1), 0.4), "arch2": Score(SPACE.parse(A2), 0.6)}
    p = tmp_path / "sub.json.gz"
    fio.write_submission(p, scores, {"k": 1})
    data = p.read_bytes()
    assert data[:2] == b"\x1f\x8b" and data[4:8] == b"\0\0\0\0"
    assert fio.read_scores(p) == scores
    assert fio.read_meta(p) == {"k": 1}
    # deterministic bytes
    p2 = tmp_path / "again.json.gz"
    fio.write_submission(p2, scores, {"k": 1})
    assert p2.read_bytes() == data
    # gzip recognised by content even without the suffix
    q = tmp_path / "plain_name.json"
    q.write_bytes(data)
    assert fio.read_scores(q) == scores


def test_percent_detection(tmp_path):
    p = dump(tmp_path / "pct.json", {"a": {"arch": A1, "acc": 53.9}, "b": {"arch": A2, "acc": 0.5}, "c": {"arch": A3, "acc": 100}})
    s = fio.read_scores(p)
    assert s["a"].acc == pytest.approx(0.539)
    assert s["b"].acc == pytest.approx(0.005)  # the whole file is percent
    assert s["c"].acc == 1.0
    # max exactly 1 -> fractions
    p = dump(tmp_path / "frac.json", {"a": {"arch": A1, "acc": 1}, "b": {"arch": A2, "acc": 0.25}})
    assert [x.acc for x in fio.read_scores(p).values()] == [1.0, 0.25]


def test_write_rejects_bad_values(tmp_path):
    p = tmp_path / "s.json"
    with pytest.raises(ValueError, match="'arch2'.*outside"):
        fio.write_submission(p, {"arch1": {"arch": A1, "acc": 0.5}, "arch2": {"arch": A2, "acc": 55.0}})
    with pytest.raises(ValueError, match="'arch1'.*not finite"):
        fio.write_submission(p, {"arch1": {"arch": A1, "acc": math.nan}})
    with pytest.raises(ValueError, match="reserved"):
        fio.write_submission(p, {"_meta": {"arch": A1, "acc": 0.5}})
    with pytest.raises(ValueError, match="'arch1'.*position 1 value 5"):
        fio.write_submission(p, {"arch1": {"arch": "5" + A1[2:], "acc": 0.5}})
    assert not p.exists()


# ---------------------------------------------------------------------------- atomicity
def test_old_file_intact_when_serialisation_fails(tmp_path):
    p = tmp_path / "s.json"
    fio.write_submission(p, {"arch1": {"arch": A1, "acc": 0.5}})
    before = p.read_bytes()
    with pytest.raises(TypeError):
        fio.write_submission(p, {"arch1": {"arch": A1, "acc": 0.7}}, meta={"bad": object()})
    with pytest.raises(TypeError):
        fio.write_submission(p, {"arch1": Score(SPACE.parse(A1), 0.7, None, {"x": {1, 2}})})
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["s.json"]  # no temp files left


def test_old_file_intact_when_rename_fails(tmp_path, monkeypatch):
    p = tmp_path / "s.json.gz"
    fio.write_submission(p, {"arch1": {"arch": A1, "acc": 0.5}})
    before = p.read_bytes()

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        fio.write_submission(p, {"arch1": {"arch": A1, "acc": 0.9}})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert fio.read_scores(p)["arch1"].acc == 0.5
    assert [f.name for f in tmp_path.iterdir()] == ["s.json.gz"]


# ---------------------------------------------------------------------------- broken files
GOOD = f'"arch1": {{"arch": "{A1}", "acc": 0.5}}'


@pytest.mark.parametrize(
    "body, bad_id, fragment",
    [
        (f'{{{GOOD}, "arch2": [1, 2]}}', "arch2", "entry is an array, expected an object"),
        (f'{{{GOOD}, "arch2": {{"acc": 0.5}}}}', "arch2", "missing 'arch'"),
        (f'{{{GOOD}, "arch7": {{"arch": 5, "acc": 0.5}}}}', "arch7", "'arch' is a number, expected a string"),
        (f'{{{GOOD}, "arch3": {{"arch": "{A1}-4", "acc": 0.5}}}}', "arch3", "has 21 values, expected 20"),
        (
            f'{{{GOOD}, "arch3": {{"arch": "{A1[:-2]}99", "acc": 0.5}}}}',
            "arch3",
            "bad 'arch': architecture '16-4-12-16-8-16-16-24-12-8-16-4-32-52-52-52-20-40-8-99': position 20 value 99 is not allowed",
        ),
        (f'{{{GOOD}, "arch3": {{"arch": "{A1.replace("-", "-x", 1)}", "acc": 0.5}}}}', "arch3", "is not an integer"),
        (f'{{{GOOD}, "arch4": {{"arch": "{A2}"}}}}', "arch4", "missing 'acc'"),
        (f'{{{GOOD}, "arch4": {{"arch": "{A2}", "acc": "0.5"}}}}', "arch4", "'acc' is a string, expected a number"),
        (f'{{{GOOD}, "arch4": {{"arch": "{A2}", "acc": null}}}}', "arch4", "'acc' is null"),
        (f'{{{GOOD}, "arch4": {{"arch": "{A2}", "acc": true}}}}', "arch4", "'acc' is a boolean"),
        (f'{{{GOOD}, "arch4": {{"arch": "{A2}", "acc": NaN}}}}', "arch4", "'acc' is NaN"),
        (f'{{{GOOD}, "arch4": {{"arch": "{A2}", "acc": -0.1}}}}', "arch4", "negative"),
        (f'{{{GOOD}, "arch4": {{"arch": "{A2}", "acc": 100.5}}}}', "arch4", "above 100"),
        (f'{{{GOOD}, "arch4": {{"arch": "{A2}", "acc": Infinity}}}}', "arch4", "above 100"),
        (f'{{{GOOD}, "arch5": {{"arch": "{A2}", "acc": 0.1, "loss": "x"}}}}', "arch5", "'loss' is a string"),
        (f'{{{GOOD}, "arch5": {{"arch": "{A2}", "acc": 0.1, "loss": NaN}}}}', "arch5", "'loss' nan is not finite"),
        (f'{{{GOOD}, "arch1": {{"arch": "{A2}", "acc": 0.1}}}}', "arch1", "duplicate id"),
        (f'{{{GOOD}, "arch6": {{"arch": "{A2}", "acc": 0.1, "acc": 0.2}}}}', "arch6", "duplicate key 'acc'"),
    ],
)
def test_broken_entries_name_file_and_first_bad_id(tmp_path, body, bad_id, fragment):
    p = write(tmp_path / "broken.json", body)
    with pytest.raises(ChallengeFileError) as ei:
        fio.read_scores(p)
    err = ei.value
    assert err.entry_id == bad_id
    assert err.path == str(p)
    msg = str(err)
    assert str(p) in msg and f"entry {bad_id!r}" in msg and fragment in msg, msg
    assert isinstance(err, ValueError)


def test_first_bad_entry_in_file_order(tmp_path):
    body = {
        "arch1": {"arch": A1, "acc": 0.5},
        "arch9": {"arch": A1, "acc": -1},  # bad acc, comes first
        "arch2": {"acc": 0.5},  # missing arch, later
    }
    p = dump(tmp_path / "b.json", body)
    with pytest.raises(ChallengeFileError, match=r"entry 'arch9': 'acc' -1.0 is negative"):
        fio.read_scores(p)
    with pytest.raises(ChallengeFileError, match=r"entry 'arch2': missing 'arch'"):
        fio.read_candidates(p)  # candidates ignore acc


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('{"arch1": {"arch": "x"},\n  "arch2": }', "not valid JSON: Expecting value (line 2, column 12)"),
        ("", "not valid JSON: Expecting value (line 1, column 1)"),
        ("[1, 2]", "top level is an array, expected an object"),
        ('"text"', "top level is a string"),
        ('{"_meta": 3}', "'_meta' is a number, expected an object"),
    ],
)
def test_file_level_errors(tmp_path, body, fragment):
    p = write(tmp_path / "bad.json", body)
    with pytest.raises(ChallengeFileError) as ei:
        fio.read_candidates(p)
    assert str(p) in str(ei.value) and fragment in str(ei.value), str(ei.value)
    assert ei.value.entry_id is None


def test_missing_unreadable_and_corrupt_files(tmp_path):
    with pytest.raises(ChallengeFileError, match=r"nope\.json: no such file"):
        fio.read_scores(tmp_path / "nope.json")
    with pytest.raises(ChallengeFileError, match="is a directory"):
        fio.read_candidates(tmp_path)
    p = tmp_path / "bad.json.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ChallengeFileError, match="bad.json.gz: corrupt gzip"):
        fio.read_candidates(p)
    p = tmp_path / "latin.json"
    p.write_bytes(b'{"a\xe9": 1}')
    with pytest.raises(ChallengeFileError, match="not UTF-8"):
        fio.read_candidates(p)


def test_meta_is_skipped_and_read(tmp_path):
    body = {"_meta": {"recipe": {"epochs": 3}, "seeds": [1]}, "arch1": {"arch": A1, "acc": 0.2}}
    p = dump(tmp_path / "m.json", body)
    assert list(fio.read_scores(p)) == ["arch1"]
    assert list(fio.read_candidates(p)) == ["arch1"]
    assert fio.read_meta(p) == body["_meta"]
    assert type(fio.read_meta(p)) is dict
    assert fio.read_scores(dump(tmp_path / "only.json", {"_meta": {}})) == {}


def test_bom_and_space_by_name(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": {"arch": A1}}).encode())
    assert str(fio.read_candidates(p, "track1")["a"]) == A1
    with pytest.raises(ValueError, match="unknown space"):
        fio.read_candidates(p, "nope")


def test_extra_keys_are_plain_and_cannot_clobber_fields(tmp_path):
    p = dump(tmp_path / "x.json", {"arch1": {"arch": A1, "acc": 0.5, "info": {"epochs": [1, {"a": 2}]}}})
    extra = fio.read_scores(p)["arch1"].extra
    assert extra == {"info": {"epochs": [1, {"a": 2}]}}
    assert type(extra["info"]) is dict and type(extra["info"]["epochs"][1]) is dict
    with pytest.raises(ValueError, match="overwrite"):
        fio.write_submission(tmp_path / "y.json", {"arch1": Score(SPACE.parse(A1), 0.5, None, {"acc": 0.9})})
