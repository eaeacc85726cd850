"""The privacy ledger: one file, ``RUN_DIR/ledger.json``, composing every DP event of a run.

Why one module: the guarantee a user is promised is the composition of *all* DP steps, so exactly
one place composes them, checks a new spend against the target *before* it happens, and refuses a
spend that would overshoot (nothing is written then).  Accounting is dp-accounting's: the PLD
accountant gives the reported epsilon when every event is one dp-accounting knows; an RDP
accountant is kept as a cross-check, and is the reported accountant when an event only has an RDP
curve (secure aggregation's Skellam noise).

File schema (stable, so tools can recompute it)::

    {"unit": "instruction", "target": {"epsilon": E, "delta": D},
     "spent": {"epsilon": e, "delta": D, "accountant": "pld", "rdp_epsilon": e2},
     "events": [{"stage": ..., "mechanism": ..., <mechanism fields>}, ...]}

Concurrency: two commands on one run directory (``dpray filter`` while training runs, a rerun
next to a report) each hold a :class:`Ledger` object.  Every change therefore takes an exclusive
file lock (``.ledger.json.lock`` next to the ledger, ``filelock``), re-reads the file inside it,
checks the new event against *what is on disk now* and replaces the file atomically (temp file
in the same folder + ``os.replace``), so a spend composes with whatever another process wrote
and readers never see half a file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dp_accounting
import numpy as np
from filelock import FileLock

from dpray.privacy.events import PrivacyEvent

# Integer orders: the Skellam subsampling bound is stated for integer alpha >= 2.
RDP_ORDERS: tuple[int, ...] = tuple(range(2, 129)) + (160, 192, 256, 320, 384, 512, 768, 1024)
PLD_DISCRETIZATION = 1e-4
EPS_TOLERANCE = 1e-9


class BudgetExceededError(RuntimeError):
    """A spend was refused: composing it would exceed the target epsilon."""


_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


def lock_path(path: str | Path) -> Path:
    """The lock file guarding the ledger at ``path`` (hidden, next to it, always empty)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def ledger_lock(path: str | Path) -> Iterator[None]:
    """Hold the ledger's exclusive lock (across processes and machines sharing the folder).

    One ``FileLock`` per path and process, so nested use in one thread is re-entrant (two
    ``flock`` handles in one process would wait on each other).  Blocks until the holder is done;
    the OS drops the lock of a process that dies, so there are no stale locks.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock_path(path))
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = FileLock(key)
    with lock:
        yield


@dataclass(frozen=True)
class Accounting:
    """The composed cost of a list of events."""

    epsilon: float
    delta: float
    accountant: str
    rdp_epsilon: float


def _rdp_epsilon(events: Sequence[PrivacyEvent], delta: float) -> float:
    orders = np.asarray(RDP_ORDERS, dtype=float)
    total = np.zeros_like(orders)
    for event in events:
        total = total + event.rdp(orders)
    eps, _ = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)
    return float(eps)


def _pld_epsilon(
    events: Sequence[PrivacyEvent], delta: float, interval: float = PLD_DISCRETIZATION
) -> float:
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    for event in events:
        accountant.compose(event.dp_event())
    return float(accountant.get_epsilon(delta))


def compose(events: Sequence[PrivacyEvent], delta: float, fast: bool = False) -> Accounting:
    """Compose ``events`` at ``delta`` with dp-accounting (PLD when possible, else RDP).

    ``fast`` skips the PLD accountant (~0.5 s) and reports RDP's epsilon, which is never smaller:
    used for per-step progress writes during training, then replaced by the exact figure.
    """
    return _compose_cached(tuple(events), float(delta), bool(fast))


@functools.lru_cache(maxsize=256)
def _compose_cached(events: tuple[PrivacyEvent, ...], delta: float, fast: bool) -> Accounting:
    live = [e for e in events if not _is_empty(e)]
    if not live:
        return Accounting(0.0, delta, "none", 0.0)
    if any(not e.is_private() for e in live):
        return Accounting(math.inf, delta, "none", math.inf)
    rdp_eps = _rdp_epsilon(live, delta)
    if not fast and all(e.dp_event() is not None for e in live):
        return Accounting(_pld_epsilon(live, delta), delta, "pld", rdp_eps)
    return Accounting(rdp_eps, delta, "rdp", rdp_eps)


def _is_empty(event: PrivacyEvent) -> bool:
    return getattr(event, "steps", None) == 0 or getattr(event, "count", None) == 0


class Ledger:
    """A run's privacy ledger.  Immutable events; every change is checked, then written atomically."""

    def __init__(
        self,
        path: str | Path,
        unit: str,
        epsilon: float,
        delta: float,
        events: Iterable[PrivacyEvent] = (),
    ) -> None:
        self.path = Path(path)
        self.unit = unit
        self.target_epsilon = float(epsilon)
        self.target_delta = float(delta)
        self.events: tuple[PrivacyEvent, ...] = tuple(events)

    # ---------------------------------------------------------------------------- persistence
    @classmethod
    def create(cls, path: str | Path, unit: str, epsilon: float, delta: float) -> Ledger:
        """Start a ledger, or reopen one with the same target (a rerun must not reset spends)."""
        path = Path(path)
        with ledger_lock(path):
            if path.exists():
                ledger = cls.load(path)
                same = (ledger.unit, ledger.target_epsilon) == (unit, float(epsilon))
                if not (same and math.isclose(ledger.target_delta, delta, rel_tol=1e-9)):
                    if ledger.events:
                        raise BudgetExceededError(
                            f"{path}: ledger has spends under a different target "
                            f"(unit={ledger.unit}, epsilon={ledger.target_epsilon}, "
                            f"delta={ledger.target_delta:.3g}); use a new run directory"
                        )
                    ledger = cls(path, unit, epsilon, delta)
                    ledger._write()
                return ledger
            ledger = cls(path, unit, epsilon, delta)
            ledger._write()
            return ledger

    @classmethod
    def load(cls, path: str | Path) -> Ledger:
        path = Path(path)
        data = json.loads(path.read_text())
        events = [PrivacyEvent.from_dict(e) for e in data.get("events", [])]
        target = data["target"]
        return cls(path, data["unit"], target["epsilon"], target["delta"], events)

    def to_dict(self, fast: bool = False, accounting: Accounting | None = None) -> dict:
        acc = accounting or self.accounting(fast=fast)
        return {
            "unit": self.unit,
            "target": {"epsilon": self.target_epsilon, "delta": self.target_delta},
            "spent": {
                "epsilon": _json_float(acc.epsilon),
                "delta": self.target_delta,
                "accountant": acc.accountant,
                "rdp_epsilon": _json_float(acc.rdp_epsilon),
            },
            "events": [e.to_dict() for e in self.events],
        }

    def save(self, fast: bool = False, accounting: Accounting | None = None) -> None:
        """Write this object's state as the ledger (under the lock).  Spends use :meth:`spend`
        and :meth:`record_progress`, which compose with what is on disk instead."""
        with ledger_lock(self.path):
            self._write(fast=fast, accounting=accounting)

    def _write(self, fast: bool = False, accounting: Accounting | None = None) -> None:
        """Replace the file atomically (temp file in the same folder + rename); lock held."""
        text = json.dumps(self.to_dict(fast=fast, accounting=accounting), indent=2) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _refresh(self) -> None:
        """Adopt the ledger on disk (another process may have spent since we loaded); lock held."""
        if not self.path.exists():
            return
        current = self.load(self.path)
        self.unit = current.unit
        self.target_epsilon = current.target_epsilon
        self.target_delta = current.target_delta
        self.events = current.events

    # ------------------------------------------------------------------------------ accounting
    def accounting(
        self, events: Sequence[PrivacyEvent] | None = None, fast: bool = False
    ) -> Accounting:
        """Composed cost.  ``fast``: RDP's figure when it is within the target, else exact."""
        events = self.events if events is None else events
        if fast:
            quick = compose(events, self.target_delta, fast=True)
            if quick.epsilon <= self.target_epsilon + EPS_TOLERANCE:
                return quick
        return compose(events, self.target_delta)

    @property
    def spent_epsilon(self) -> float:
        return self.accounting().epsilon

    @property
    def remaining_epsilon(self) -> float:
        return max(0.0, self.target_epsilon - self.spent_epsilon)

    def would_spend(
        self, event: PrivacyEvent, replace_run: bool = False, fast: bool = False
    ) -> float:
        """Composed epsilon if ``event`` were added (or replaced its run's earlier progress)."""
        return self.accounting(self._with(event, replace_run), fast=fast).epsilon

    def _with(self, event: PrivacyEvent, replace_run: bool) -> tuple[PrivacyEvent, ...]:
        if replace_run and event.run_id:
            kept = tuple(
                e for e in self.events if not (e.stage == event.stage and e.run_id == event.run_id)
            )
            return kept + (event,)
        return self.events + (event,)

    def check(self, event: PrivacyEvent, replace_run: bool = False, fast: bool = False) -> float:
        """Raise :class:`BudgetExceededError` if ``event`` would overshoot; else return the total."""
        total = self.would_spend(event, replace_run, fast)
        if total > self.target_epsilon + EPS_TOLERANCE:
            raise BudgetExceededError(
                f"stage '{event.stage}': {event.mechanism} would bring epsilon to "
                f"{total:.4g} > target {self.target_epsilon:.4g} "
                f"(delta={self.target_delta:.3g}); nothing was spent"
            )
        return total

    def spend(self, event: PrivacyEvent) -> float:
        """Check, then append ``event`` and write the ledger.  Returns the new total epsilon.

        Under the ledger lock and against the file as it is now, so a concurrent command's
        spends are composed with this one, never overwritten.
        """
        with ledger_lock(self.path):
            self._refresh()
            total = self.check(event)
            self.events = self._with(event, replace_run=False)
            self._write()
        return total

    def record_progress(
        self, event: PrivacyEvent, exact: bool = False, bound: PrivacyEvent | None = None
    ) -> float:
        """Replace this run's (stage, run_id) event with ``event``: steps counted as they happen.

        Training calls this after every noisy step, so a crash never loses a spent step.  The
        whole planned run was checked with :meth:`check` before the first step; passing that
        planned event as ``bound`` lets a progress write use the smaller of two upper bounds --
        RDP of the steps so far, and the exact (PLD) cost of the whole plan, computed once --
        instead of an exact PLD per step, which costs minutes at small noise multipliers.
        """
        if not event.run_id:
            raise ValueError("record_progress needs an event with a run_id")
        # Per training step: one flock and a re-read of a small file; compositions are cached.
        with ledger_lock(self.path):
            self._refresh()
            return self._record_progress(event, exact, bound)

    def _record_progress(
        self, event: PrivacyEvent, exact: bool, bound: PrivacyEvent | None
    ) -> float:
        events = self._with(event, replace_run=True)
        if exact or bound is None:
            acc = self.accounting(events, fast=not exact)
        else:
            quick = compose(events, self.target_delta, fast=True)
            planned = compose(self._with(bound, replace_run=True), self.target_delta)
            acc = quick if quick.epsilon <= planned.epsilon else planned
        if acc.epsilon > self.target_epsilon + EPS_TOLERANCE:
            raise BudgetExceededError(
                f"stage '{event.stage}': {event.mechanism} would bring epsilon to "
                f"{acc.epsilon:.4g} > target {self.target_epsilon:.4g} "
                f"(delta={self.target_delta:.3g}); nothing was spent"
            )
        self.events = events
        self._write(accounting=acc)
        return acc.epsilon

    def run_event(self, stage: str, run_id: str) -> PrivacyEvent | None:
        """The recorded event of one (stage, run_id), if any (a resumed run continues it)."""
        for event in self.events:
            if event.stage == stage and event.run_id == run_id:
                return event
        return None

    # ------------------------------------------------------------------------------- reporting
    def per_stage(self) -> list[tuple[str, float]]:
        """Each stage's epsilon on its own (at the full delta), in order of first spend."""
        stages: dict[str, list[PrivacyEvent]] = {}
        for event in self.events:
            stages.setdefault(event.stage, []).append(event)
        return [(stage, self.accounting(evs).epsilon) for stage, evs in stages.items()]

    def format_table(self) -> str:
        acc = self.accounting()
        lines = [
            f"privacy unit: {self.unit}    delta: {self.target_delta:.3g}    "
            f"accountant: {acc.accountant}",
            f"{'stage':<20} {'mechanism':<30} {'epsilon':>10}",
        ]
        by_stage = dict(self.per_stage())
        seen: set[str] = set()
        for event in self.events:
            if event.stage in seen:
                continue
            seen.add(event.stage)
            mechs = ",".join(sorted({e.mechanism for e in self.events if e.stage == event.stage}))
            lines.append(f"{event.stage:<20} {mechs:<30} {by_stage[event.stage]:>10.4f}")
        lines.append(f"{'composed total':<51} {acc.epsilon:>10.4f}")
        lines.append(f"{'target':<51} {self.target_epsilon:>10.4f}")
        lines.append(f"{'remaining':<51} {max(0.0, self.target_epsilon - acc.epsilon):>10.4f}")
        return "\n".join(lines)


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"
