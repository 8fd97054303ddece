"""cluster.yaml is checked offline with Ray's own launcher validation (no cloud API is called)."""
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cfg)
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = validate(cfg)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert types["head"]["resources"]["train_driver"] == 100  # Tune drivers pinned to the head
    assert any("InstanceMarketOptions" in t["node_config"] for t in types.values())  # spot GPU workers
    assert all(isinstance(c, str) for c in prepared["setup_commands"] + prepared["head_start_ray_commands"])
    assert any("pip install -e /home/ubuntu/sslray" in c for c in prepared["setup_commands"])
    assert any("/mnt/sslray" in c for c in prepared["setup_commands"])  # shared storage for results


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(setup_command=[]), "setup_command"),
    (lambda c: c["available_node_types"]["head"]["resources"].update(train_driver=0.5), "integer"),
    (lambda c: c.update(head_node_type="nope"), "head_node_type"),
])
def test_broken_variants_are_rejected(mutate, needle):
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    mutate(cfg)
    with pytest.raises(Exception, match=needle):
        validate(cfg)
