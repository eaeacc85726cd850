"""Shared fixtures: small configs, canary strings, isolated caches."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_canary() -> str:
    """A random string that can only appear in output if private text leaked."""
    return "CANARY" + secrets.token_hex(8)


@pytest.fixture
def canary() -> str:
    return make_canary()


def base_tree(run_dir: Path, data_path: Path | str, **data) -> dict:
    tree = {
        "run_dir": str(run_dir),
        "data": {"path": str(data_path), "text_field": "text", "id_field": "id", **data},
        "privacy": {"epsilon": 2.0, "delta": 1e-5},
    }
    return tree


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path
