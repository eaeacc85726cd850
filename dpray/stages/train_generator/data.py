"""Training examples for the generator, Poisson sampling, and micro-batch packing.

Every example is ``prompt + instruction + stop`` where ``prompt`` is the generator's fixed,
public prompt and ``stop`` its end token (see :mod:`~dpray.stages.train_generator.formats`: for a
chat model the template up to the user turn and its end-of-turn token; for a base model BOS plus
the template, and EOS).  The loss covers only the instruction and the stop token.  The sampling
stage starts generation from exactly the same prompt.

Sampling is true Poisson sampling: at every step each privacy unit (a record, or a user with all
their records) joins independently with probability q.  Each worker samples its own partition
(:func:`read_partition_units`; partitions are disjoint, each user in exactly one), so the union is
a Poisson sample of the whole set.  The randomness comes from a secret
seed that every worker draws from the OS at the start of every attempt (:class:`PoissonSampler`;
held in memory only: never logged, never in a checkpoint), so the realised batch stays private
and a step redone after a restart samples a fresh batch, independent of the lost attempt's -- the
ledger counts every executed step as its own subsampled release, which needs exactly that.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


def generator_prompt_ids(tokenizer, template: str = "") -> list[int]:
    """The unconditional format's prompt: BOS (or EOS) plus ``template``."""
    from dpray.stages.train_generator.formats import unconditional_prompt_ids

    return unconditional_prompt_ids(tokenizer, template)


def tokenize_instructions(
    texts: list[str],
    tokenizer,
    max_tokens: int,
    template: str = "",
    *,
    prompt: list[int] | None = None,
    stop_id: int | None = None,
) -> list[np.ndarray]:
    """``prompt + text + stop`` token ids per text, truncated to ``max_tokens`` (int32 arrays).

    Default prompt and stop: the unconditional format (BOS + ``template``, EOS).  A text cut at
    ``max_tokens`` still ends with the stop token, so the generator learns to stop.
    """
    if prompt is None:
        prompt = generator_prompt_ids(tokenizer, template)
    room = max_tokens - len(prompt) - 1
    if room < 1:
        raise ValueError(
            f"train.max_tokens={max_tokens} leaves no room after the {len(prompt)}-token prompt"
        )
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stop = int(tokenizer.eos_token_id if stop_id is None else stop_id)
    return [np.asarray(list(prompt) + ids[:room] + [stop], dtype=np.int32) for ids in encoded]


@dataclass
class Batch:
    """A padded micro-batch; ``units`` maps each row to its privacy unit within the batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    units: torch.Tensor  # (rows,) index of the privacy unit of each row, 0..num_units-1
    num_units: int
    num_tokens: int


def collate(sequences: list[np.ndarray], units: list[int], prompt_len: int, pad_id: int) -> Batch:
    """Right-pad sequences; labels ignore the prompt and the padding."""
    longest = max(len(s) for s in sequences)
    rows = len(sequences)
    input_ids = torch.full((rows, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, longest), dtype=torch.long)
    labels = torch.full((rows, longest), IGNORE, dtype=torch.long)
    for row, seq in enumerate(sequences):
        t = torch.from_numpy(seq.astype(np.int64))
        input_ids[row, : len(t)] = t
        attention[row, : len(t)] = 1
        labels[row, prompt_len : len(t)] = t[prompt_len:]
    remap = {u: i for i, u in enumerate(dict.fromkeys(units))}
    unit_idx = torch.tensor([remap[u] for u in units], dtype=torch.long)
    num_tokens = int((labels != IGNORE).sum())
    return Batch(input_ids, attention, labels, unit_idx, len(remap), num_tokens)


def poisson_sample(num_units: int, rate: float, seed: int, step: int, rank: int) -> np.ndarray:
    """Indices of the units of one shard that join this step (each independently with ``rate``)."""
    rng = np.random.default_rng([seed, step, rank])
    return np.flatnonzero(rng.random(num_units) < rate)


class PoissonSampler:
    """Poisson sampling of one worker's shard for ONE training attempt.

    Build one when a worker (re)starts: its seed comes from the OS, so every attempt -- the first
    run and each restart from a checkpoint -- samples independently, and a step executed twice
    releases two noisy sums of two independent batches (what the ledger counts).  A seed fixed
    for the run would redo the lost attempt's batch.  The seed stays in this object: it is not
    part of the plan, the logs, the metrics or a checkpoint.
    """

    def __init__(self, shard: np.ndarray, rate: float, rank: int) -> None:
        self.shard = np.asarray(shard)
        self.rate = float(rate)
        self.rank = int(rank)
        self._seed = secrets.randbits(128)

    def __call__(self, step: int) -> np.ndarray:
        """The unit indices (from the shard) that join ``step``, each independently with q."""
        return self.shard[poisson_sample(len(self.shard), self.rate, self._seed, step, self.rank)]

    def __repr__(self) -> str:  # never show the seed
        return f"PoissonSampler(units={len(self.shard)}, rate={self.rate:g}, rank={self.rank})"


def batch_digest(units: np.ndarray) -> str:
    """A short fingerprint of a realised batch (its sorted unit indices).

    The realised batch is private: the digest goes to ``private/train/metrics.jsonl`` only (it
    lets a test see that a step redone after a restart drew a fresh batch).
    """
    import hashlib

    data = np.sort(np.asarray(units, dtype=np.int64)).tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def pack_micro_batches(unit_sizes: list[int], max_rows: int) -> list[list[int]]:
    """Group units into micro-batches of at most ``max_rows`` rows, never splitting a unit.

    A user's records must share a micro-batch so their gradients can be summed before clipping.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for unit, size in enumerate(unit_sizes):
        if size > max_rows:
            raise ValueError(f"a unit has {size} records > micro_batch_size {max_rows}")
        if rows + size > max_rows and current:
            batches.append(current)
            current, rows = [], 0
        current.append(unit)
        rows += size
    if current:
        batches.append(current)
    return batches


def read_partition_units(files, unit: str) -> tuple[list[list[int]], list[str], list[str]]:
    """Privacy units of some partition files: ``(members, texts, ids)``.

    ``members`` lists each unit's record indices into ``texts``/``ids``: one record each at
    instruction level, a user's records (all in one partition) at user level.
    """
    import pyarrow.parquet as pq

    texts: list[str] = []
    ids: list[str] = []
    users: list[str] = []
    for path in files:
        table = pq.read_table(path, columns=["id", "text", "user_id"])
        texts += table.column("text").to_pylist()
        ids += table.column("id").to_pylist()
        users += table.column("user_id").to_pylist()
    if unit == "user":
        groups: dict[str, list[int]] = {}
        for index, user in enumerate(users):
            groups.setdefault(user, []).append(index)
        return list(groups.values()), texts, ids
    return [[i] for i in range(len(texts))], texts, ids


def shard_units(num_units: int, rank: int, world_size: int) -> np.ndarray:
    """The disjoint shard of unit indices held by ``rank``."""
    return np.arange(rank, num_units, world_size)
