"""Ingestion: every bad-input class is counted and located, valid rows are all kept, and no
private text (planted canaries) reaches stdout, stderr or any file outside RUN_DIR/private/."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dpray.config import config_from_tree
from dpray.rundir import RunDir
from dpray.stages import ingest
from tests.conftest import base_tree, make_canary


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def mixed_file(path, max_chars=200):
    """A JSONL file with every bad-input class, each record carrying its own canary.

    Returns (canaries, expected kept ids, expected drop counts by reason).
    """
    c = [make_canary() for _ in range(20)]
    lines = [
        _line({"id": "a1", "user": "u1", "text": f"How do I bake bread? {c[0]}"}),  # 1 ok
        b'{"id": "a2", "user": "u1", "text": "' + c[1].encode() + b"\n",  # 2 invalid JSON
        _line({"id": "a3", "user": "u1", "body": f"no text field {c[2]}"}),  # 3 missing text
        _line({"id": "a4", "user": "u1", "text": 12345}),  # 4 wrong type
        _line({"id": "a5", "user": "u1", "text": [c[3]]}),  # 5 wrong type (list)
        _line({"id": "a6", "user": "u1", "text": "   \n\t "}),  # 6 empty
        b'{"id": "a7", "user": "u1", "text": "' + c[4].encode() + b' \xff\xfe"}\n',  # 7 bad utf-8
        _line({"id": "a8", "user": "u1", "text": c[5] + "x" * max_chars}),  # 8 too long
        _line({"id": "a1", "user": "u2", "text": f"Another question {c[6]}"}),  # 9 duplicate id
        _line({"id": "a10", "text": f"Who wrote Hamlet? {c[7]}"}),  # 10 missing user id
        _line({"id": "a11", "user": "u2", "text": f"Plan a trip {c[8]}"}),  # 11 ok
        _line({"id": "a12", "user": "u2", "text": f"plan  a TRIP {c[8].lower()}"}),  # 12 norm dup
        _line({"id": "a13", "user": "u2", "text": f"Plan a trip {c[8]}"}),  # 13 exact dup
        _line(["not", "an", "object", c[9]]),  # 14 wrong type (not an object)
        _line({"id": "a15", "user": "u2", "text": "bad \udc80 surrogate " + c[10]}),  # 15 utf-8
        _line({"id": None, "user": "u2", "text": f"no id {c[11]}"}),  # 16 missing id
        b"\n",  # blank line: not a record
    ]
    # 17..26: user u3 writes ten distinct instructions, capped to 3
    for k in range(10):
        lines.append(_line({"id": f"b{k}", "user": "u3", "text": f"Task {k} for me {c[12]}"}))
    lines.append(_line({"id": "a30", "user": "u4", "text": f"Fix my SQL query {c[13]}"}))
    path.write_bytes(b"".join(lines))
    drops = {
        "invalid_json": 1,
        "missing_text": 1,
        "wrong_type": 3,
        "empty_text": 1,
        "invalid_utf8": 2,
        "too_long": 1,
        "duplicate_id": 1,
        "missing_user": 1,
        "missing_id": 1,
        "duplicate_text": 2,
        "user_cap": 7,
    }
    return c, drops


def user_tree(tmp_path, data_path, **privacy):
    tree = base_tree(tmp_path / "run", data_path, user_field="user", max_chars=200)
    tree["privacy"].update({"unit": "user", "max_records_per_user": 3, **privacy})
    return tree


def test_mixed_bad_input_counts_and_keeps_valid(tmp_path):
    data = tmp_path / "mixed.jsonl"
    _, drops = mixed_file(data)
    config = config_from_tree(user_tree(tmp_path, data))
    run_dir = RunDir(config.run_dir)
    result = ingest.run(config, run_dir)
    report = result.summary
    assert report["dropped"] == drops
    assert report["rows_in"] == 27
    assert report["rows_out"] == report["rows_in"] - sum(drops.values()) == 6
    table = pq.read_table(run_dir.private("ingest") / "instructions.parquet").to_pylist()
    ids = [r["id"] for r in table]
    assert ids[:2] == ["a1", "a11"] and ids[-1] == "a30"
    assert sum(1 for r in table if r["user_id"] == "u3") == 3
    problems = [json.loads(x) for x in (run_dir.private("ingest") / "problems.jsonl").open()]
    located = {(p["line"], p["reason"]) for p in problems}
    for expected in [
        (2, "invalid_json"),
        (3, "missing_text"),
        (4, "wrong_type"),
        (5, "wrong_type"),
        (6, "empty_text"),
        (7, "invalid_utf8"),
        (8, "too_long"),
        (9, "duplicate_id"),
        (10, "missing_user"),
        (12, "duplicate_text"),
        (13, "duplicate_text"),
        (14, "wrong_type"),
        (15, "invalid_utf8"),
        (16, "missing_id"),
    ]:
        assert expected in located


def test_cli_never_prints_or_publishes_private_text(tmp_path):
    data = tmp_path / "mixed.jsonl"
    canaries, _ = mixed_file(data)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(user_tree(tmp_path, data)))
    proc = subprocess.run(
        [sys.executable, "-m", "dpray", "ingest", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "mixed.jsonl:2: invalid_json" in proc.stderr
    assert "mixed.jsonl:10: missing_user" in proc.stderr
    run_dir = RunDir(tmp_path / "run")
    public = run_dir.public_files()
    assert run_dir.ledger_path in public and (run_dir.root / "ingest/report.json") in public
    blobs = [proc.stdout, proc.stderr] + [p.read_bytes().decode("utf-8", "replace") for p in public]
    for canary in canaries:
        for blob in blobs:
            assert canary not in blob and canary.lower() not in blob
    # the private zone does hold them (so the test would notice a leak there)
    private_blob = (run_dir.private("ingest") / "instructions.parquet").read_bytes()
    assert canaries[0].encode() in private_blob


def test_on_error_fail_names_first_problem(tmp_path):
    data = tmp_path / "mixed.jsonl"
    canaries, _ = mixed_file(data)
    tree = user_tree(tmp_path, data)
    tree["data"]["on_error"] = "fail"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    proc = subprocess.run(
        [sys.executable, "-m", "dpray", "ingest", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 3
    assert "mixed.jsonl:2: invalid_json" in proc.stderr
    assert not any(c in proc.stderr + proc.stdout for c in canaries)
    assert not (tmp_path / "run/private/ingest/instructions.parquet").exists()


def test_user_cap_is_seeded_and_independent_of_other_users(tmp_path):
    rows = [{"id": f"r{k}", "user": "heavy", "text": f"question number {k}"} for k in range(20)]
    other = [{"id": f"o{k}", "user": f"x{k}", "text": f"other {k}"} for k in range(5)]

    def kept(records, seed, name):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        tree = user_tree(tmp_path / name, path)
        tree["seed"] = seed
        config = config_from_tree(tree)
        ingest.run(config, RunDir(config.run_dir))
        table = pq.read_table(RunDir(config.run_dir).private("ingest") / "instructions.parquet")
        return sorted(r["id"] for r in table.to_pylist() if r["user_id"] == "heavy")

    first = kept(rows + other, 0, "a")
    assert len(first) == 3
    assert kept(rows + other, 0, "b") == first  # deterministic
    assert kept(other[:2] + rows, 0, "c") == first  # other users do not change the choice
    assert kept(rows + other, 1, "d") != first  # the seed does


def test_instruction_unit_dedupes_globally_user_unit_within_user(tmp_path):
    records = [
        {"id": "1", "user": "u1", "text": "Same text"},
        {"id": "2", "user": "u2", "text": "same   TEXT"},
        {"id": "3", "user": "u3", "text": "x"},
        {"id": "4", "user": "u4", "text": "y"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    inst = config_from_tree(base_tree(tmp_path / "i", path, user_field="user"))
    assert ingest.run(inst, RunDir(inst.run_dir)).summary["dropped"] == {"duplicate_text": 1}
    user = config_from_tree(user_tree(tmp_path / "u", path))
    assert ingest.run(user, RunDir(user.run_dir)).summary["dropped"] == {}


def test_csv_json_parquet_and_directory(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    with (data / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerow({"id": "c1", "text": "multi\nline, quoted"})
        writer.writerow({"id": "c2", "text": ""})
        writer.writerow({"id": "c3", "text": "third csv row"})
    (data / "b.json").write_text(
        '[\n  {"id": "j1", "text": "json one"},\n  {"id": "j2", "text": 7},\n'
        '  {"id": "j3", "text": "json three"}\n]\n'
    )
    pq.write_table(
        pa.table({"id": ["p1", "p2"], "text": ["parquet one", None]}),
        data / "sub" / "c.parquet",
    )
    (data / "notes.txt").write_text("ignored: not a data file")
    config = config_from_tree(base_tree(tmp_path / "run", data))
    run_dir = RunDir(config.run_dir)
    summary = ingest.run(config, run_dir).summary
    assert summary["rows_in"] == 8
    assert summary["dropped"] == {"empty_text": 1, "wrong_type": 1, "missing_text": 1}
    kept = pq.read_table(run_dir.private("ingest") / "instructions.parquet").column("id")
    assert kept.to_pylist() == ["c1", "c3", "j1", "j3", "p1"]
    problems = [json.loads(x) for x in (run_dir.private("ingest") / "problems.jsonl").open()]
    assert {"source": "a.csv", "line": 4, "reason": "empty_text"} in problems
    assert {"source": "b.json", "line": 3, "reason": "wrong_type"} in problems
    assert {"source": "sub/c.parquet", "row": 2, "reason": "missing_text"} in problems


def test_broken_json_array_reports_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(
        '[\n {"id": "0", "text": "ok"}, {"id": "1", "text": "fine"},\n {"id": "x", "text": "good"},'
        '\n {"id": "2", "text": oops},\n]'
    )
    config = config_from_tree(base_tree(tmp_path / "run", path))
    run_dir = RunDir(config.run_dir)
    summary = ingest.run(config, run_dir).summary
    assert summary["rows_out"] == 3 and summary["dropped"] == {"invalid_json": 1}
    problem = json.loads((run_dir.private("ingest") / "problems.jsonl").read_text())
    assert problem["line"] == 4


def test_too_few_units_is_an_error(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps({"id": "1", "text": "only one"}) + "\n")
    config = config_from_tree(base_tree(tmp_path / "run", path))
    with pytest.raises(ingest.IngestError, match="only 1 valid"):
        ingest.run(config, RunDir(config.run_dir))


def test_real_shared_data(tmp_path):
    from tests.conftest import shared_data

    path = shared_data("oasst_prompts.jsonl")
    config = config_from_tree(base_tree(tmp_path / "run", path, text_field="instruction"))
    summary = ingest.run(config, RunDir(config.run_dir)).summary
    assert summary["rows_out"] + sum(summary["dropped"].values()) == summary["rows_in"]
    assert summary["rows_out"] > 1000
    assert Counter(summary["dropped"]).keys() <= {"duplicate_text", "too_long"}


def test_heldout_split_by_unit(tmp_path):
    records = [{"id": str(i), "user": f"u{i % 40}", "text": f"q{i}"} for i in range(400)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tree = user_tree(tmp_path, path)
    tree["privacy"]["max_records_per_user"] = 20
    tree["data"]["heldout_fraction"] = 0.25
    config = config_from_tree(tree)
    run_dir = RunDir(config.run_dir)
    summary = ingest.run(config, run_dir).summary
    train = pq.read_table(run_dir.private("ingest") / "instructions.parquet").to_pylist()
    held = pq.read_table(run_dir.private("ingest") / "heldout.parquet").to_pylist()
    assert summary["training_rows"] == len(train) and summary["heldout_rows"] == len(held)
    assert len(train) + len(held) == 400
    assert {r["user_id"] for r in train}.isdisjoint({r["user_id"] for r in held})
    assert 0.1 < len(held) / 400 < 0.4
    assert summary["units"] == len({r["user_id"] for r in train})


# ------------------------------------------------------- the private zone is owner-only (#14, 9)
def _loose_paths(root) -> list[str]:
    """Paths under ``root`` (itself included) with any group or other permission bit."""
    import os
    import stat

    loose = []
    for folder, dirs, files in os.walk(root):
        for path in [folder] + [os.path.join(folder, name) for name in dirs + files]:
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
                loose.append(f"{os.path.relpath(path, root)} {stat.S_IMODE(mode):o}")
    return loose


def test_private_zone_is_owner_only_whatever_the_umask(tmp_path, capsys):
    """`dpray ingest` under the common umask 022: private/ is 0700 and nothing under it is
    readable by group or others; the owner still reads the budget."""
    import os
    import stat

    from dpray.cli import main

    data = tmp_path / "mixed.jsonl"
    mixed_file(data)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(user_tree(tmp_path, data)))
    old = os.umask(0o022)
    try:
        assert main(["ingest", str(cfg)]) == 0
        run_dir = RunDir(tmp_path / "run")
        private = run_dir.private_root
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        assert (private / "ingest" / "instructions.parquet").is_file()
        assert (private / "logs" / "dpray.log").is_file()
        assert _loose_paths(private) == []
        assert main(["budget", str(run_dir.root)]) == 0
        assert "remaining" in capsys.readouterr().out
        # a new stage folder, and a private zone left 0755 by an older dpray, are tightened
        private.chmod(0o755)
        RunDir(run_dir.root).private("embed")
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        assert _loose_paths(private) == []
    finally:
        os.umask(old)


def test_private_root_is_0700_even_with_umask_000(tmp_path):
    import os
    import stat

    old = os.umask(0)
    try:
        run_dir = RunDir(tmp_path / "run")
        folder = run_dir.private("train") / "checkpoints"
        folder.mkdir()  # a stage's own mkdir under the umask: the zone root still shuts it in
        assert stat.S_IMODE(run_dir.private_root.stat().st_mode) == 0o700
        assert stat.S_IMODE(run_dir.private("train").stat().st_mode) == 0o700
    finally:
        os.umask(old)


def test_local_ray_session_folder_is_owner_only(tmp_path, monkeypatch):
    """Ray's session folder (worker logs, spilled objects) is 0700 under the common umask, in
    private/.ray or in the cache fallback for long run paths."""
    import os
    import stat

    import ray

    from dpray import runtime

    started = {}

    def fake_init(**kwargs):  # what Ray's node start does to its temp folder: 0777 for sharing
        started.update(kwargs)
        os.chmod(kwargs["_temp_dir"], 0o777)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setenv("DPRAY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = config_from_tree(base_tree(tmp_path / "run", tmp_path / "d.jsonl"))
    run_dir = RunDir(config.run_dir)
    old = os.umask(0o022)
    try:
        runtime.ensure_ray(config, run_dir)
    finally:
        os.umask(old)
    temp_dir = runtime.ray_temp_dir(config, run_dir)
    assert started["_temp_dir"] == str(temp_dir)
    assert stat.S_IMODE(temp_dir.stat().st_mode) == 0o700
    # the long tmp_path puts it in the cache fallback, whose parent shuts it in for good
    assert temp_dir.parent == tmp_path / "cache" / "ray"
    assert stat.S_IMODE(temp_dir.parent.stat().st_mode) == 0o700
