"""Resource arithmetic of ray_adapter (no Ray instance needed): drivers never starve their workers."""
import pytest
import yaml

from sslray.config import ConfigError
from sslray.study import load_study


def study(tmp_path, resources):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "r", "base": {"train": {"iterations": 2}}, "seeds": [0, 1, 2],
                                 "resources": resources}))
    return load_study(str(p))


def test_single_worker_trials_hold_their_worker(tmp_path):
    from sslray.ray_adapter import max_concurrent, trial_resources

    s = study(tmp_path, {"workers": 1, "cpus_per_worker": 1})
    assert trial_resources(s) == {"cpu": 1, "gpu": 0}
    assert max_concurrent(s, {"CPU": 2.0}, 3) == 2
    assert max_concurrent(s, {"CPU": 8.0}, 3) == 3  # never more than there are trials


def test_multi_worker_drivers_use_the_driver_resource(tmp_path):
    from sslray.ray_adapter import DRIVER_RESOURCE, max_concurrent, trial_resources

    s = study(tmp_path, {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1})
    assert trial_resources(s) == {"cpu": 0, DRIVER_RESOURCE: 1}
    # 4 CPUs would fit two trials, but 3 GPUs fit only one 2-GPU trial.
    assert max_concurrent(s, {"CPU": 4.0, "GPU": 3.0, DRIVER_RESOURCE: 100}, 3) == 1
    assert max_concurrent(s, {"CPU": 16.0, "GPU": 8.0, DRIVER_RESOURCE: 2}, 3) == 2  # capped by driver slots


@pytest.mark.parametrize("resources, cluster, key, needle", [
    ({"workers": 4, "cpus_per_worker": 1}, {"CPU": 2.0, "train_driver": 10}, "resources",
     "one trial needs 4 CPU (4 workers) but the cluster has 2"),
    ({"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1}, {"CPU": 2.0}, "resources",
     "one trial needs 1 GPU (1 workers) but the cluster has 0"),
    ({"workers": 2, "cpus_per_worker": 1}, {"CPU": 8.0}, "resources.workers", "train_driver"),
])
def test_cluster_too_small_is_a_clear_error(tmp_path, resources, cluster, key, needle):
    from sslray.ray_adapter import check_fits

    s = study(tmp_path, resources)
    with pytest.raises(ConfigError) as e:
        check_fits(s, cluster, s.path)
    assert e.value.key == key and needle in str(e.value)
    assert str(e.value).startswith(f"{s.path}: {key}: ")
