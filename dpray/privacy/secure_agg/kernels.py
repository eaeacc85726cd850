"""Which implementation runs secure aggregation's hot loop: the compiled C kernel or numpy.

``_kernels.c`` (built by setup.py when the install has a C compiler) holds the Skellam share's
Poisson rejection round (:meth:`~dpray.privacy.secure_agg.csprng.SecureRandom.poisson`).  Its
numpy form gives bit-identical results and runs when the extension is missing (same values,
~1.6x the CPU of a noise share).

:data:`BACKEND` is read at every call, so tests and benchmarks can switch it to compare the two.
"""

from __future__ import annotations

try:
    from dpray.privacy.secure_agg import _kernels as compiled
except ImportError:  # pragma: no cover - an install without a C compiler
    compiled = None

__all__ = ["BACKEND", "backend", "compiled", "use_compiled"]

#: ``"compiled"`` (the C kernel) or ``"numpy"``.
BACKEND = "compiled" if compiled is not None else "numpy"


def backend() -> str:
    """``"compiled"`` or ``"numpy"``: which form this process runs (``"numpy"``: no C build)."""
    return BACKEND


def use_compiled() -> bool:
    """Whether the hot loop runs compiled right now (:data:`BACKEND`, read at every call)."""
    return BACKEND == "compiled"
