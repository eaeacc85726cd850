"""Leak scan: does any private instruction's text appear in a file outside ``private/``?

Everything outside ``RUN_DIR/private/`` is promised to be safe to hand to an annotator.  This scan
checks the promise directly: it indexes every private instruction (training and held-out) by
hashed token n-grams, then reads every public file (Parquet string cells, JSON string values,
any other file as text) and counts

* **exact** matches: a whole string value equal to a private instruction (after whitespace and
  case normalisation) — catches short instructions a substring check would miss;
* **substring** matches: a run of at least ``min_tokens`` consecutive tokens of some private
  instruction.

Matches inside synthetic generations (``sample/``, ``filter/``, ``annotate/``) are reported as
*memorisation*: the DP generator reproducing training text, which DP bounds but cannot forbid for
common phrases.  Matches anywhere else are *leaks*, a bug.  The report holds counts only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from dpray.rundir import RunDir

TOKEN = re.compile(r"\w+", re.UNICODE)
GENERATION_DIRS = ("sample", "filter", "annotate")
PRIVATE_TABLES = ("ingest/instructions.parquet", "ingest/heldout.parquet")


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.casefold())


def _digest(parts: Iterable[str]) -> bytes:
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()


@dataclass
class PrivateIndex:
    """Hashed n-grams and whole normalised texts of the private instructions (kept in memory)."""

    min_tokens: int
    ngrams: set[bytes] = field(default_factory=set)
    wholes: set[bytes] = field(default_factory=set)
    size: int = 0

    def add(self, text: str) -> None:
        toks = tokens(text)
        if not toks:
            return
        self.size += 1
        self.wholes.add(_digest(toks))
        for start in range(len(toks) - self.min_tokens + 1):
            self.ngrams.add(_digest(toks[start : start + self.min_tokens]))

    def exact(self, value: str) -> bool:
        toks = tokens(value)
        return bool(toks) and _digest(toks) in self.wholes

    def substrings(self, value: str) -> int:
        """Number of windows of ``min_tokens`` tokens of ``value`` found in a private text."""
        toks = tokens(value)
        return sum(
            _digest(toks[i : i + self.min_tokens]) in self.ngrams
            for i in range(len(toks) - self.min_tokens + 1)
        )


class ScanInputError(RuntimeError):
    """The scan has nothing to compare against: no run directory, or no or an empty private
    index.  Never a pass: a scan over an empty index reports 0 leaks for anything."""


def open_run_dir(path: str | Path) -> RunDir:
    """An existing run directory with a private index, for a scan; creates nothing."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ScanInputError(f"{root}: no such run directory (nothing was scanned)")
    if not any((root / "private" / name).is_file() for name in PRIVATE_TABLES):
        raise ScanInputError(_no_index(root))
    return RunDir(root)


def _no_index(root: Path) -> str:
    return (
        f"{root}: no private index ({root / 'private' / PRIVATE_TABLES[0]} is missing): not a "
        "run directory, or `dpray ingest` has not run (nothing was scanned)"
    )


def build_index(run_dir: RunDir, min_tokens: int) -> PrivateIndex:
    """Index the private instructions; :class:`ScanInputError` if there are none."""
    index = PrivateIndex(min_tokens)
    tables = [run_dir.private_root / name for name in PRIVATE_TABLES]
    if not any(path.is_file() for path in tables):
        raise ScanInputError(_no_index(run_dir.root))
    for path in tables:
        if path.is_file():
            for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
                if text:
                    index.add(text)
    if index.size == 0:
        raise ScanInputError(
            f"{run_dir.root}: the private index under private/ingest/ is empty (0 instructions "
            "with words): nothing to compare against (nothing was scanned)"
        )
    return index


def _json_strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _json_strings(key)
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


SNIFF_BYTES = 8192
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def is_binary(path: Path) -> bool:
    """A NUL byte in the first 8 KiB: weights, archives, images (text files have none)."""
    with path.open("rb") as handle:
        return b"\x00" in handle.read(SNIFF_BYTES)


def safetensors_header(path: Path) -> dict | None:
    """The JSON header of a ``.safetensors`` file (tensor index and ``__metadata__``), or None.

    The rest of the file is raw tensor data; the header is the only place text can sit.
    """
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size <= MAX_SAFETENSORS_HEADER:
            return None
        try:
            return json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None


def printable_runs(path: Path, min_chars: int) -> Iterator[str]:
    """Runs of at least ``min_chars`` printable ASCII characters in a binary file (like ``strings``).

    Pickled checkpoints, zip archives and the like keep their strings as plain bytes; a run of
    ``min_tokens`` words needs at least ``2 * min_tokens - 1`` characters, so shorter runs cannot
    hold a match.  (ASCII only: a UTF-8-aware pattern is five times slower on weight files, and
    non-ASCII text still leaves its ASCII stretches to be matched.)
    """
    import mmap

    if path.stat().st_size == 0:
        return
    pattern = re.compile(rb"[\t\n\r\x20-\x7e]{%d,}" % max(1, min_chars))
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for match in pattern.finditer(mm):
            yield match.group().decode("ascii")


def strings_of(path: Path, min_tokens: int = 12) -> Iterator[tuple[str, bool]]:
    """(string, is_structured_value) pairs of a file: cells, JSON values, or the whole text.

    Binary files give their ``.safetensors`` header values or their printable runs: decoding
    hundreds of megabytes of weights as text would find nothing and take minutes.
    """
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        header = safetensors_header(path)
        if header is not None:
            for value in _json_strings(header):
                yield value, True
            return
    if suffix != ".parquet" and is_binary(path):
        for run in printable_runs(path, 2 * min_tokens - 1):
            yield run, False
        return
    if suffix == ".parquet":
        table = pq.read_table(path)
        for column in table.columns:
            if str(column.type) in ("string", "large_string"):
                for value in column.to_pylist():
                    if value:
                        yield value, True
        return
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="ignore")
    if suffix in (".json", ".jsonl"):
        try:
            docs = (
                [json.loads(text)]
                if suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()]
            )
        except json.JSONDecodeError:
            docs = None
        if docs is not None:
            for doc in docs:
                for value in _json_strings(doc):
                    yield value, True
            return
    yield text, False


@dataclass
class LeakReport:
    files_scanned: int
    private_texts: int
    min_tokens: int
    leaks: dict[str, int]
    memorised: dict[str, int]

    @property
    def leak_count(self) -> int:
        return sum(self.leaks.values())

    def to_dict(self) -> dict:
        return {
            "files_scanned": self.files_scanned,
            "private_texts_indexed": self.private_texts,
            "min_tokens": self.min_tokens,
            "leaks_total": self.leak_count,
            "leaks_by_file": self.leaks,
            "memorised_total": sum(self.memorised.values()),
            "memorised_by_file": self.memorised,
        }


def scan(run_dir: RunDir, min_tokens: int = 12, extra_files: Iterable[Path] = ()) -> LeakReport:
    """Scan every public file of ``run_dir`` (plus ``extra_files``, e.g. logs) for private text."""
    index = build_index(run_dir, min_tokens)
    leaks: Counter[str] = Counter()
    memorised: Counter[str] = Counter()
    files = [p for p in run_dir.public_files() if p.name != "leaks.json"] + list(extra_files)
    for path in files:
        rel = (
            str(path.relative_to(run_dir.root)) if path.is_relative_to(run_dir.root) else str(path)
        )
        generated = rel.split("/", 1)[0] in GENERATION_DIRS and path.suffix == ".parquet"
        hits = 0
        for value, structured in strings_of(path, min_tokens):
            if structured and index.exact(value):
                hits += 1
            else:
                hits += index.substrings(value) > 0
        if hits:
            (memorised if generated else leaks)[rel] += hits
    return LeakReport(len(files), index.size, min_tokens, dict(leaks), dict(memorised))
