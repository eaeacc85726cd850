"""The one compiled piece of dpray: secure aggregation's Poisson sampler round (``_kernels.c``).

Everything else is in pyproject.toml.  The extension is optional: without a C compiler the
install still succeeds and :mod:`dpray.privacy.secure_agg.kernels` falls back to the numpy form,
which computes the same values with ~1.6x the CPU of a noise share (tests/test_secure_agg.py
checks that this build exists, so CI and developer installs cannot lose it silently).
"""

import sys

from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-add, so the kernel rounds exactly as numpy does (gcc
# fuses by default on arm64, and on x86-64 wherever -march allows FMA).
COMPILE_ARGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math"]

setup(
    ext_modules=[
        Extension(
            "dpray.privacy.secure_agg._kernels",
            sources=["dpray/privacy/secure_agg/_kernels.c"],
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        )
    ]
)
