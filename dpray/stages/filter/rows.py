"""Embedding rows read in chunks, from an ``.npy`` file on disk or from an array in memory.

Why not ``np.load(mmap_mode="r")`` for the streaming passes: pages of a memory-mapped file that a
process has touched count in its resident set (``RssFile``) until the kernel reclaims them, so a
pass over 10M x 384 float32 (15 GB) through a memmap shows up to 15 GB of "peak RSS" on a machine
with the memory to cache it.  :class:`NpyRows` reads the rows it is asked for with positioned
reads (``os.preadv``) into a fresh buffer instead: the file still goes through the page cache,
but the process holds only the chunk it works on.  Sparse row sets (the PCA and k-means samples)
are gathered through a map of one 64 MB window of the file at a time, unmapped before the next,
so a sample of 384k rows out of 10M touches the pages of those rows, and the resident set holds
at most one window of them.

Both kinds answer ``len``, ``dim``, ``read(start, stop)`` (a float32 copy of a row range) and
``take(rows)`` (sorted, distinct row indices).  A :class:`NpyRows` pickles as its path, so a Ray
task on another node reopens the file there (the run directory must be on a volume every node
mounts at the same path, as ``cluster/raycluster.yaml``'s ``/data``).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np


class Rows(Protocol):
    """What the filter needs of an embedding set (see the module docstring)."""

    def __len__(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...

    def read_into(self, start: int, out: np.ndarray) -> np.ndarray: ...

    def take(self, rows: np.ndarray) -> np.ndarray: ...


class ArrayRows:
    """An array (or memmap) in memory: small sets, tests, the held-out split."""

    def __init__(self, array: np.ndarray) -> None:
        if np.ndim(array) != 2:
            raise ValueError(f"embeddings must be 2-D (rows, dim), got shape {np.shape(array)}")
        self.array = array

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.array[start:stop], dtype=np.float32)

    def read_into(self, start: int, out: np.ndarray) -> np.ndarray:
        """Rows ``[start, start + len(out))`` into the float32 buffer ``out``."""
        out[:] = self.array[start : start + len(out)]
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.array(self.array[np.asarray(rows, dtype=np.int64)], dtype=np.float32)


class NpyRows:
    """A 2-D C-order ``.npy`` file read by row ranges, never mapped (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            self.offset = handle.tell()
        if len(shape) != 2 or fortran or dtype.hasobject:
            raise ValueError(f"{self.path}: not a 2-D C-order numeric array (rerun `dpray embed`)")
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        expected = self.offset + self.shape[0] * self.row_bytes
        if self.path.stat().st_size < expected:
            raise ValueError(f"{self.path}: shorter than its header says (rerun `dpray embed`)")
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def _pread_into(self, out: np.ndarray, row: int) -> None:
        """Fill ``out`` (contiguous rows) from ``row`` on; short reads are continued."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        position = self.offset + row * self.row_bytes
        done = 0
        while done < len(view):
            got = os.preadv(self._descriptor(), [view[done:]], position + done)
            if got <= 0:
                raise OSError(f"{self.path}: file ended early (rerun `dpray embed`)")
            done += got

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(len(self), stop)
        out = np.empty((max(0, stop - start), self.dim), dtype=self.dtype)
        if len(out):
            self._pread_into(out, start)
        return out if self.dtype == np.float32 else out.astype(np.float32)

    def read_into(self, start: int, out: np.ndarray) -> np.ndarray:
        """Rows ``[start, start + len(out))`` into the float32 buffer ``out`` (reused across
        chunks, so a pass over the file does not fault in a fresh buffer per chunk)."""
        if start < 0 or start + len(out) > len(self):
            raise ValueError("read_into() past the end of the file")
        if self.dtype == np.float32 and out.flags.c_contiguous and len(out):
            self._pread_into(out, start)
        else:
            out[:] = self.read(start, start + len(out))
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at sorted, distinct indices, gathered window by window from a memory map.

        Each window of at most :data:`TAKE_WINDOW_BYTES` of the file is mapped, its rows copied
        out by one fancy index, and unmapped again, so the mapped pages leave the resident set
        with the window (peak RSS grows by one window, not by the file).  Why not one positioned
        read per run of consecutive rows: a PCA sample of 384k rows out of 1M-10M is ~240k-380k
        runs, ~6 us of system call and Python each (1.8 s of fit_pca at 1M); page faults on a
        map cost a fraction of that and the gather is one numpy call per window.
        """
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        if len(rows) == 0:
            return out.astype(np.float32)
        if rows[0] < 0 or rows[-1] >= len(self) or (len(rows) > 1 and (np.diff(rows) <= 0).any()):
            raise ValueError("take() needs sorted, distinct row indices within the file")
        window = max(1, TAKE_WINDOW_BYTES // self.row_bytes)
        first = 0
        while first < len(rows):
            base = int(rows[first])
            last = int(np.searchsorted(rows, base + window, side="left"))
            self._gather_into(out[first:last], rows[first:last] - base, base)
            first = last
        return out if self.dtype == np.float32 else out.astype(np.float32)

    def _gather_into(self, out: np.ndarray, offsets: np.ndarray, base: int) -> None:
        """``out[i] = row base + offsets[i]``, through a map of rows ``base..base+offsets[-1]``."""
        start = self.offset + base * self.row_bytes
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        span = int(offsets[-1]) + 1
        length = start - aligned + span * self.row_bytes
        with mmap.mmap(
            self._descriptor(), length, flags=MAP_FLAGS, prot=mmap.PROT_READ, offset=aligned
        ) as mm:
            window = np.frombuffer(
                mm, dtype=self.dtype, count=span * self.dim, offset=start - aligned
            )
            np.take(window.reshape(span, self.dim), offsets, axis=0, out=out)
            del window  # the map cannot close while an array still views it


MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

TAKE_WINDOW_BYTES = 64 * 2**20
"""File bytes :meth:`NpyRows.take` maps at a time: what its gather adds to the resident set."""


def as_rows(x: Rows | np.ndarray) -> Rows:
    """``x`` itself if it reads rows already, else an :class:`ArrayRows` over it."""
    if isinstance(x, (ArrayRows, NpyRows)):
        return x
    return ArrayRows(x)


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(0, c), (c, 2c), ...]`` covering ``n`` rows."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    return [(start, min(n, start + chunk_size)) for start in range(0, n, chunk_size)]


def iter_chunks(rows: Rows, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, block)`` for consecutive float32 blocks of at most ``chunk_size`` rows."""
    for start, stop in chunk_ranges(len(rows), chunk_size):
        yield start, rows.read(start, stop)


def take_in_chunks(rows: Rows, indices: np.ndarray, chunk_size: int) -> Iterator[np.ndarray]:
    """Blocks of the rows at sorted, distinct ``indices``, ``chunk_size`` rows at a time."""
    for start in range(0, len(indices), chunk_size):
        yield rows.take(indices[start : start + chunk_size])
