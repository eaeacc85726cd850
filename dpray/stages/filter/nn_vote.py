"""Private-Evolution-style voting: each real record votes for its nearest synthetic candidates.

The vote vector (one bin per candidate) is released with Gaussian noise (see ``histogram``:
scheme ``l2``, so a record voting for k candidates gives each ``1/sqrt(k)`` and one unit's
contribution has L2 norm 1).  Everything after the release -- thresholding, picking the top or
sampling in proportion -- is post-processing.

Neighbours are searched by inner product on the L2-normalised embeddings (cosine).  The index is
built from the synthetic (public) candidates only, so which candidates a record votes for depends
on that record alone: approximate search (IVF, used when an exact search would be too slow) keeps
the sensitivity bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import faiss
import numpy as np

EXACT_SEARCH_LIMIT = 2e9
"""Above n_real * n_synthetic pairs, search an IVF index instead of the exact flat one."""
IVF_NPROBE = 16


def nearest_candidates(
    synthetic: np.ndarray, real: np.ndarray, k: int, seed: int = 0
) -> np.ndarray:
    """(n_real, k) indices of each real row's k most similar synthetic rows (distinct)."""
    synthetic = np.ascontiguousarray(synthetic, dtype=np.float32)
    real = np.ascontiguousarray(real, dtype=np.float32)
    k = min(k, len(synthetic))
    d = synthetic.shape[1]
    if len(real) * len(synthetic) <= EXACT_SEARCH_LIMIT:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(min(4 * np.sqrt(len(synthetic)), len(synthetic) // 39))
        index = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(d), d, max(1, nlist), faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = seed % (2**31)
        index.train(synthetic)
        index.nprobe = IVF_NPROBE
    index.add(synthetic)
    _, found = index.search(real, k)
    if (found < 0).any():  # IVF found fewer than k: vote for the nearest found more than once
        first = found[:, :1]
        found = np.where(found < 0, first, found)
    return found.astype(np.int64)


@dataclass
class SelectReport:
    """Counts only (public)."""

    target_size: int
    selected: int
    above_threshold: int
    filled_below_threshold: int
    repeated: int
    shortfall: int

    def to_dict(self) -> dict:
        return asdict(self)


def select(
    noisy_votes: np.ndarray,
    target_size: int,
    threshold: float,
    rng: np.random.Generator,
    mode: Literal["proportional", "top"] = "proportional",
    with_replacement: bool = False,
) -> tuple[np.ndarray, SelectReport]:
    """Pick ``target_size`` candidates from their noisy votes.

    ``top``: the highest noisy votes above ``threshold``.  ``proportional``: sampled without
    replacement with probability proportional to the noisy vote, among those above the
    threshold.  When fewer than ``target_size`` pass, ``with_replacement`` repeats passing
    candidates (in proportion); otherwise the rest is filled with the best candidates below the
    threshold and the count is reported.
    """
    if threshold < 0:
        raise ValueError("threshold must be >= 0 (sampling weights are the votes above it)")
    votes = np.asarray(noisy_votes, dtype=np.float64)
    passing = np.flatnonzero(votes > threshold)
    weights = np.clip(votes[passing], 0.0, None)
    want = int(target_size)
    repeated = filled = 0
    if len(passing) >= want:
        if mode == "top":
            chosen = passing[np.argsort(-votes[passing], kind="stable")[:want]]
        else:
            # threshold >= 0 and votes > threshold, so every passing weight is positive
            chosen = rng.choice(passing, size=want, replace=False, p=weights / weights.sum())
    elif with_replacement and len(passing) > 0:
        extra = rng.choice(
            passing, size=want - len(passing), replace=True, p=weights / weights.sum()
        )
        chosen = np.concatenate([passing, extra])
        repeated = len(extra)
    else:
        rest = np.setdiff1d(np.arange(len(votes)), passing)
        fill = rest[np.argsort(-votes[rest], kind="stable")[: want - len(passing)]]
        chosen = np.concatenate([passing, fill])
        filled = len(fill)
    report = SelectReport(
        target_size=want,
        selected=int(len(chosen)),
        above_threshold=int(len(passing)),
        filled_below_threshold=int(filled),
        repeated=int(repeated),
        shortfall=int(want - len(chosen)),
    )
    return rng.permutation(chosen.astype(np.int64)), report
