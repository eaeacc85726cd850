"""The shard plan and the files it maps to: numbered draw shards, final output parts.

Work is cut into *draw shards* of ``sample.shard_size`` consecutive draws.  Shard ``k`` holds draws
``k*S .. k*S+S-1`` and is generated from one seed derived from ``(root seed, k)``, so it is the
same file whenever and wherever it is produced.  That one property gives resumability (keep the
shards on disk, make only the missing ones), fault tolerance (a shard lost with its actor is just
made again) and determinism (the final set is a function of the shards, read in order).

Draw shards live in ``RUN_DIR/sample_draws/`` next to ``plan.json``, the settings that shaped
them; when those change the old shards are discarded.  The de-duplicated, exactly-N result is
written as ``RUN_DIR/sample/part-NNNNN.parquet``.  The two are kept in separate folders so each
folder holds Parquet files of one schema (``datasets.load_dataset("parquet", data_dir=...)`` reads
``sample/`` as one table).  Every file is written atomically (temp file + rename), so an
interrupted run leaves only whole shards.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpray.rundir import RunDir, read_json, write_json
from dpray.stages.sample.backends import derive_seed

log = logging.getLogger(__name__)

DRAWS_DIR = "sample_draws"  # a public folder of its own: DP outputs of the generator
LEGACY_DRAWS_DIR = ("sample", "draws")  # where dpray 0.1 kept them, mixed into sample/
PLAN_FILE = "plan.json"
PART_GLOB = "part-*.parquet"
DRAW_GLOB = "draw-*.parquet"

DRAW_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("seed", pa.int64()),
        ("raw", pa.string()),
        ("truncated", pa.bool_()),
        ("text", pa.string()),
        ("drop", pa.string()),
    ]
)
OUTPUT_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("sample_id", pa.int64()),
        ("seed", pa.int64()),
        ("backend", pa.string()),
        ("generator", pa.string()),
    ]
)


def shard_seed(root_seed: int, shard: int) -> int:
    return derive_seed(root_seed, "shard", shard)


def shard_task(root_seed: int, shard: int, shard_size: int) -> dict:
    """One row of the Ray Data input: which draws to make and from which seed."""
    return {
        "shard": shard,
        "start": shard * shard_size,
        "count": shard_size,
        "seed": shard_seed(root_seed, shard),
    }


def draws_folder(run_dir: RunDir) -> Path:
    """``RUN_DIR/sample_draws/``; a run dir of an older dpray has its shards moved there from
    ``sample/draws/`` (same files, so a resumed run reuses them and ``sample/`` holds one
    schema again)."""
    folder = run_dir.root / DRAWS_DIR
    legacy = run_dir.root.joinpath(*LEGACY_DRAWS_DIR)
    if legacy.is_dir() and not folder.exists():
        os.replace(legacy, folder)
        log.info("sample: moved the draw shards of an older run to %s/", DRAWS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def draw_files(run_root: Path) -> list[Path]:
    """The draw shards of a finished run, in shard order (readers outside the stage: benchmarks,
    which also read run dirs an older dpray wrote)."""
    for folder in (run_root / DRAWS_DIR, run_root.joinpath(*LEGACY_DRAWS_DIR)):
        if folder.is_dir():
            return sorted(folder.glob(DRAW_GLOB))
    return []


def write_table_atomic(table: pa.Table, path: Path) -> Path:
    """Parquet write to a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class DrawStore:
    """The draw shards of one sampling plan in ``RUN_DIR/sample_draws/``."""

    def __init__(self, folder: Path, plan: dict) -> None:
        self.folder = folder
        self.plan = plan
        folder.mkdir(parents=True, exist_ok=True)
        self._reset_if_plan_changed()

    def _reset_if_plan_changed(self) -> None:
        plan_path = self.folder / PLAN_FILE
        previous = read_json(plan_path) if plan_path.exists() else None
        if previous != self.plan:
            stale = sorted(self.folder.glob(DRAW_GLOB))
            if stale:
                log.info("sample: sampling settings changed; discarding %d draw shards", len(stale))
            for path in stale:
                path.unlink()
            write_json(plan_path, self.plan)
        for leftover in self.folder.glob(".draw-*.tmp"):  # from a run killed mid-write
            leftover.unlink(missing_ok=True)

    def path(self, shard: int) -> Path:
        return self.folder / f"draw-{shard:06d}.parquet"

    def has(self, shard: int) -> bool:
        return self.path(shard).exists()

    def missing(self, shards: range) -> list[int]:
        return [k for k in shards if not self.has(k)]

    def write(self, shard: int, rows: dict[str, list]) -> Path:
        order = sorted(range(len(rows["sample_id"])), key=lambda i: rows["sample_id"][i])
        columns = {name: [rows[name][i] for i in order] for name in DRAW_SCHEMA.names}
        return write_table_atomic(pa.table(columns, schema=DRAW_SCHEMA), self.path(shard))

    def read(self, shard: int) -> pa.Table:
        return pq.read_table(self.path(shard), schema=DRAW_SCHEMA)


def write_parts(folder: Path, rows: dict[str, list], part_size: int) -> list[Path]:
    """Write the final rows as ``part-NNNNN.parquet`` files; remove parts left from older runs."""
    total = len(rows["text"])
    paths = []
    for index, start in enumerate(range(0, total, part_size)):
        chunk = {name: rows[name][start : start + part_size] for name in OUTPUT_SCHEMA.names}
        table = pa.table(chunk, schema=OUTPUT_SCHEMA)
        paths.append(write_table_atomic(table, folder / f"part-{index:05d}.parquet"))
    keep = set(paths)
    for old in folder.glob(PART_GLOB):
        if old not in keep:
            old.unlink()
    return paths
