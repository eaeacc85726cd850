"""Paths of a run directory, split into a private zone and a public zone.

Layout::

    RUN_DIR/
      ledger.json                 the privacy ledger (public: DP parameters only)
      <stage>/                    public outputs: DP results, counts-only reports
      private/                    everything derived from private data *without* DP
        <stage>/                  e.g. private/ingest/instructions.parquet
        state/<stage>.json        completion markers (they hash private inputs)
        logs/                     logs that may name private locations (file:line)

Anything outside ``private/`` must be safe to hand to an annotator.  Code asks this module for a
path in the right zone instead of joining strings, so the zone is decided in one place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class RunDir:
    """A run directory.  Creating one makes the two zones; paths are never guessed elsewhere."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.private_root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def private_root(self) -> Path:
        return self.root / "private"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.json"

    def public(self, stage: str) -> Path:
        """Public output folder of a stage (DP outputs and counts only)."""
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def private(self, stage: str) -> Path:
        """Private folder of a stage (non-DP derivatives of the private data)."""
        path = self.private_root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def marker(self, stage: str) -> Path:
        return self.private("state") / f"{stage}.json"

    @property
    def logs(self) -> Path:
        return self.private("logs")

    def is_private(self, path: str | Path) -> bool:
        """True if ``path`` lies in the private zone."""
        try:
            Path(path).resolve().relative_to(self.private_root)
        except ValueError:
            return False
        return True

    def public_files(self) -> list[Path]:
        """Every file outside ``private/`` (what a leak scan must check)."""
        return sorted(p for p in self.root.rglob("*") if p.is_file() and not self.is_private(p))


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
