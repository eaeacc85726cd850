"""``dpray filter``: DP filtering of the synthetic candidates (see ``stage``).

Modules, one job each: ``histogram`` (the DP math: votes, sensitivity, noise), ``rows``
(embeddings read from disk chunk by chunk), ``cluster`` (PCA + k-means on synthetic),
``assign`` (nearest-centre labels chunk by chunk, in Ray tasks on every node if asked),
``nn_vote`` (nearest-candidate votes), ``resample`` (quotas that meet ``target_size``), ``core``
(the two methods on arrays or rows), ``metrics`` (non-private evaluation on the held-out split),
``stage`` (files and ledger).
"""

from dpray.stages.base import Stage, register
from dpray.stages.filter.stage import inputs, run

STAGE = register(
    Stage(
        name="filter",
        run=run,
        help="Match the synthetic set to a noisy (DP) histogram of the real instructions.",
        reads="embed/synthetic.{npy,parquet}, sample/*.parquet (texts), "
        "private/embed/real.{npy,parquet}, "
        "private/embed/heldout.npy (evaluation only), ledger.json",
        writes="filter/filtered.parquet, filter/noisy_histogram.json, filter/report.json, "
        "filter/metrics.json + cluster_shares.png (non-private held-out evaluation), "
        "private/filter/exact_histogram.json, ledger.json (spend)",
        sections=("filter", "privacy"),
        inputs=inputs,
        needs_ray=False,
        spends_budget=True,
    )
)

__all__ = ["STAGE", "run"]
