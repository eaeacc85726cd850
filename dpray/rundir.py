"""Paths of a run directory, split into a private zone and a public zone.

Layout::

    RUN_DIR/
      ledger.json                 the privacy ledger (public: DP parameters only)
      <stage>/                    public outputs: DP results, counts-only reports
      private/                    everything derived from private data *without* DP (0700)
        <stage>/                  e.g. private/ingest/instructions.parquet
        state/<stage>.json        completion markers (they hash private inputs)
        logs/                     logs that may name private locations (file:line)

Anything outside ``private/`` must be safe to hand to an annotator.  Code asks this module for a
path in the right zone instead of joining strings, so the zone is decided in one place.

``private/`` is the owner's alone: the folder is 0700 whatever the umask (so nothing under it
is reachable by anyone else, even a file a Ray worker wrote 0644), its stage folders are made
0700, and :meth:`RunDir.protect_private` strips group/other bits from everything under it,
which the pipeline runs after every stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
GROUP_OTHER_BITS = 0o077


def owner_only_dir(path: str | Path) -> Path:
    """Make ``path`` (and missing parents) a folder only its owner can enter: 0700 whatever the
    umask, tightened if it exists with looser bits (a folder made by an older dpray)."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    st = path.stat()
    if stat.S_IMODE(st.st_mode) != PRIVATE_DIR_MODE and st.st_uid == os.getuid():
        path.chmod(PRIVATE_DIR_MODE)
    return path


def strip_group_other(root: str | Path) -> int:
    """Remove group/other permission bits from ``root`` and every folder and file under it.

    Owner bits are kept (an executable stays executable for its owner); symlinks, sockets and
    files of other users are left alone.  Returns how many paths were changed.
    """
    changed = 0
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
            changed += _tighten(folder, os.stat(folder, follow_symlinks=False))
        except FileNotFoundError:  # removed meanwhile (a Ray temp file, a replaced shard)
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(Path(entry.path))
                elif stat.S_ISREG(st.st_mode):
                    changed += _tighten(Path(entry.path), st)
            except FileNotFoundError:
                continue
    return changed


def _tighten(path: Path, st: os.stat_result) -> int:
    mode = stat.S_IMODE(st.st_mode)
    if not mode & GROUP_OTHER_BITS or st.st_uid != os.getuid():
        return 0
    os.chmod(path, mode & ~GROUP_OTHER_BITS, follow_symlinks=False)
    return 1


class RunDir:
    """A run directory.  Creating one makes the two zones; paths are never guessed elsewhere."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        owner_only_dir(self.private_root)

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
        """Private folder of a stage (non-DP derivatives of the private data), 0700."""
        path = self.private_root / stage
        if not path.is_dir():
            path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        return path

    def protect_private(self) -> int:
        """Strip group/other bits under ``private/`` (files written under any umask, e.g. by Ray
        workers on another umask, end up 0600 and folders 0700).  Returns paths changed."""
        owner_only_dir(self.private_root)
        changed = strip_group_other(self.private_root)
        if changed:
            log.debug("private zone: removed group/other access from %d paths", changed)
        return changed

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


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content (a directory: of its files' relative names and contents, in
    sorted order), so a copy elsewhere has the same digest."""
    path = Path(path)
    digest = hashlib.sha256()
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for item in paths:
        digest.update(str(item.relative_to(path) if path.is_dir() else item.name).encode())
        with item.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def relative_to_run(root: str | Path, path: str | Path) -> str:
    """``path`` as recorded in a run's markers and release records: relative to the run
    directory ``root`` (POSIX form) when it lies inside it, else absolute (an outside input)."""
    path = Path(path)
    absolute = path if path.is_absolute() else Path(root) / path
    try:
        return absolute.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(absolute.resolve())


def resolve_in_run(root: str | Path, recorded: str) -> Path:
    """Inverse of :func:`relative_to_run`: a recorded path under the run directory ``root``."""
    path = Path(recorded)
    return path if path.is_absolute() else Path(root) / path


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
