"""Readers for instruction files: JSONL, JSON arrays, CSV, Parquet, directories, hf://, demo://.

Readers never judge a record's *content*; they only turn bytes into field dictionaries and say
where each came from (file and line, or row).  A row that cannot even be parsed (bad UTF-8, bad
JSON) is yielded with an ``error`` reason instead of fields, so the caller counts it and goes on:
one broken line never costs the valid lines around it.  No reader ever puts record text into an
exception or log message.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

# Reasons a row could not be read at all (content reasons live in dpray.stages.ingest).
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
WRONG_TYPE = "wrong_type"
INVALID_CSV = "invalid_csv"

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class SourceError(ValueError):
    """A whole source is unusable (missing path, unknown format, unreachable hub)."""


@dataclass(frozen=True)
class RawRow:
    """One record as read: its location, and either its fields or why it could not be read."""

    source: str
    line: int
    unit: str  # "line" for text formats, "row" for tabular/array ones
    fields: dict | None = None
    error: str | None = None


def iter_rows(path: str, fmt: str = "auto") -> Iterator[RawRow]:
    """Yield every row of ``path`` (file, directory, ``hf://NAME[:split]``, ``demo://``)."""
    if path.startswith("hf://"):
        yield from _read_hf(path)
        return
    if path.startswith("demo://"):
        yield from _read_demo(path)
        return
    root = Path(path).expanduser()
    if not root.exists():
        raise SourceError(f"data.path does not exist: {root}")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not files:
            known = ", ".join(sorted(EXTENSIONS))
            raise SourceError(f"{root}: directory holds no data files ({known})")
        for file in files:
            yield from _read_file(file, str(file.relative_to(root)), fmt)
    else:
        yield from _read_file(root, root.name, fmt)


def _read_file(path: Path, name: str, fmt: str) -> Iterator[RawRow]:
    kind = fmt if fmt != "auto" else EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise SourceError(f"{path}: unknown file type (set data.format)")
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
    yield from reader[kind](path, name)


def _decode_json_line(raw: bytes, name: str, line: int) -> RawRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return RawRow(name, line, "line", error=INVALID_UTF8)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return RawRow(name, line, "line", error=INVALID_JSON)
    if not isinstance(value, dict):
        return RawRow(name, line, "line", error=WRONG_TYPE)
    return RawRow(name, line, "line", fields=value)


def _read_jsonl(path: Path, name: str) -> Iterator[RawRow]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue  # blank lines separate nothing and hold no record
            yield _decode_json_line(raw, name, number)


def _read_json(path: Path, name: str) -> Iterator[RawRow]:
    """A JSON array of objects (elements located by line), or JSON Lines misnamed ``.json``."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield RawRow(name, data.count(b"\n", 0, exc.start) + 1, "line", error=INVALID_UTF8)
        return
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        yield from _read_jsonl(path, name)
        return
    decoder = json.JSONDecoder()
    pos, line, seen = start + 1, 1 + text.count("\n", 0, start), start
    while True:
        pos = _skip_ws(text, pos)
        if pos >= len(text):
            yield RawRow(name, line + text.count("\n", seen, pos), "line", error=INVALID_JSON)
            return
        if text[pos] == "]":
            return
        line += text.count("\n", seen, pos)
        seen = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            # The array is broken here; what follows cannot be located reliably.
            yield RawRow(name, line, "line", error=INVALID_JSON)
            return
        if isinstance(value, dict):
            yield RawRow(name, line, "line", fields=value)
        else:
            yield RawRow(name, line, "line", error=WRONG_TYPE)
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            yield RawRow(name, line + text.count("\n", seen, pos), "line", error=INVALID_JSON)
            return


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(path: Path, name: str) -> Iterator[RawRow]:
    csv.field_size_limit(sys.maxsize)
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                line = reader.line_num
                if any(_has_surrogate(v) for v in row.values() if isinstance(v, str)):
                    yield RawRow(name, line, "line", error=INVALID_UTF8)
                    continue
                fields = {k: v for k, v in row.items() if k is not None}
                yield RawRow(name, line, "line", fields=fields)
        except csv.Error:
            yield RawRow(name, reader.line_num, "line", error=INVALID_CSV)


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_parquet(path: Path, name: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for fields in batch.to_pylist():
            row += 1
            yield RawRow(name, row, "row", fields=fields)


def _read_hf(path: str) -> Iterator[RawRow]:
    spec = path[len("hf://") :]
    dataset_name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets ships with trl
        raise SourceError("hf:// sources need the `datasets` package") from exc
    try:
        dataset = datasets.load_dataset(dataset_name, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - hub errors vary; name only the class
        raise SourceError(
            f"{path}: could not load from the Hugging Face hub ({exc.__class__.__name__}); "
            "with no hub access, download it elsewhere and point data.path at the files"
        ) from None
    for row, fields in enumerate(dataset, start=1):
        yield RawRow(path, row, "row", fields=dict(fields))


def _read_demo(path: str) -> Iterator[RawRow]:
    from dpray.demo.corpus import generate_demo_records

    query = parse_qs(urlparse(path).query)
    n = int(query.get("n", ["3000"])[0])
    seed = int(query.get("seed", ["0"])[0])
    for row, record in enumerate(generate_demo_records(n=n, seed=seed), start=1):
        yield RawRow("demo", row, "row", fields=record)
