"""Per-node resource fitting (dpray.resources) against fake ``ray.nodes()`` data."""

from __future__ import annotations

import pytest

from dpray.resources import (
    NodeShape,
    ResourceError,
    alive_nodes,
    describe_nodes,
    fit_workers,
    local_device,
)


def node(cpus: float, gpus: float = 0, alive: bool = True, **labels) -> dict:
    res = {"CPU": cpus, "memory": 1e9}
    if gpus:
        res["GPU"] = gpus
    return {"Alive": alive, "Resources": res, "Labels": labels, "NodeID": "x"}


def test_head_with_zero_cpus_plus_workers():
    nodes = [node(0), node(4), node(4)]
    assert fit_workers("train-generator", 2, nodes=nodes).cpus == 4
    assert fit_workers("train-generator", 3, nodes=nodes).cpus == 2
    assert fit_workers("train-generator", 8, nodes=nodes).cpus == 1
    with pytest.raises(ResourceError, match="hold 8 .*1 x \\{CPU: 0\\}"):
        fit_workers("train-generator", 9, nodes=nodes)


def test_more_nodes_than_workers_never_asks_beyond_one_node():
    nodes = [node(4)] * 4  # cluster total 16; 16 // 2 = 8 fits no node
    shape = fit_workers("train-generator", 2, nodes=nodes)
    assert shape.cpus == 4 and shape.workers == 2 and shape.device == "cpu"
    assert fit_workers("sample", 2, nodes=nodes, max_cpus=1).cpus == 1


def test_gpu_asked_on_cpu_only_nodes_names_the_missing_shape():
    with pytest.raises(ResourceError) as info:
        fit_workers("train-generator", 2, gpus=1, nodes=[node(4), node(4)])
    assert str(info.value) == (
        "train-generator asks for 2 workers with 1 GPU each; no alive Ray node has a GPU "
        "(nodes: 2 x {CPU: 4})"
    )


def test_gpu_workers_pack_by_gpus_and_share_the_cpus():
    nodes = [node(0), node(8, gpus=2), node(8, gpus=2)]
    shape = fit_workers("align", 4, gpus=1, nodes=nodes)
    assert (shape.cpus, shape.gpus, shape.device) == (4, 1, "cuda")
    with pytest.raises(ResourceError, match="hold 4"):
        fit_workers("align", 5, gpus=1, nodes=nodes)


def test_fixed_cpus_are_checked_per_node():
    nodes = [node(4), node(4)]
    assert fit_workers("align", 2, cpus=3, nodes=nodes).cpus == 3
    with pytest.raises(ResourceError, match="no alive Ray node has 6 CPUs"):
        fit_workers("align", 1, cpus=6, nodes=nodes)
    with pytest.raises(ResourceError, match="hold 2"):
        fit_workers("align", 3, cpus=3, nodes=nodes)


def test_dead_nodes_are_ignored_and_no_nodes_is_an_error():
    nodes = [node(16, alive=False), node(2, zone="a")]
    assert alive_nodes(nodes) == [NodeShape(2.0, 0.0)]
    assert alive_nodes(nodes)[0].labels == {"zone": "a"}
    assert fit_workers("embed", 1, nodes=nodes).cpus == 2
    with pytest.raises(ResourceError, match="no alive nodes"):
        fit_workers("embed", 1, nodes=[node(4, alive=False)])
    assert describe_nodes([NodeShape(4, 1), NodeShape(0)]) == "1 x {CPU: 4, GPU: 1}, 1 x {CPU: 0}"


def test_local_device_outside_ray_follows_this_machine():
    import torch

    assert local_device("cpu") == "cpu"
    assert local_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
