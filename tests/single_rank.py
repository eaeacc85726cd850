"""The environment of a one-process torch.distributed group (rank 0 of 1 on this host), as
DeepSpeed and the trainers read it; for tests that run a trainer in a subprocess."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_rank_env(**extra: str) -> dict[str, str]:
    """This process's environment plus rank 0 of a world of 1 on a free loopback port."""
    return {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        **extra,
    }
