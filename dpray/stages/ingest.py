"""Ingest: read the private instructions, validate every record, dedupe, cap per user.

Reads ``data.path``; writes ``RUN_DIR/private/ingest/instructions.parquet`` (id, text, user_id) and, with
``data.heldout_fraction``, ``private/ingest/heldout.parquet`` (evaluation only, never trained on),
the same training records cut into partitions (silos), one file each, for the training workers
(``private/ingest/partitions/``, see :mod:`dpray.io.partitions`), the public counts-only report
``RUN_DIR/ingest/report.json``, the private list of problem locations
``RUN_DIR/private/ingest/problems.jsonl``, and opens the privacy ledger with the target
(epsilon, delta) where delta defaults to 1/(n ln n) for the n privacy units kept.  The report's
counts (n among them) are released without noise: see the threat model in the README.

Bad records are named by file and line plus a reason code, never by their text.  With
``data.on_error: skip`` they are dropped and counted; with ``fail`` the first one stops the run.
The invariant "rows out = rows in - counted drops" is checked before anything is written.

Why dedupe within users at user level: a global cross-user dedupe would let one user's presence
remove another user's record, so one user could change other users' data (sensitivity > 1 user).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, OrderedDict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpray.config import DprayConfig
from dpray.io import partitions as parts
from dpray.io.readers import EXTENSIONS, RawRow, iter_rows
from dpray.privacy.ledger import Ledger
from dpray.privacy.redact import describe
from dpray.rundir import RunDir, write_json
from dpray.stages.base import Stage, StageResult, register

log = logging.getLogger(__name__)

# Reasons a record is rejected as bad input (besides the reader's invalid_utf8/json/csv).
MISSING_TEXT = "missing_text"
WRONG_TYPE = "wrong_type"
INVALID_UTF8 = "invalid_utf8"
EMPTY_TEXT = "empty_text"
TOO_LONG = "too_long"
MISSING_ID = "missing_id"
DUPLICATE_ID = "duplicate_id"
MISSING_USER = "missing_user"
MISSING_PARTITION = "missing_partition"
PARTITION_CONFLICT = "partition_conflict"
# Records dropped by policy (valid input, removed on purpose).
DUPLICATE_TEXT = "duplicate_text"
USER_CAP = "user_cap"
POLICY_DROPS = (DUPLICATE_TEXT, USER_CAP)

SHOWN_PROBLEMS = 20


class IngestError(ValueError):
    """Raised with ``on_error: fail``; the message is ``file:line: reason``, never the text."""


def _as_key(value: object) -> str | None:
    """An id or user id as a string; None when it has an unusable type."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str | int):
        return str(value)
    return None


def _check_text(value: object, max_chars: int) -> tuple[str | None, str | None]:
    """Return (text, None) for a good text, else (None, reason)."""
    if value is None:
        return None, MISSING_TEXT
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, INVALID_UTF8
    if not isinstance(value, str):
        return None, WRONG_TYPE
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. "\udc80" escapes in JSON
        return None, INVALID_UTF8
    if not value.strip():
        return None, EMPTY_TEXT
    if len(value) > max_chars:
        return None, TOO_LONG
    return value, None


def normalise(text: str) -> str:
    """The key for near-duplicates: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


class _Collector:
    """Counts every row and every drop by reason; keeps problem locations for the private log."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self.rows_in = 0
        self.drops: Counter[str] = Counter()
        self.problems: list[dict] = []

    def reject(self, row: RawRow, reason: str) -> None:
        where = describe(row.source, row.line, reason, row.unit)
        if self.on_error == "fail" and reason not in POLICY_DROPS:
            raise IngestError(f"{where} (data.on_error=fail; nothing was written)")
        self.drops[reason] += 1
        self.problems.append({"source": row.source, row.unit: row.line, "reason": reason})


def _labelled_rows(config: DprayConfig):
    """``(row, silo)`` for every input row: the silo is the path's index for a list of paths."""
    data = config.data
    if isinstance(data.path, list):
        for k, path in enumerate(data.path):
            for row in iter_rows(path, data.format):
                yield row, k
    else:
        for row in iter_rows(data.path, data.format):
            yield row, None


def _validate(config: DprayConfig, rows, collector: _Collector) -> list[dict]:
    data, privacy = config.data, config.privacy
    seen_ids: set[str] = set()
    silo_of_user: dict[str, object] = {}
    kept: list[dict] = []
    for row, silo in rows:
        collector.rows_in += 1
        if row.error:
            collector.reject(row, row.error)
            continue
        fields = row.fields or {}
        text, reason = _check_text(fields.get(data.text_field), data.max_chars)
        if reason:
            collector.reject(row, reason)
            continue
        if data.id_field:
            raw_id = fields.get(data.id_field)
            record_id = _as_key(raw_id)
            if record_id is None:
                collector.reject(row, MISSING_ID if raw_id is None else WRONG_TYPE)
                continue
            if record_id in seen_ids:
                collector.reject(row, DUPLICATE_ID)
                continue
            seen_ids.add(record_id)
        else:
            record_id = f"{row.source}:{row.line}"
        user_id = None
        if data.user_field:
            raw_user = fields.get(data.user_field)
            user_id = _as_key(raw_user)
            if raw_user is not None and user_id is None:
                collector.reject(row, WRONG_TYPE)
                continue
            if user_id is not None and not user_id.strip():
                user_id = None
        if user_id is None:
            if privacy.unit == "user":
                collector.reject(row, MISSING_USER)
                continue
            user_id = record_id
        if data.partition_field:
            raw_silo = fields.get(data.partition_field)
            silo = _as_key(raw_silo)
            if silo is None:
                collector.reject(row, MISSING_PARTITION if raw_silo is None else WRONG_TYPE)
                continue
        # each user in exactly one partition: the silo of the user's first record
        if silo is not None and silo_of_user.setdefault(user_id, silo) != silo:
            collector.reject(row, PARTITION_CONFLICT)
            continue
        kept.append({"id": record_id, "text": text, "user_id": user_id, "_row": row, "_silo": silo})
    return kept


def _dedupe(records: list[dict], per_user: bool, collector: _Collector) -> list[dict]:
    seen: set[tuple[str, str]] = set()
    out = []
    for record in records:
        key = (record["user_id"] if per_user else "", normalise(record["text"]))
        if key in seen:
            collector.reject(record["_row"], DUPLICATE_TEXT)
            continue
        seen.add(key)
        out.append(record)
    return out


def _cap_users(records: list[dict], cap: int, seed: int, collector: _Collector) -> list[dict]:
    """Keep at most ``cap`` random records per user.

    Each user's choice uses an RNG seeded by (seed, user id) alone, so which records of a user
    survive never depends on other users' data.
    """
    by_user: OrderedDict[str, list[int]] = OrderedDict()
    for index, record in enumerate(records):
        by_user.setdefault(record["user_id"], []).append(index)
    keep: set[int] = set()
    for user, indices in by_user.items():
        if len(indices) <= cap:
            keep.update(indices)
            continue
        digest = hashlib.sha256(f"{seed}:{user}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        keep.update(rng.sample(indices, cap))
    out = []
    for index, record in enumerate(records):
        if index in keep:
            out.append(record)
        else:
            collector.reject(record["_row"], USER_CAP)
    return out


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    """Validate, dedupe and cap the private instructions; open the ledger."""
    collector = _Collector(config.data.on_error)
    records = _validate(config, _labelled_rows(config), collector)
    silos = _silos(config, records)
    user_level = config.privacy.unit == "user"
    if config.data.dedupe:
        records = _dedupe(records, per_user=user_level, collector=collector)
    if user_level:
        records = _cap_users(records, config.privacy.max_records_per_user, config.seed, collector)

    dropped = sum(collector.drops.values())
    if len(records) != collector.rows_in - dropped:  # the "nothing valid is lost" invariant
        raise AssertionError("ingest lost records without counting them")
    records, heldout = _split_heldout(records, config.data.heldout_fraction, config.seed)
    units = len({r["user_id"] for r in records}) if user_level else len(records)
    if units < 3:
        raise IngestError(f"{_source_name(config)}: only {units} valid privacy units remain")
    private = run_dir.private("ingest")
    out_path = private / "instructions.parquet"
    pq.write_table(_table(records), out_path)
    heldout_path = private / "heldout.parquet"
    pq.write_table(_table(heldout), heldout_path)
    manifest = _write_partitions(config, private / parts.DIRNAME, records, silos)
    _write_problems(private / "problems.jsonl", collector.problems)

    delta = config.privacy.resolve_delta(units)
    ledger = Ledger.create(run_dir.ledger_path, config.privacy.unit, config.privacy.epsilon, delta)
    report = {
        "rows_in": collector.rows_in,
        "rows_out": len(records) + len(heldout),
        "training_rows": len(records),
        "heldout_rows": len(heldout),
        "dropped": dict(sorted(collector.drops.items())),
        "privacy_unit": config.privacy.unit,
        "units": units,
        "delta": ledger.target_delta,
    }
    report_path = write_json(run_dir.public("ingest") / "report.json", report)
    _log_summary(collector, report)
    return StageResult(
        outputs={
            "instructions": str(out_path),
            "heldout": str(heldout_path),
            "partitions": str(private / parts.DIRNAME / parts.MANIFEST),
            "report": str(report_path),
        },
        summary={**report, "partitions": manifest["count"], "partitioned_by": manifest["by"]},
    )


def _source_name(config: DprayConfig) -> str:
    paths = config.data.paths
    return paths[0] if len(paths) == 1 else f"{len(paths)} silo paths"


def _silos(config: DprayConfig, records: list[dict]) -> list | None:
    """The partitions' silo names in partition order (None: partitions by keyed hash)."""
    if isinstance(config.data.path, list):
        return list(range(len(config.data.path)))
    if config.data.partition_field:
        return sorted({r["_silo"] for r in records})
    return None


def _write_partitions(
    config: DprayConfig, directory: Path, records: list[dict], silos: list | None
) -> dict:
    """Cut the training records into partitions, each user in exactly one (see
    :mod:`dpray.io.partitions`); held-out records are in none."""
    unit = config.privacy.unit
    if silos is None:
        count = config.hash_partitions
        key = parts.partition_key(config.seed)
        assignment = [parts.hash_partition(r["user_id"], key, count) for r in records]
        return parts.write_partitions(directory, records, assignment, count, by="hash", unit=unit)
    index = {silo: k for k, silo in enumerate(silos)}
    assignment = [index[r["_silo"]] for r in records]
    by = "path" if isinstance(config.data.path, list) else "field"
    names = config.data.paths if by == "path" else [str(s) for s in silos]
    return parts.write_partitions(
        directory, records, assignment, len(silos), by=by, unit=unit, names=names
    )


def _table(records: list[dict]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([r["id"] for r in records], pa.string()),
            "text": pa.array([r["text"] for r in records], pa.string()),
            "user_id": pa.array([r["user_id"] for r in records], pa.string()),
        }
    )


def _split_heldout(
    records: list[dict], fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Hold out whole privacy units (users; or records) for evaluation, chosen per unit by hash.

    The choice for a unit depends only on (seed, unit id), so it never depends on other units.
    """
    if fraction <= 0:
        return records, []
    keep, held = [], []
    for record in records:
        digest = hashlib.sha256(f"heldout:{seed}:{record['user_id']}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        (held if draw < fraction else keep).append(record)
    return keep, held


def _write_problems(path: Path, problems: list[dict]) -> None:
    import json

    with path.open("w") as handle:
        for problem in problems:
            handle.write(json.dumps(problem) + "\n")


def _log_summary(collector: _Collector, report: dict) -> None:
    log.info("ingest: %d rows in, %d kept", report["rows_in"], report["rows_out"])
    for reason, count in sorted(collector.drops.items()):
        log.info("ingest: dropped %d (%s)", count, reason)
    bad = [p for p in collector.problems if p["reason"] not in POLICY_DROPS]
    for problem in bad[:SHOWN_PROBLEMS]:
        unit = "line" if "line" in problem else "row"
        log.warning(
            "ingest: skipped %s",
            describe(problem["source"], problem[unit], problem["reason"], unit),
        )
    if len(bad) > SHOWN_PROBLEMS:
        log.warning(
            "ingest: ... %d more problems listed in private/ingest/problems.jsonl",
            len(bad) - SHOWN_PROBLEMS,
        )


def _data_files(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    files: list[Path] = []
    for path in config.data.paths:
        if "://" in path:
            continue
        root = Path(path).expanduser()
        if root.is_dir():
            files += sorted(
                p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
            )
        elif root.exists():
            files.append(root)
    return files


STAGE = register(
    Stage(
        name="ingest",
        run=run,
        help="Validate, dedupe and cap the private instructions.",
        reads="data.path (JSONL, JSON, CSV, Parquet, a directory of them, hf://, demo://)",
        writes="private/ingest/instructions.parquet, private/ingest/partitions/ (one file per "
        "silo), private/ingest/problems.jsonl, ingest/report.json (counts only), ledger.json "
        "(target)",
        sections=("data", "privacy", "seed", "hash_partitions"),
        inputs=_data_files,
    )
)
