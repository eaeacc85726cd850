"""``dpray embed``: sentence embeddings on Ray Data with a content-hash cache (see ``stage``)."""

from dpray.stages.base import Stage, register
from dpray.stages.embed.stage import inputs, run

STAGE = register(
    Stage(
        name="embed",
        run=run,
        help="Embed the real (private) and synthetic (public) instructions on Ray Data.",
        reads="sample/*.parquet, private/ingest/instructions.parquet, private/ingest/heldout.parquet",
        writes="embed/synthetic.{npy,parquet}, embed/report.json, embed_cache/ (public); "
        "private/embed/real.{npy,parquet}, private/embed/heldout.{npy,parquet}, "
        "private/embed_cache/",
        sections=("embed",),
        inputs=inputs,
        needs_ray=True,
    )
)

__all__ = ["STAGE", "run"]
