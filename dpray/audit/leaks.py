"""Leak scan: does any private instruction's text appear in a file outside ``private/``?

Everything outside ``RUN_DIR/private/`` is promised to be safe to hand to an annotator.  This scan
checks the promise directly: it indexes every private instruction (training and held-out) by
hashed token n-grams, then reads every public file (Parquet string cells, JSON string values,
any other file as text) and counts

* **exact** matches: a whole string value equal to a private instruction (after whitespace and
  case normalisation) — catches short instructions a substring check would miss;
* **substring** matches: a run of at least ``min_tokens`` consecutive tokens of some private
  instruction.

Matches inside synthetic generations (Parquet files under ``sample/``, ``filter/``,
``annotate/``, and ``generator/`` -- private evolution's candidates and kept population) are
reported as
*memorisation*: the DP generator reproducing training text, which DP bounds but cannot forbid for
common phrases.  Matches anywhere else are *leaks*, a bug.  The report holds counts only.

A match of text that already stands in the run's *public inputs* is *public origin*, neither:
fine-tuned model folders carry the base model's tokenizer, whose vocabulary holds short strings
("hello") that short private prompts ("hello!") equal after normalisation.  The public inputs
are the base/teacher/student/judge model folders (from the config, the run's own model records,
and the packaged defaults, when already on disk), the evaluation set ``evaluate.data_path``, and
shipped templates.  Their normalised strings are hashed once per scan with the same normaliser,
keeping only hashes a private text also has; a value is public origin when its exact match, or
every matching window of its substring matches, stands in them.  Counted apart, never failing.

The scan also knows the files in which dpray writes **statistics of real records that no DP
mechanism released** (:data:`NONDP_STATISTICS`: the filter's held-out metrics and plot, win rates
on private instructions, the membership audit, per-step times of DP training).  They belong under
``private/``; found outside it (an older dpray, a hand copy, a bug) each is a leak.  Record counts
released by design (``ingest/report.json``, units in ``generator/generator.json``) are not listed:
the README's threat model states them as released.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from dpray.rundir import RunDir

if TYPE_CHECKING:
    from dpray.config import DprayConfig

log = logging.getLogger(__name__)

TOKEN = re.compile(r"\w+", re.UNICODE)
GENERATION_DIRS = (
    "sample",
    "sample_draws",
    "filter",
    "annotate",
    "generator",
    "generator_rounds",
    "generator_draws",
)
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
        return len(self.matching_windows(tokens(value)))

    def matching_windows(self, toks: list[str]) -> list[bytes]:
        """Hashes of the windows of ``min_tokens`` tokens of ``toks`` found in a private text."""
        found = []
        for i in range(len(toks) - self.min_tokens + 1):
            digest = _digest(toks[i : i + self.min_tokens])
            if digest in self.ngrams:
                found.append(digest)
        return found


@dataclass
class PublicOrigin:
    """Hashed normalised strings of the run's public inputs that a private text also has.

    Built against a :class:`PrivateIndex`: only the intersection is kept, which is all the scan
    needs to tell a public-origin match from a leak, and stays small whatever the inputs' size.
    """

    private: PrivateIndex
    wholes: set[bytes] = field(default_factory=set)
    ngrams: set[bytes] = field(default_factory=set)
    files: int = 0

    def add(self, text: str, whole: bool = True) -> None:
        toks = tokens(text)
        if not toks:
            return
        if whole:
            digest = _digest(toks)
            if digest in self.private.wholes:
                self.wholes.add(digest)
        self.ngrams.update(self.private.matching_windows(toks))

    def add_file(self, path: Path) -> None:
        for value, structured in public_strings(path, self.private.min_tokens):
            self.add(value, whole=structured)
        self.files += 1

    def covers_whole(self, toks: list[str]) -> bool:
        """The whole value stands in a public input (as a value, or window by window)."""
        if _digest(toks) in self.wholes:
            return True
        windows = self.private.matching_windows(toks)
        return bool(windows) and all(w in self.ngrams for w in windows)

    def covers_windows(self, windows: list[bytes]) -> bool:
        return all(w in self.ngrams for w in windows)


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


MAX_PUBLIC_FILES_PER_DIR = 2000
MAX_PUBLIC_TEXT_BYTES = 256 * 1024 * 1024
PUBLIC_TABLE_SUFFIXES = (".csv", ".tsv")


def public_strings(path: Path, min_tokens: int) -> Iterator[tuple[str, bool]]:
    """(string, is_whole_value) pairs of a public input file.

    Like :func:`strings_of`, plus: CSV cells and the lines of plain text files are whole values
    (a vocabulary file, a prompt list); binary files other than ``.safetensors`` (weights) and
    huge files are skipped -- they are indexed to excuse matches, so skipping is the strict side.
    """
    suffix = path.suffix.lower()
    try:
        size = path.stat().st_size
        if size > MAX_PUBLIC_TEXT_BYTES and suffix != ".safetensors":
            return
        if suffix not in (".safetensors", ".parquet") and is_binary(path):
            return
        if suffix in PUBLIC_TABLE_SUFFIXES:
            text = path.read_bytes().decode("utf-8", errors="ignore")
            delimiter = "\t" if suffix == ".tsv" else ","
            for row in csv.reader(io.StringIO(text), delimiter=delimiter):
                for cell in row:
                    yield cell, True
            return
        for value, structured in strings_of(path, min_tokens):
            yield value, structured
            if not structured:
                for line in value.splitlines():
                    yield line, True
    except (OSError, ValueError) as exc:  # unreadable: not indexed (the strict side)
        log.warning("leak scan: public input %s not indexed (%s)", path, exc.__class__.__name__)


@dataclass(frozen=True)
class PublicInputs:
    """What a run reads that is public: model folders and files, and template texts."""

    files: tuple[Path, ...] = ()
    texts: tuple[str, ...] = ()


# Config keys naming a model (a causal LM, reward model or encoder spec, or a folder).
MODEL_KEYS = (
    ("train", "model"),
    ("annotate", "teacher"),
    ("annotate", "student"),
    ("annotate", "judge_model"),
    ("sft", "model"),
    ("reward", "model"),
    ("reward", "pretrained"),
    ("ppo", "policy"),
    ("ppo", "reward_model"),
    ("evaluate", "base_model"),
    ("evaluate", "judge_model"),
    ("embed", "model"),
)
# Config keys holding fixed public prompt text (sections a config lacks are skipped).
TEMPLATE_KEYS = (
    ("train", "template"),
    ("annotate", "system_prompt"),
    ("generator", "system"),
    ("generator", "request"),
)
# Config keys naming a public text file (e.g. a topic list); "builtin"-style words are skipped.
PUBLIC_FILE_KEYS = (("generator", "topics"),)
# Public JSON files of a run that record the model a run output was made from.
MODEL_RECORDS = ("generator/generator.json", "*/*/dpray_model.json", "*/dpray_model.json")


def _config_models(config) -> list[str]:
    specs = []
    for section, key in MODEL_KEYS:
        value = getattr(getattr(config, section, None), key, None)
        if isinstance(value, str) and value:
            specs.append(value)
    return specs


def _recorded_models(run_dir: RunDir) -> list[str]:
    specs = []
    for pattern in MODEL_RECORDS:
        for path in run_dir.root.glob(pattern):
            if run_dir.is_private(path):
                continue
            try:
                value = json.loads(path.read_text()).get("base_model")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(value, str) and value:
                specs.append(value)
    return specs


def _template_texts(config) -> list[str]:
    texts = []
    try:
        from dpray.stages.align.judges import JUDGE_TEMPLATE

        texts.extend(re.split(r"\{[a-z_]+\}", JUDGE_TEMPLATE))
    except ImportError:  # pragma: no cover - the align extras are part of the install
        pass
    for section, key in TEMPLATE_KEYS if config is not None else ():
        value = getattr(getattr(config, section, None), key, None)
        if isinstance(value, str) and value:
            texts.append(value)
    return texts


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    files = []
    for item in sorted(path.rglob("*")):
        if item.is_file():
            files.append(item)
            if len(files) >= MAX_PUBLIC_FILES_PER_DIR:
                break
    return files


def public_inputs(run_dir: RunDir, config: DprayConfig | None = None) -> PublicInputs:
    """The run's public inputs: model folders named by the config, by the run's own model records
    (``base_model`` in ``generator/generator.json`` and ``*/dpray_model.json``) and the packaged
    defaults -- each only if already on disk, nothing is converted or built -- the public
    evaluation set ``evaluate.data_path``, public prompt files, the shipped configs and data
    (``dpray/configs``, ``dpray/data``) and the prompt templates.

    Anything inside the run directory is a run output, not an input, and anything overlapping
    ``data.path`` is private: both are left out (an evaluation set that *is* the private data
    must not excuse every match).
    """
    from dpray.config import DprayConfig
    from dpray.models import existing_model_dir

    specs = _config_models(DprayConfig.model_construct())  # the packaged defaults
    if config is not None:
        specs += _config_models(config)
    specs += _recorded_models(run_dir)
    roots: list[Path] = []
    for spec in dict.fromkeys(specs):
        folder = existing_model_dir(spec)
        if folder is not None:
            roots.append(folder)
    if config is not None and config.evaluate.data_path:
        roots.append(Path(config.evaluate.data_path).expanduser())
    if config is not None:
        for section, key in PUBLIC_FILE_KEYS:
            value = getattr(getattr(config, section, None), key, None)
            if isinstance(value, str) and ("/" in value or "." in value):
                roots.append(Path(value).expanduser())
    package = Path(__file__).resolve().parents[1]
    roots += [package / "configs", package / "data"]  # shipped configs and public prompt data
    private_inputs = []  # data.path: one path, or one per silo
    if config is not None:
        private_inputs = [
            Path(p).expanduser().resolve() for p in config.data.paths if "://" not in p
        ]
    files: dict[Path, None] = {}
    for root in roots:
        root = root.resolve()
        if root.is_relative_to(run_dir.root) or run_dir.root.is_relative_to(root):
            continue  # a run output (ppo.policy defaults to RUN_DIR/sft/model), not an input
        if any(root.is_relative_to(data) or data.is_relative_to(root) for data in private_inputs):
            log.warning("leak scan: %s overlaps data.path: private, not a public input", root)
            continue
        for path in _files_under(root):
            files[path] = None
    return PublicInputs(tuple(files), tuple(_template_texts(config)))


def public_origin_index(index: PrivateIndex, inputs: PublicInputs) -> PublicOrigin:
    """Hash the public inputs' strings once (the same normaliser), keeping what private has."""
    origin = PublicOrigin(index)
    for path in inputs.files:
        origin.add_file(path)
    for text in inputs.texts:
        origin.add(text)
        for line in text.splitlines():
            origin.add(line)
    return origin


PUBLIC_METRIC_KEYS = frozenset({"step", "epsilon"})


def _always(path: Path) -> str | None:
    return "computed from real records without DP"


def _win_rates(path: Path) -> str | None:
    """Win rates are public only when their instructions were declared public data."""
    record = path.with_suffix(".json")
    try:
        public = json.loads(record.read_text()).get("public_data") is True
    except (OSError, ValueError, AttributeError):
        public = False
    return None if public else "win rates on private instructions (the judge read them), not DP"


def _training_metrics(path: Path) -> str | None:
    """Public training metrics hold the step and the ledger's epsilon only."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return "unreadable training metrics"
    extra = sorted({k for row in rows if isinstance(row, dict) for k in row} - PUBLIC_METRIC_KEYS)
    if extra:
        return f"per-step {', '.join(extra)} of private batches, not DP"
    return None


# Files (relative to the run root) that hold statistics of real records outside the ledger when
# they stand outside private/; each rule says why, or None when this copy is fine.
NONDP_STATISTICS = {
    "filter/metrics.json": _always,
    "filter/cluster_shares.png": _always,
    "audit/mia.json": _always,
    "evaluate/win_rates.json": _win_rates,
    "evaluate/win_rates.png": _win_rates,
    "generator/metrics.jsonl": _training_metrics,
}


def nondp_statistics(run_dir: RunDir) -> dict[str, str]:
    """Public files holding statistics of real records that the ledger does not cover."""
    found = {}
    for rel, rule in NONDP_STATISTICS.items():
        path = run_dir.root / rel
        if path.is_file() and not run_dir.is_private(path) and (reason := rule(path)):
            found[rel] = reason
    return found


@dataclass
class LeakReport:
    files_scanned: int
    private_texts: int
    min_tokens: int
    leaks: dict[str, int]
    memorised: dict[str, int]
    public_origin: dict[str, int] = field(default_factory=dict)
    public_inputs: int = 0
    statistics: dict[str, str] = field(default_factory=dict)

    @property
    def leak_count(self) -> int:
        """Private texts in public files plus public files of non-DP statistics."""
        return sum(self.leaks.values()) + len(self.statistics)

    def to_dict(self) -> dict:
        return {
            "files_scanned": self.files_scanned,
            "private_texts_indexed": self.private_texts,
            "min_tokens": self.min_tokens,
            "leaks_total": self.leak_count,
            "leaks_by_file": self.leaks,
            "nondp_statistics_total": len(self.statistics),
            "nondp_statistics_by_file": self.statistics,
            "memorised_total": sum(self.memorised.values()),
            "memorised_by_file": self.memorised,
            "public_origin_total": sum(self.public_origin.values()),
            "public_origin_by_file": self.public_origin,
            "public_inputs_indexed": self.public_inputs,
        }


def scan(
    run_dir: RunDir,
    min_tokens: int = 12,
    extra_files: Iterable[Path] = (),
    config: DprayConfig | None = None,
    inputs: PublicInputs | None = None,
) -> LeakReport:
    """Scan every public file of ``run_dir`` (plus ``extra_files``, e.g. logs) for private text.

    Matches of text standing in the run's public inputs (``inputs``, default
    :func:`public_inputs` of ``run_dir`` and ``config``) are counted as public origin.
    """
    index = build_index(run_dir, min_tokens)
    if inputs is None:
        inputs = public_inputs(run_dir, config)
    origin = public_origin_index(index, inputs)
    leaks: Counter[str] = Counter()
    memorised: Counter[str] = Counter()
    public: Counter[str] = Counter()
    files = [p for p in run_dir.public_files() if p.name != "leaks.json"] + list(extra_files)
    for path in files:
        rel = (
            str(path.relative_to(run_dir.root)) if path.is_relative_to(run_dir.root) else str(path)
        )
        generated = rel.split("/", 1)[0] in GENERATION_DIRS and path.suffix == ".parquet"
        hits = public_hits = 0
        for value, structured in strings_of(path, min_tokens):
            toks = tokens(value)
            if not toks:
                continue
            if structured and _digest(toks) in index.wholes:
                if origin.covers_whole(toks):
                    public_hits += 1
                else:
                    hits += 1
                continue
            windows = index.matching_windows(toks)
            if windows:
                if origin.covers_windows(windows):
                    public_hits += 1
                else:
                    hits += 1
        if hits:
            (memorised if generated else leaks)[rel] += hits
        if public_hits:
            public[rel] += public_hits
    return LeakReport(
        len(files),
        index.size,
        min_tokens,
        dict(leaks),
        dict(memorised),
        dict(public),
        origin.files,
        nondp_statistics(run_dir),
    )
