"""A pool of sampling actors that lives for a whole stage run, across its sampling rounds.

Why not one Ray Data ``map_batches`` per round: an actor pool of Ray Data lives as long as its
dataset, so every round (the sampling stage's top-up rounds, each private-evolution round)
started new actors and loaded the model again -- minutes per round for a 7B model in vLLM.
Here the actors are plain Ray actors, created at the first round that has shards to make, given
each round's generator spec with its shards, and killed when the stage is done (``with``).

Fault tolerance as under Ray Data: an actor that dies (its node lost) is restarted by Ray,
without limit, and the call it was serving is retried (``max_restarts=-1``,
``max_task_retries=-1``); a shard is whole or absent, so a retried call makes the same shard.
Work goes out a call at a time per actor, so a fast actor takes more shards than a slow one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Iterator

log = logging.getLogger(__name__)


class SamplerPool:
    """Up to ``num_actors`` sampling actors (``cpus``/``gpus`` each), started on first use.

    ``shards_per_call``: shards handed to one actor call (vLLM: ``vllm_batch_size`` draws'
    worth, one ``generate`` call; hf: 1).  ``settings``/``min_chars``/``crash_marker`` as for
    :class:`~dpray.stages.sample.backends.SamplingActor`.
    """

    def __init__(
        self,
        backend: str,
        settings: dict,
        *,
        num_actors: int,
        cpus: float,
        gpus: float,
        min_chars: int,
        shards_per_call: int = 1,
        crash_marker: str | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.num_actors = max(1, num_actors)
        self.cpus = cpus
        self.gpus = gpus
        self.min_chars = min_chars
        self.shards_per_call = max(1, shards_per_call)
        self.crash_marker = crash_marker
        self.actors: list = []
        self.rounds = 0
        self.loads: dict[int, int] = {}  # actor index -> model loads it last reported

    def __enter__(self) -> SamplerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _grow(self, wanted: int, spec: dict) -> None:
        """Start actors up to ``wanted`` (never more than ``num_actors``); existing ones stay."""
        import ray

        from dpray.stages.sample.backends import SamplingActor

        remote = ray.remote(SamplingActor).options(
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            max_restarts=-1,
            max_task_retries=-1,
        )
        while len(self.actors) < min(wanted, self.num_actors):
            self.actors.append(
                remote.remote(
                    self.backend,
                    spec,
                    self.settings,
                    min_chars=self.min_chars,
                    device="auto",  # resolved in the actor, from the GPUs Ray gave it
                    crash_marker=self.crash_marker,
                )
            )

    def calls(self, tasks: list[dict]) -> list[list[dict]]:
        """Shard rows grouped into calls: ``shards_per_call`` each, but spread so that every
        actor gets work while there is enough of it."""
        per = min(self.shards_per_call, max(1, math.ceil(len(tasks) / self.num_actors)))
        return [tasks[i : i + per] for i in range(0, len(tasks), per)]

    def run(self, tasks: list[dict], spec) -> Iterator[dict]:
        """Draw the shards ``tasks`` (rows of :func:`~dpray.stages.sample.shards.shard_task`)
        from ``spec``; yields each call's columns as soon as it is done (any order)."""
        import ray

        if not tasks:
            return
        self.rounds += 1
        spec_dict = spec.to_dict()
        spec_ref = ray.put(spec_dict)  # once per round: the prompts may be many
        queue = deque(self.calls(tasks))
        self._grow(len(queue), spec_dict)
        idle = list(range(len(self.actors)))
        pending: dict = {}
        while queue or pending:
            while queue and idle:
                index = idle.pop()
                rows = queue.popleft()
                batch = {key: [row[key] for row in rows] for key in rows[0]}
                pending[self.actors[index].draw.remote(spec_ref, batch)] = index
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                idle.append(index)
                columns = ray.get(ref)
                self.loads[index] = columns.pop("model_loads", 1)
                yield columns

    def model_loads(self) -> int:
        """Model loads the actors reported with their last results (a restarted actor counts
        from 1 again); read from what came back, so a lost actor cannot block it."""
        return sum(self.loads.values())

    def close(self) -> None:
        """Kill the actors (their GPUs and memory go back to Ray)."""
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor, no_restart=True)
        if self.actors:
            log.info("sample: sampling pool of %d actor(s) closed", len(self.actors))
        self.actors = []


__all__ = ["SamplerPool"]
