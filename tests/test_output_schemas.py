"""One schema per public output folder, so every folder loads as one table.

``datasets.load_dataset("parquet", data_files=f"{run}/sample/*.parquet")`` (or ``**/*.parquet``)
reads a folder as one dataset only if its Parquet files share a schema, subfolders included:
``sample/`` once held the resumable draw shards (another schema) in ``sample/draws/``, and
``annotate/`` the SFT pairs and the preference pairs side by side.
:func:`assert_one_schema_per_folder` is run on the finished smoke run of ``test_multinode`` and on the
sampling stage's output in ``test_sample``.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def public_parquet(root: Path) -> list[Path]:
    private = root / "private"
    return sorted(p for p in root.rglob("*.parquet") if private not in p.parents)


def schemas_by_folder(root: Path) -> dict[str, dict[str, list[str]]]:
    """For each public folder that holds Parquet files itself: the schemas of every Parquet file
    under it (subfolders included), each with the files that have it."""
    files = public_parquet(root)
    data_folders = {p.parent for p in files}
    found: dict[str, dict[str, list[str]]] = {}
    for folder in sorted(data_folders):
        schemas: dict[str, list[str]] = defaultdict(list)
        for path in files:
            if folder == path.parent or folder in path.parents:
                schema = pq.read_schema(path).remove_metadata().to_string()
                schemas[schema].append(path.relative_to(root).as_posix())
        found[folder.relative_to(root).as_posix()] = dict(schemas)
    return found


def assert_one_schema_per_folder(root: Path, load_with_datasets: bool = False) -> list[str]:
    """Fail naming each public folder whose Parquet files (subfolders included) have more than
    one schema; returns the folders checked.  With ``load_with_datasets``, also load each one
    with ``datasets.load_dataset("parquet", data_files=...)`` (or, without ``datasets``, as one
    ``pyarrow.dataset``) and check the row count."""
    found = schemas_by_folder(root)
    mixed = {folder: list(s.values()) for folder, s in found.items() if len(s) > 1}
    assert not mixed, f"folders with more than one Parquet schema: {mixed}"
    if load_with_datasets:
        for folder in found:
            _load_folder(root / folder)
    return sorted(found)


def _load_folder(folder: Path) -> None:
    files = sorted(folder.rglob("*.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    try:
        import datasets
    except ImportError:
        import pyarrow.dataset as ds

        table = ds.dataset([str(p) for p in files], format="parquet").to_table()
        assert table.num_rows == rows, folder
        return
    with tempfile.TemporaryDirectory() as cache:
        loaded = datasets.load_dataset(
            "parquet", data_files=str(folder / "**" / "*.parquet"), cache_dir=cache
        )
    assert loaded["train"].num_rows == rows, folder


def _write(path: Path, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_a_subfolder_of_another_schema_is_caught(tmp_path):
    _write(tmp_path / "sample" / "part-00000.parquet", text=["a"], sample_id=[1])
    _write(tmp_path / "sample" / "part-00001.parquet", text=["b"], sample_id=[2])
    _write(tmp_path / "sample_draws" / "draw-000000.parquet", raw=["a"], truncated=[False])
    _write(tmp_path / "annotate" / "pairs" / "train.parquet", prompt=["a"], completion=["b"])
    _write(tmp_path / "private" / "ingest" / "x.parquet", id=["1"])  # not public: not checked
    checked = assert_one_schema_per_folder(tmp_path, load_with_datasets=True)
    assert checked == ["annotate/pairs", "sample", "sample_draws"]

    _write(tmp_path / "sample" / "draws" / "draw-000000.parquet", raw=["a"], truncated=[False])
    with pytest.raises(AssertionError, match="'sample'"):
        assert_one_schema_per_folder(tmp_path)
