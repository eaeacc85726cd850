"""Cleaning and de-duplication of sampled instructions.

Both are pure functions of the text so that every backend, every round and every rerun (resumed
or not) agrees on which samples count: cleaning is applied to the raw continuation stored in a
draw shard, never to something a backend already post-processed differently.

Duplicates are judged on two keys, like ingestion does for the private set: the exact cleaned
text, and a normalised form (case-folded, every whitespace run collapsed to one space), so
"Write a poem." and "write  a poem." count once.  The normalisation is repeated here rather than
imported from ``dpray.stages.ingest`` because stages never import one another.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# Horizontal whitespace runs (not newlines): instructions may hold code or lists whose line
# structure matters, so cleaning keeps single line breaks and collapses only what is noise.
_HSPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")

KEPT = ""
DROP_EMPTY = "empty"
DROP_SHORT = "short"
DROP_TRUNCATED = "truncated"
"""A draw cut at ``max_new_tokens`` before its stop token (dropped with ``sample.drop_truncated``):
half a request teaches the aligned model to stop mid-sentence and reads as junk."""


def strip_template(text: str, template: str) -> str:
    """Remove the generator template when the model echoed it at the start of its output."""
    if template:
        stripped = template.strip()
        candidate = text.lstrip()
        if stripped and candidate.startswith(stripped):
            return candidate[len(stripped) :]
    return text


def normalise_whitespace(text: str) -> str:
    """Unify line endings, collapse spaces/tabs, trim lines, keep at most one blank line.

    Also drops U+FFFD, which a byte-level tokenizer emits when a generation stops in the middle
    of a multi-byte character.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufffd", "")
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_text(raw: str, template: str, min_chars: int) -> tuple[str, str]:
    """``(cleaned text, drop reason)``; the reason is ``""`` for a kept sample."""
    text = normalise_whitespace(strip_template(raw, template))
    if not text:
        return text, DROP_EMPTY
    if len(text) < min_chars:
        return text, DROP_SHORT
    return text, KEPT


def dedup_key(text: str) -> str:
    """The normalised duplicate key: case-folded, whitespace runs collapsed to one space."""
    return " ".join(text.split()).casefold()


def _digest(text: str) -> bytes:
    # 16-byte digests instead of the strings: millions of samples stay a few dozen MB.
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass
class Deduper:
    """Order-dependent de-duplication: the first occurrence of a text (in draw order) wins.

    Counts why samples were not kept, so the report can give the duplicate rate.
    """

    exact: set[bytes] = field(default_factory=set)
    normalised: set[bytes] = field(default_factory=set)
    seen: int = 0
    dropped_empty: int = 0
    dropped_short: int = 0
    dropped_truncated: int = 0
    duplicates_exact: int = 0
    duplicates_normalised: int = 0

    def offer(self, text: str, drop: str) -> bool:
        """Count one cleaned sample; True when it is new (kept)."""
        self.seen += 1
        if drop == DROP_EMPTY:
            self.dropped_empty += 1
            return False
        if drop == DROP_SHORT:
            self.dropped_short += 1
            return False
        if drop == DROP_TRUNCATED:
            self.dropped_truncated += 1
            return False
        exact = _digest(text)
        if exact in self.exact:
            self.duplicates_exact += 1
            return False
        norm = _digest(dedup_key(text))
        if norm in self.normalised:
            self.duplicates_normalised += 1
            self.exact.add(exact)
            return False
        self.exact.add(exact)
        self.normalised.add(norm)
        return True

    def offer_all(self, items: Iterable[tuple[str, str]]) -> list[bool]:
        return [self.offer(text, drop) for text, drop in items]

    @property
    def unique(self) -> int:
        return len(self.normalised)

    @property
    def duplicates(self) -> int:
        return self.duplicates_exact + self.duplicates_normalised

    @property
    def duplicate_rate(self) -> float:
        """Duplicates among the samples that survived cleaning (what oversampling must cover)."""
        valid = self.seen - self.dropped_empty - self.dropped_short - self.dropped_truncated
        return self.duplicates / valid if valid else 0.0

    def counts(self) -> dict:
        return {
            "seen": self.seen,
            "dropped_empty": self.dropped_empty,
            "dropped_short": self.dropped_short,
            "dropped_truncated": self.dropped_truncated,
            "duplicates_exact": self.duplicates_exact,
            "duplicates_normalised": self.duplicates_normalised,
            "duplicates": self.duplicates,
            "duplicate_rate": round(self.duplicate_rate, 6),
            "unique": self.unique,
        }


def clean_column(raws: Iterable[str], template: str, min_chars: int) -> tuple[list[str], list[str]]:
    """``(texts, drop reasons)`` for a column of raw continuations (a Ray Data batch)."""
    texts, drops = [], []
    for raw in raws:
        text, drop = clean_text(str(raw), template, min_chars)
        texts.append(text)
        drops.append(drop)
    return texts, drops
