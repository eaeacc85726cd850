"""dpray: differentially private synthetic instructions, built on Ray.

The Python API (see :mod:`dpray.api`)::

    from dpray import load_config, run, run_stage

Those names are imported on first use, so ``import dpray`` (which every Ray worker does) stays
cheap: no pydantic, Ray or torch until a config is loaded or a stage runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

API = ("load_config", "run", "run_stage")

if TYPE_CHECKING:
    from dpray.api import load_config, run, run_stage


def __getattr__(name: str):
    if name in API:
        from dpray import api

        return getattr(api, name)
    raise AttributeError(f"module 'dpray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])


__all__ = ["__version__", "load_config", "run", "run_stage"]
