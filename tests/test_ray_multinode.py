"""Several Ray nodes on one machine: a study whose trials use 2 Train workers (gloo, CPU) on different nodes."""
import json

import pytest
import yaml

from sslray.results import ResultsStore
from sslray.study import load_study

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture()
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"train_driver": 4}})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_workers_on_two_nodes(tmp_path, two_node_cluster):
    import ray

    from sslray import ray_adapter

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    study = {
        "name": "multinode",
        "base": {"data": {"crop_size": 32, "batch_size_x": 4, "batch_size_u": 4, "partition": "4",
                          "synthetic": {"size": 32, "num_train": 24, "num_val": 6}},
                 "model": {"name": "small", "width": 8}, "method": {"name": "fixmatch"},
                 "train": {"iterations": 4, "eval_every": 2}, "run": {"threads": 1}},
        "seeds": [0],
        "resources": {"workers": 2, "cpus_per_worker": 1, "placement": "spread"},
        "storage": str(tmp_path / "store"),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    s = load_study(str(path))
    summary = ray_adapter.run_study(s, address=two_node_cluster.address, verbose=False)
    assert summary.ok == 1, summary
    row = ResultsStore(str(tmp_path / "store")).load().iloc[0]
    assert row["status"] == "ok" and row["world_size"] == 2
    nodes = json.loads(row["nodes"]) if isinstance(row["nodes"], str) else list(row["nodes"])
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(set(nodes)) == 2 and set(nodes) <= alive  # the two DDP ranks ran on different nodes
    assert row["val/miou"] >= 0 and row["iteration"] == 4
