"""Partitions (silos) of the private data: written by ingest, each read by its own worker only.

Secure DP-SGD is cross-silo training: worker k reads only partition k of the private data from
its own file, samples it with its own secret seed, and sends out only masked, noisy shares.  The
driver never holds a record: it hands each worker a partition number and the folder, nothing
else.  Ingest defines the partitions, each privacy unit (a user with all their records, or one
record) in exactly one of them:

* ``data.partition_field``: one partition per distinct value of that field (sorted); a user whose
  records name two silos keeps those of the first and the others are dropped (``partition_conflict``);
* ``data.path`` as a list: partition k holds the records read from the k-th path;
* otherwise users are spread over ``data.partitions`` (default ``train.num_workers``) partitions
  by a keyed hash of their id (HMAC-SHA256 under a key derived from the run seed), so the
  assignment is deterministic and depends on nothing but the user's own id.

Layout (under ``private/``: derived from private data without DP)::

    private/ingest/partitions/part-<k>.parquet   id, text, user_id: partition k's training records
    private/ingest/partitions/manifest.json      how they were cut, how many, the total unit count

The manifest holds no per-partition counts: the driver reads it for ``n`` (released anyway, in
``ingest/report.json``) and the number of partitions, and learns nothing about a single silo.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DIRNAME",
    "MANIFEST",
    "partition_key",
    "hash_partition",
    "write_partitions",
    "read_manifest",
    "partition_path",
    "partition_files",
    "assigned_partitions",
    "partition_for_labels",
]

DIRNAME = "partitions"
MANIFEST = "manifest.json"


def partition_key(seed: int) -> bytes:
    """The HMAC key of hash partitioning (from the run seed: deterministic across reruns)."""
    return hashlib.sha256(f"dpray/partition/v1|{seed}".encode()).digest()


def hash_partition(user_id: str, key: bytes, count: int) -> int:
    """The partition of ``user_id`` among ``count``: HMAC-SHA256(key, id) mod count."""
    digest = hmac.new(key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % count


def partition_path(directory: str | Path, k: int) -> Path:
    return Path(directory) / f"part-{k}.parquet"


def write_partitions(
    directory: str | Path,
    records: Sequence[dict],
    assignment: Sequence[int],
    count: int,
    *,
    by: str,
    unit: str,
    names: Sequence[str] | None = None,
) -> dict:
    """Write ``records`` (dicts with id, text, user_id) to ``count`` partition files.

    ``assignment[i]`` is record i's partition.  Stale files of an earlier, larger partitioning
    are removed.  Returns the manifest (also written, last).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buckets: list[list[dict]] = [[] for _ in range(count)]
    owner: dict[str, int] = {}
    for record, k in zip(records, assignment, strict=True):
        if not 0 <= k < count:
            raise ValueError(f"partition {k} out of range for {count} partitions")
        if owner.setdefault(record["user_id"], k) != k:
            raise ValueError("a user was assigned to two partitions")  # ingest prevents this
        buckets[k].append(record)
    for stale in directory.glob("part-*.parquet"):
        stale.unlink()
    for k, bucket in enumerate(buckets):
        table = pa.table(
            {
                "id": pa.array([r["id"] for r in bucket], pa.string()),
                "text": pa.array([r["text"] for r in bucket], pa.string()),
                "user_id": pa.array([r["user_id"] for r in bucket], pa.string()),
            }
        )
        pq.write_table(table, partition_path(directory, k))
    units = len(owner) if unit == "user" else len(records)
    manifest = {
        "by": by,
        "count": count,
        "files": [partition_path(directory, k).name for k in range(count)],
        "unit": unit,
        "units": units,
    }
    if names is not None:
        manifest["names"] = [str(n) for n in names]
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no partitions of the private data; run `dpray ingest` again (it writes "
            "one file per partition)"
        )
    return json.loads(path.read_text())


def partition_files(directory: str | Path, partitions: Iterable[int]) -> list[Path]:
    return [partition_path(directory, k) for k in partitions]


def assigned_partitions(rank: int, world: int, count: int) -> list[int]:
    """Partitions worker ``rank`` of ``world`` reads when not pinned: those with k ≡ rank mod W."""
    return [k for k in range(count) if k % world == rank]


def partition_for_labels(node_labels: dict[str, str], selectors: Sequence[dict[str, str]]) -> int:
    """The one partition whose label selector this node satisfies (pinned placement).

    Raises ``ValueError`` when the node matches none or several: a worker must never guess which
    silo's data to read.
    """
    matches = [
        k
        for k, selector in enumerate(selectors)
        if all(node_labels.get(key) == value for key, value in selector.items())
    ]
    if len(matches) != 1:
        raise ValueError(
            f"this node's labels match {len(matches)} of the {len(selectors)} partition label "
            "selectors (train.partition_labels); each silo node must match exactly one"
        )
    return matches[0]
