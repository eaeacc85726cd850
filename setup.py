"""The one compiled piece of dpray: the PTRS Poisson round of the secure-aggregation noise share.

Everything else is in pyproject.toml.  The extension is optional: without a C compiler the
install still succeeds and :mod:`dpray.privacy.secure_agg.csprng` falls back to its numpy form,
which draws the same values ~2x slower (tests/test_secure_agg.py checks that this build exists).
"""

import sys

from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-add, so the kernel rounds exactly as numpy does (gcc
# fuses by default on arm64, and on x86-64 wherever -march allows FMA).
COMPILE_ARGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math"]

setup(
    ext_modules=[
        Extension(
            "dpray.privacy.secure_agg._ptrs",
            sources=["dpray/privacy/secure_agg/_ptrs.c"],
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        )
    ]
)
