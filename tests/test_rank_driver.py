"""The ranking driver: output, deduplication, validation, refusals, journal and shard planning."""
from __future__ import annotations

import json
import math

import pytest

from fastsupernet import io as fio
from fastsupernet.journal import Journal
from fastsupernet.ranking import JournalError, RankError, existing_journals, journal_path, network_key, rank
from fastsupernet.ranking.shard import BALANCE_TOLERANCE, plan_shards

from rank_helpers import (
    SPACE, TINY, candidates, entries, journal_header, journal_nets, one_json, rank_cmd, run_cli, write_candidates,
)


@pytest.fixture(scope="module")
def reference_run(trained_checkpoint, tmp_path_factory):
    """One uninterrupted reference-engine ranking of 6 networks (7 ids, one a twin)."""
    d = tmp_path_factory.mktemp("rank_ref")
    cands = candidates(6, seed=3)
    out = d / "out.json"
    res = rank(trained_checkpoint, cands, out, engine="reference", progress=False, **TINY)
    return cands, out, res


# ---------------------------------------------------------------------------- output
def test_output_is_a_submission_with_meta(reference_run, trained_checkpoint):
    cands, out, res = reference_run
    raw = json.loads(out.read_text())
    assert list(raw)[:-1] == list(cands) and list(raw)[-1] == "_meta"
    for cid, a in cands.items():
        e = raw[cid]
        assert set(e) == {"arch", "acc", "loss"} and e["arch"] == str(a)
        assert 0.0 <= e["acc"] <= 1.0 and math.isfinite(e["loss"]) and e["loss"] > 0
        # acc is a fraction of the 128 evaluation images
        assert e["acc"] * 128 == pytest.approx(round(e["acc"] * 128), abs=1e-9)
    meta = fio.read_meta(out)
    assert meta["engine"] == "reference" and meta["precision"] == "fp32"
    assert meta["protocol"]["recal_images"] == 64 and meta["protocol"]["eval_images"] == 128
    assert meta["protocol"]["recal_batch"] == 32
    assert meta["data"]["spec"] == "fashion-mnist"
    assert meta["counts"] == {"candidates": 7, "unique": 6, "computed": 6, "resumed": 0}
    import hashlib

    assert meta["checkpoint"]["sha256"] == hashlib.sha256(trained_checkpoint.read_bytes()).hexdigest()
    # the scores differ between networks (the checkpoint is trained, not constant)
    assert len({raw[c]["loss"] for c in cands}) == 6
    assert res.candidates == 7 and res.unique == 6 and res.computed == 6
    assert {k: (str(s.arch), s.acc, s.loss) for k, s in res.scores.items()} == entries(out)


def test_twins_are_evaluated_once_and_reported_under_both_ids(reference_run):
    cands, out, _ = reference_run
    e = entries(out)
    first, last = "arch1", list(cands)[-1]
    assert e[first][0] != e[last][0]  # different strings
    assert e[first][1:] == e[last][1:]  # same network, same result
    lines = out.with_name(out.name + ".journal").read_text().splitlines()
    assert len(lines) == 1 + 6  # header + one line per distinct network
    assert sorted(journal_nets(out.with_name(out.name + ".journal"))) == sorted({network_key(a) for a in cands.values()})


def test_evaluate_reads_the_output(reference_run):
    _, out, _ = reference_run
    r = run_cli(["evaluate", str(out), str(out)])
    assert r.returncode == 0, r.stderr
    d = one_json(r.stdout)
    assert d["n"] == 7 and d["missing"] == 0


def test_each_result_matches_a_run_of_that_network_alone(reference_run, trained_checkpoint, tmp_path):
    cands, out, _ = reference_run
    alone = rank(trained_checkpoint, {"x": cands["arch2"]}, tmp_path / "one.json", engine="reference",
                 progress=False, **TINY)
    assert (alone.scores["x"].acc, alone.scores["x"].loss) == entries(out)["arch2"][1:]


def test_fast_engine_agrees_with_reference(reference_run, trained_checkpoint, tmp_path):
    cands, out, _ = reference_run
    res = rank(trained_checkpoint, cands, tmp_path / "fast.json", engine="fast", progress=False, **TINY)
    ref = entries(out)
    for cid, s in res.scores.items():
        assert abs(s.acc - ref[cid][1]) <= 2 / 128 + 1e-12
        assert s.loss == pytest.approx(ref[cid][2], rel=1e-4, abs=1e-5)
    assert 0 < res.macs_per_image_computed <= res.macs_per_image_total


# ---------------------------------------------------------------------------- validation and refusals
def test_bad_arch_in_file_is_named_and_nothing_starts(trained_checkpoint, tmp_path):
    cands = {k: str(a) for k, a in candidates(3).items()}
    cands["arch3"] = cands["arch3"].replace(cands["arch3"].split("-")[0], "7", 1)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({k: {"arch": s} for k, s in cands.items()}))
    out = tmp_path / "out.json"
    with pytest.raises(fio.ChallengeFileError, match=r"'arch3'.*position 1 value 7"):
        rank(trained_checkpoint, p, out, engine="reference", progress=False, **TINY)
    assert not out.exists() and not existing_journals(out)
    r = run_cli(rank_cmd(trained_checkpoint, p, out, "--engine", "reference"))
    assert r.returncode == 2 and "arch3" in r.stderr and r.stderr.startswith("error:")
    assert not out.exists() and not existing_journals(out)


def test_bad_arch_in_mapping_and_bad_settings_are_refused(trained_checkpoint, tmp_path):
    out = tmp_path / "out.json"
    with pytest.raises(RankError, match=r"candidate 'b'.*20 dash-joined"):
        rank(trained_checkpoint, {"a": SPACE.largest(), "b": "16-16"}, out, progress=False, **TINY)
    with pytest.raises(RankError, match="candidate id '' is not usable"):
        rank(trained_checkpoint, {"": SPACE.largest()}, out, progress=False, **TINY)
    (tmp_path / "empty_id.json").write_text(json.dumps({"": {"arch": str(SPACE.largest())}}))
    with pytest.raises(RankError, match="empty_id.json: candidate id '' is not usable"):
        rank(trained_checkpoint, tmp_path / "empty_id.json", out, progress=False, **TINY)
    with pytest.raises(RankError, match="recal_images 99999 exceeds"):
        rank(trained_checkpoint, [SPACE.largest()], out, recal_images=99999, progress=False)
    with pytest.raises(RankError, match="eval_images must be a positive integer, got 0"):
        rank(trained_checkpoint, [SPACE.largest()], out, eval_images=0, progress=False)
    with pytest.raises(RankError, match="'bf16' needs a CUDA device"):
        rank(trained_checkpoint, [SPACE.largest()], out, precision="bf16", device="cpu", progress=False)
    with pytest.raises(RankError, match="resume and force"):
        rank(trained_checkpoint, [SPACE.largest()], out, resume=True, force=True, progress=False)
    with pytest.raises(RankError, match="unknown engine"):
        rank(trained_checkpoint, [SPACE.largest()], out, engine="turbo", progress=False)
    with pytest.raises(RankError, match="no candidates"):
        rank(trained_checkpoint, {}, out, progress=False)
    # conv routes: refused before anything is read or written, saying why
    with pytest.raises(RankError, match="conv_route must be one of kernel, triton, triton_tf32x3, class, got 'cudnn'"):
        rank(trained_checkpoint, [SPACE.largest()], out, conv_route="cudnn", progress=False)
    with pytest.raises(RankError, match="conv_route 'class' is an option of the fast engine, not of 'reference'"):
        rank(trained_checkpoint, [SPACE.largest()], out, engine="reference", conv_route="class", progress=False)
    with pytest.raises(RankError, match="conv_route 'triton_tf32x3' computes fp32 convolutions; precision 'tf32'"):
        rank(trained_checkpoint, [SPACE.largest()], out, precision="tf32", conv_route="triton_tf32x3",
             progress=False)
    if not _triton_interpreted():
        with pytest.raises(RankError, match="conv_route 'triton' (on CPU needs TRITON_INTERPRET=1|needs triton)"):
            rank(trained_checkpoint, [SPACE.largest()], out, device="cpu", conv_route="triton", progress=False)
    assert not out.exists() and not existing_journals(out)


def _triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def test_conv_route_is_recorded_and_resume_keeps_it(reference_run, trained_checkpoint, tmp_path):
    """A non-default route changes the arithmetic: the output, the summary and the journal say
    which ran, and resuming with another route is refused. The default route is not written
    into the fingerprint, so journals of runs that had no route setting still resume."""
    cands, out, _ = reference_run
    routed = tmp_path / "class.json"
    res = rank(trained_checkpoint, cands, routed, conv_route="class", progress=False, **TINY)
    assert res.conv_route == "class" and res.to_json_dict()["conv_route"] == "class"
    assert "conv route class" in res.summary_line()
    assert fio.read_meta(routed)["conv_route"] == "class"
    assert journal_header(journal_path(routed))["conv_route"] == "class"
    ref = entries(out)
    for cid, s in res.scores.items():  # the same function as the reference, up to rounding
        assert abs(s.acc - ref[cid][1]) <= 2 / 128 + 1e-12
        assert s.loss == pytest.approx(ref[cid][2], rel=1e-4, abs=1e-5)
    with pytest.raises(JournalError, match=r"changed: conv_route\)"):
        rank(trained_checkpoint, cands, routed, resume=True, progress=False, **TINY)
    assert "conv_route" not in journal_header(journal_path(out))
    assert fio.read_meta(out)["conv_route"] == "kernel"
    # the command line takes it too
    archs = write_candidates(tmp_path / "c.json", dict(list(cands.items())[:2]))
    r = run_cli(rank_cmd(trained_checkpoint, archs, tmp_path / "cli.json", "--conv-route", "class"))
    assert r.returncode == 0, r.stderr
    assert one_json(r.stdout)["conv_route"] == "class"
    r = run_cli(rank_cmd(trained_checkpoint, archs, tmp_path / "bad.json", "--engine", "reference",
                         "--conv-route", "class"))
    assert r.returncode == 2 and "is an option of the fast engine" in r.stderr
    assert not (tmp_path / "bad.json").exists() and not existing_journals(tmp_path / "bad.json")


def test_data_that_does_not_fit_the_checkpoint_is_refused(trained_checkpoint, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    npz = tmp_path / "rgb.npz"
    np.savez(npz, train_images=rng.integers(0, 256, (60, 3, 8, 8), dtype=np.uint8),
             train_labels=rng.integers(0, 10, 60), num_classes=10)
    out = tmp_path / "out.json"
    with pytest.raises(RankError, match=r"has 3 channel\(s\) and 10 classes, but checkpoint .* expects 1 channel"):
        rank(trained_checkpoint, [SPACE.largest()], out, data=f"npz:{npz}", progress=False)
    assert not out.exists() and not existing_journals(out)


def test_existing_output_or_journal_is_not_overwritten(reference_run, trained_checkpoint, tmp_path):
    cands, out, _ = reference_run
    before = out.read_bytes()
    with pytest.raises(RankError, match=r"journal.*--resume.*--force"):
        rank(trained_checkpoint, cands, out, engine="reference", progress=False, **TINY)
    assert out.read_bytes() == before
    lone = tmp_path / "lone.json"
    lone.write_text("{}")
    with pytest.raises(RankError, match="exists; pass --force"):
        rank(trained_checkpoint, cands, lone, engine="reference", progress=False, **TINY)
    with pytest.raises(RankError, match="no journal to resume"):
        rank(trained_checkpoint, cands, lone, engine="reference", resume=True, progress=False, **TINY)
    assert lone.read_text() == "{}"


def test_resume_with_other_settings_is_refused_naming_them(reference_run, trained_checkpoint):
    cands, out, _ = reference_run
    with pytest.raises(JournalError, match=r"changed: protocol\.eval_images\).*--force"):
        rank(trained_checkpoint, cands, out, engine="reference", resume=True, progress=False,
             recal_images=64, recal_batch=32, eval_images=64)
    with pytest.raises(JournalError, match=r"changed: engine\)"):
        rank(trained_checkpoint, cands, out, engine="fast", resume=True, progress=False, **TINY)


def test_resume_of_a_finished_run_recomputes_nothing(reference_run, trained_checkpoint):
    cands, out, _ = reference_run
    before = entries(out)
    res = rank(trained_checkpoint, cands, out, engine="reference", resume=True, progress=False, **TINY)
    assert res.computed == 0 and res.resumed == 6
    assert entries(out) == before


def test_resume_uses_every_rank_journal_of_an_earlier_run(reference_run, trained_checkpoint, tmp_path):
    """A run sharded over two ranks, killed, resumes in one process with what both ranks finished."""
    cands, out, _ = reference_run
    header, *records = journal_path(out).read_text().splitlines(keepends=True)
    out2 = tmp_path / "out.json"
    journal_path(out2).write_text(header + records[0])
    journal_path(out2, 1).write_text(header + records[1] + records[2][:-7])  # rank 1 killed mid-line
    res = rank(trained_checkpoint, cands, out2, engine="reference", resume=True, progress=False, **TINY)
    assert res.resumed == 2 and res.computed == 4
    assert entries(out2) == entries(out)
    assert journal_path(out2, 1).read_text() == header + records[1]  # the torn tail was cut


def test_a_damaged_journal_is_refused_naming_it(reference_run, trained_checkpoint, tmp_path):
    cands, out, _ = reference_run
    header, first, *_ = journal_path(out).read_text().splitlines(keepends=True)
    out2 = tmp_path / "out.json"
    journal_path(out2).write_text(header + first.replace('"acc"', '"accuracy"') + first)
    with pytest.raises(JournalError, match=r"out\.json\.journal: line 2 is not a ranking result"):
        rank(trained_checkpoint, cands, out2, engine="reference", resume=True, progress=False, **TINY)
    journal_path(out2).write_text(header + "garbage\n" + first)
    with pytest.raises(JournalError, match="line 2 is not JSON"):
        rank(trained_checkpoint, cands, out2, engine="reference", resume=True, progress=False, **TINY)
    assert not out2.exists()


def test_force_starts_over(trained_checkpoint, tmp_path, capsys):
    cands = dict(list(candidates(2, seed=5).items())[:2])
    out = tmp_path / "out.json"
    rank(trained_checkpoint, cands, out, engine="reference", progress=False, **TINY)
    assert capsys.readouterr().err == ""  # progress=False: no bar, no summary line
    first = entries(out)
    res = rank(trained_checkpoint, cands, out, engine="reference", force=True, progress=False, **TINY)
    assert res.computed == 2 and entries(out) == first
    assert len(journal_nets(journal_path(out))) == 2


def test_cli_rank_prints_summary_and_progress(trained_checkpoint, tmp_path):
    cands = dict(list(candidates(2, seed=9).items())[:2])
    archs = write_candidates(tmp_path / "c.json", cands)
    out = tmp_path / "out.json"
    args = rank_cmd(trained_checkpoint, archs, out, "--engine", "reference")
    args.remove("--no-progress")
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    d = one_json(r.stdout)
    assert d["out"] == str(out) and d["candidates"] == 2 and d["unique"] == 2 and d["computed"] == 2
    assert d["engine"] == "reference" and d["world_size"] == 1 and d["candidates_per_s"] > 0
    assert "cand/s" in r.stderr and "ranked 2 candidates" in r.stderr and "prefix sharing saved" in r.stderr
    assert set(entries(out)) == set(cands)


# ---------------------------------------------------------------------------- journal
def test_journal_paths(tmp_path):
    out = tmp_path / "r.json"
    assert journal_path(out) == tmp_path / "r.json.journal"
    assert journal_path(out, 3) == tmp_path / "r.json.journal.3"
    for name in ("r.json.journal.2", "r.json.journal", "r.json.journalx", "r.json.journal.a", "rr.json.journal"):
        (tmp_path / name).write_text("")
    assert [p.name for p in existing_journals(out)] == ["r.json.journal", "r.json.journal.2"]
    assert existing_journals(tmp_path / "nowhere" / "r.json") == []


def test_journal_fingerprint_names_the_run(reference_run):
    _, out, _ = reference_run
    fp = journal_header(journal_path(out))
    assert fp["journal"] == "fastsupernet rank" and fp["engine"] == "reference" and fp["precision"] == "fp32"
    assert fp["protocol"]["recal_images"] == 64 and fp["data"]["spec"] == "fashion-mnist"
    assert fp["checkpoint_sha256"] == fio.read_meta(out)["checkpoint"]["sha256"]


def test_journal_sync_every_flushes_each_record_and_syncs_in_groups(tmp_path, monkeypatch):
    import os

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    p = tmp_path / "j.journal"
    j = Journal(p, {"a": 1}, resume=False, sync_every=3)
    after_header = len(synced)
    for i in range(4):
        j.append({"x": i})
        assert p.read_text().count("\n") == 2 + i  # visible to a reader at once (survives a kill)
    assert len(synced) - after_header == 1  # one fsync for the group of 3
    j.close()
    assert len(synced) - after_header == 2  # and the rest on close
    with pytest.raises(ValueError, match="sync_every"):
        Journal(tmp_path / "k.journal", {}, resume=False, sync_every=0)


# ---------------------------------------------------------------------------- shard plan
def test_shard_plan_keeps_prefix_subtrees_whole_and_balances():
    archs = fio.read_candidates(fio.official_candidates_path())
    widths = [a.widths for a in list(archs.values())[:2000]]
    macs, _ = SPACE.costs([a for a in list(archs.values())[:2000]])
    for world in (2, 3, 8):
        plan = plan_shards(widths, macs, world)
        assert sorted(i for s in plan.shards for i in s) == list(range(len(widths)))
        assert all(list(s) == sorted(s) for s in plan.shards)
        owner = {}
        for r, s in enumerate(plan.shards):
            for i in s:
                assert owner.setdefault(widths[i][: plan.depth], r) == r  # a subtree never splits
        assert plan.imbalance <= 1.0 + BALANCE_TOLERANCE
        assert plan.loads == tuple(sum(int(macs[i]) for i in s) for s in plan.shards)
        # the shallowest depth that balances: one level less would not
        if plan.depth > 1:
            from fastsupernet.ranking.shard import _pack

            assert _pack(widths, macs, world, plan.depth - 1).imbalance > 1.0 + BALANCE_TOLERANCE
        assert plan_shards(widths, macs, world) == plan  # deterministic


def test_shard_plan_edge_cases():
    assert plan_shards([], [], 2).shards == ((), ())
    one = plan_shards([(4, 4), (8, 4)], [1, 1], 1)
    assert one.shards == ((0, 1),)
    few = plan_shards([(4, 4)], [5], 3)  # more ranks than networks: some ranks idle
    assert sorted(len(s) for s in few.shards) == [0, 0, 1]
    with pytest.raises(ValueError):
        plan_shards([(4,)], [1, 2], 2)


def test_memory_limit_option_parses_sizes():
    from fastsupernet.cli import CLIError, _parse_bytes

    assert _parse_bytes("8GiB") == 8 << 30 and _parse_bytes("512 MiB") == 512 << 20
    assert _parse_bytes("2GB") == 2 * 10**9 and _parse_bytes("1000") == 1000 and _parse_bytes("1.5k") == 1500
    for bad in ("lots", "8XB", "0", "-3GiB"):
        with pytest.raises(CLIError, match="--memory-limit"):
            _parse_bytes(bad)
