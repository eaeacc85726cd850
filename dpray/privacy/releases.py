"""Saved DP releases, and the one switch that spends the budget again.

A DP stage's release -- the filter's noisy histogram, a trained adapter, a Private Evolution
round's noisy votes -- is DP output: keeping it and deriving outputs from it again costs nothing.
Drawing it again is a second release of the same private data, which the ledger must compose
with the first.  So a rerun (``--force``, a rerun after an interruption, a moved run directory)
reuses the saved release of the same inputs and config, and only :func:`spending_again` (the CLI's
``--spend-again``) makes a stage draw anew; the new event is then appended to the ledger next to
the earlier one, never in its place.

A release is keyed by :func:`release_key`: the config sections it depends on and the content of
the files it reads, named relative to the run directory (so a moved run directory keeps its
keys).  The keys hash private inputs, so release records live under ``private/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from dpray.rundir import file_digest, relative_to_run

if TYPE_CHECKING:
    from dpray.config import DprayConfig
    from dpray.rundir import RunDir

log = logging.getLogger(__name__)

_SPEND_AGAIN: ContextVar[bool] = ContextVar("dpray_spend_again", default=False)

SPEND_AGAIN_FLAG = "--spend-again"


def spend_again() -> bool:
    """True while the user asked to draw DP releases anew (and spend the budget again)."""
    return _SPEND_AGAIN.get()


@contextlib.contextmanager
def spending_again(flag: bool = True) -> Iterator[None]:
    """Within this block, DP stages draw new releases instead of reusing saved ones."""
    token = _SPEND_AGAIN.set(bool(flag))
    try:
        yield
    finally:
        _SPEND_AGAIN.reset(token)


def release_key(
    config: DprayConfig,
    sections: Iterable[str],
    files: Iterable[Path],
    run_dir: RunDir,
    extra: str = "",
) -> str:
    """What a release depends on: config ``sections`` and the content of ``files`` (missing
    files are left out), with paths relative to the run directory."""
    digests = sorted(
        (relative_to_run(run_dir.root, p), file_digest(p)) for p in files if Path(p).exists()
    )
    blob = f"{config.section_hash(*sections)}|{digests!r}|{extra}"
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def log_reuse(stage: str, what: str) -> None:
    """The one line a rerun prints when it reuses a saved release instead of spending."""
    log.info(
        "%s: reusing the saved DP release (%s): no new spend; pass %s to draw a new release "
        "(composed with the earlier one on the ledger)",
        stage,
        what,
        SPEND_AGAIN_FLAG,
    )


def log_new_release(stage: str, previous: bool) -> None:
    """Say so when a stage that released before releases again (spends again)."""
    if previous and spend_again():
        log.warning(
            "%s: %s: drawing a new DP release; the ledger composes it with the earlier one",
            stage,
            SPEND_AGAIN_FLAG,
        )
    elif previous:
        log.warning(
            "%s: inputs or config changed since the saved release: drawing a new DP release; "
            "the ledger composes it with the earlier one",
            stage,
        )


__all__ = [
    "SPEND_AGAIN_FLAG",
    "log_new_release",
    "log_reuse",
    "release_key",
    "spend_again",
    "spending_again",
]
