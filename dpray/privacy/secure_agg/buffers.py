"""Large CPU buffers for the secure-aggregation step: fresh ones from numpy, scratch ones reused.

Why: one step of secure aggregation touches a dozen D-sized arrays (D = 2^20 for a LoRA
adapter).  A fresh multi-megabyte array costs the kernel a page fault and a zero fill per page
(~1.6 ms per 8 MiB on a 2-core VM, more under memory pressure), which adds up to a fifth of the
step's whole encode/decode/noise work.

* :func:`empty_buffer` -- a fresh array that the caller may return or keep (payloads, results):
  from numpy's allocator, which asks the kernel for transparent huge pages (torch's CPU
  allocator maps them page by page).
* :func:`scratch` -- a temporary that never leaves the function that asked for it (the
  Hadamard ping-pong buffer, the rounding uniforms, the sampler's raw words): one array per
  (thread, call site) is kept and handed back on the next request.  Per thread, because the
  noise share is drawn on a side thread while the main thread encodes; per call site (``slot``),
  because a function may hold several at once.  Arrays above :data:`MAX_SCRATCH_BYTES` are not
  kept (fresh every time), which bounds what stays allocated between steps.

A scratch array holds secret values between steps (raw keystream, noise candidates).  It stays in
the worker's own memory, like every other buffer of the step, and is overwritten on reuse.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

__all__ = ["MAX_SCRATCH_BYTES", "empty_buffer", "scratch"]

MAX_SCRATCH_BYTES = 64 << 20  # D = 2^23 float64; larger vectors allocate fresh scratch

_local = threading.local()


def _numpy_dtype(dtype: torch.dtype | np.dtype | type) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        return torch.empty(0, dtype=dtype, device="cpu").numpy().dtype
    return np.dtype(dtype)


def empty_buffer(n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh uninitialised 1-D tensor; on CPU backed by numpy's (huge-page) allocator."""
    if torch.device(device).type != "cpu":
        return torch.empty(n, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(n, dtype=_numpy_dtype(dtype)))


def scratch(slot: str, n: int, dtype: torch.dtype | np.dtype | type) -> np.ndarray:
    """An uninitialised numpy array of ``n`` elements for temporary use by call site ``slot``.

    The same thread asking for the same ``slot`` gets the same memory again, so the caller must
    be done with it before its next request, and must not let it (or a view or tensor of it)
    escape.
    """
    np_dtype = _numpy_dtype(dtype)
    if n * np_dtype.itemsize > MAX_SCRATCH_BYTES:
        return np.empty(n, dtype=np_dtype)
    cache = getattr(_local, "arrays", None)
    if cache is None:
        cache = _local.arrays = {}
    held = cache.get(slot)
    if held is None or held.size < n or held.dtype != np_dtype:
        held = cache[slot] = np.empty(n, dtype=np_dtype)
    return held[:n]
