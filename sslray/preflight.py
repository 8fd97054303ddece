"""What ``sslray run`` checks before it starts Ray, and ``sslray run --dry-run`` with it (neither imports Ray here).

    check_fits(study, local_resources(num_cpus, study), path)   # ClusterTooSmall: one trial needs more than there is
    check_data(todo)                                             # DataError: a dataset root or split file is missing

The storage is checked by ``StudyStorage.check``. Resources of a cluster (``--address``) are known only once Ray is
connected; ``sslray.ray_adapter`` checks them against ``ray.cluster_resources()`` with the same ``check_fits``.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from sslray.config import ConfigError

if TYPE_CHECKING:
    from sslray.study import PlannedTrial, Study

DRIVER_RESOURCE = "train_driver"


class ClusterTooSmall(ConfigError):
    """The study asks for more than the cluster has: reported before anything starts."""


def local_resources(num_cpus: int | None, study: "Study | None" = None) -> dict[str, float]:
    """What the local instance ``sslray run`` would start offers, known without starting it. GPUs are counted (with
    torch) only when ``study`` is None or asks for them."""
    gpus = 0
    if study is None or study.resources.gpus_per_worker > 0:
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": num_cpus or os.cpu_count() or 1, "GPU": gpus, DRIVER_RESOURCE: 1000}


def max_concurrent(study: "Study", cluster: dict[str, float], n_trials: int) -> int:
    """How many trials can run at once without drivers starving workers; 0 means never."""
    r = study.resources
    limits = [n_trials]
    if r.cpus_per_worker > 0:
        limits.append(math.floor(cluster.get("CPU", 0) / (r.workers * r.cpus_per_worker)))
    if r.gpus_per_worker > 0:
        limits.append(math.floor(cluster.get("GPU", 0) / (r.workers * r.gpus_per_worker)))
    if r.workers > 1:
        limits.append(int(cluster.get(DRIVER_RESOURCE, 0)))
    return max(0, min(limits))


def check_fits(study: "Study", cluster: dict[str, float], source: str) -> None:
    r = study.resources
    if r.workers > 1 and cluster.get(DRIVER_RESOURCE, 0) < 1:
        raise ClusterTooSmall(source, "resources.workers",
                              f"{r.workers} workers per trial need a '{DRIVER_RESOURCE}' resource on the head node "
                              f"(ray start --head --resources='{{\"{DRIVER_RESOURCE}\": 100}}'); the cluster has none")
    need = {"CPU": r.workers * r.cpus_per_worker, "GPU": r.workers * r.gpus_per_worker}
    for k, v in need.items():
        if v > cluster.get(k, 0):
            raise ClusterTooSmall(source, "resources",
                                  f"one trial needs {v:g} {k} ({r.workers} workers) but the cluster has "
                                  f"{cluster.get(k, 0):g}")


def check_data(todo: "list[PlannedTrial]") -> int:
    """The cheap data checks a trial makes before training (``FileSource.quick_check``: dataset root, split files
    of the partition, every listed image and mask present), once per distinct data config among ``todo``; the
    synthetic dataset has nothing on disk. Raises DataError / ValueError (one line naming the file); returns how
    many data configs were checked. Reads the files on this machine: a cluster's nodes may see other paths."""
    seen: set[str] = set()
    for p in todo:
        data = p.config.data
        if data.dataset == "synthetic":
            continue
        key = repr(data)
        if key in seen:
            continue
        seen.add(key)
        from sslray.data.datasets import get_spec  # late: torch; only for datasets on disk
        from sslray.data.readers import FileSource

        source = get_spec(data.dataset).make_source(data)
        partition = source.partition(data.partition, data.split_seed)
        if isinstance(source, FileSource):
            source.quick_check(partition, source.val_entries())
    return len(seen)


def describe(cluster: dict[str, Any]) -> str:
    return f"{cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU"
