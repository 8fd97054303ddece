"""``train.epochs`` in study files: a schedule length counted the way UniMatch counts it, turned into iterations.

UniMatch (``unimatch.py``) trains ``total_iters = len(trainloader_u) * epochs`` iterations, where ``trainloader_u``
is a ``DataLoader`` with ``drop_last=True`` over a ``DistributedSampler`` of the *unlabeled* set on each of its
GPUs; its ``supervised.py`` counts ``len(trainloader)`` of the *labeled* set instead. A DistributedSampler gives each
of ``W`` ranks ``ceil(n / W)`` samples (padding by repetition), and each rank's loader takes ``batch / W`` of them a
step, dropping the last partial batch, so one epoch is::

    iterations_per_epoch = ceil(n / W) // (batch / W)      # W = train.epoch_gpus, batch = data.batch_size_u (or _x)

With one GPU (the default, ``W = 1``) that is ``n // batch``; with the 4 GPUs of UniMatch's configs and the same
global batch of 8 it can be one more (VOC 183: 10,399 unlabeled -> 1,300 rather than 1,299), which is why a study
that reproduces a paper's schedule says ``train.epoch_gpus: 4``.

Three study-file keys (anywhere a study sets config keys: ``base``, grid values, paired-axis entries, ablation
variants), resolved before the trial config is built, so the trial's config, id and result row hold the resulting
``train.iterations`` (a study written with epochs plans the same trials as one written with the iterations)::

    train.epochs       integer >= 1; exclusive with train.iterations written at the same place
    train.epoch_over   auto (default: the labeled set for method supervised, else the unlabeled set) | unlabeled
                       | labeled (which set one epoch passes over)
    train.epoch_gpus   integer >= 1 dividing the batch: the GPU count the epoch is counted over (default 1)

``train.eval_every`` defaults to one epoch's iterations (UniMatch evaluates after every epoch) when it is not
written. The set sizes come from the split files under ``data.splits_dir`` when they are there, else from the
published UniMatch split counts (``sslray.data.fingerprints.UNIMATCH``), and for the synthetic dataset from its
pool size and the partition.
"""
from __future__ import annotations

import functools
import os
from typing import Any

from sslray.config import ConfigError, TrialConfig

EPOCH_KEYS = {"train.epochs": int, "train.epoch_over": str, "train.epoch_gpus": int}
EPOCH_OVER = ("auto", "unlabeled", "labeled")


def pop_epoch_keys(d: dict) -> dict[str, Any]:
    """Remove the epoch keys from a nested config dict (in place); returns them by field name (``epochs``, ...)."""
    train = d.get("train")
    if not isinstance(train, dict):
        return {}
    return {k: train.pop(k) for k in ("epochs", "epoch_over", "epoch_gpus") if k in train}


def check_epoch_keys(keys: dict[str, Any]) -> None:
    """Types and values of the written epoch keys; ConfigError(None, 'train.<key>', ...)."""
    if not keys:
        return
    if "epochs" not in keys:
        other = next(iter(keys))
        raise ConfigError(None, f"train.{other}", "only means something with train.epochs")
    for name in ("epochs", "epoch_gpus"):
        v = keys.get(name, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(None, f"train.{name}", f"expected an integer >= 1, got {v!r}")
    if keys.get("epoch_over", "auto") not in EPOCH_OVER:
        raise ConfigError(None, "train.epoch_over", f"expected one of {', '.join(EPOCH_OVER)}, "
                                                    f"got {keys['epoch_over']!r}")


def epoch_iterations(cfg: TrialConfig, over: str = "auto", gpus: int = 1) -> int:
    """Iterations of one epoch of ``cfg`` (see the module docstring); ConfigError when a size is unknown."""
    if over == "auto":
        over = "labeled" if cfg.method.name == "supervised" else "unlabeled"
    batch = cfg.data.batch_size_x if over == "labeled" else cfg.data.batch_size_u
    key = "data.batch_size_x" if over == "labeled" else "data.batch_size_u"
    if batch % gpus:
        raise ConfigError(None, "train.epoch_gpus", f"{gpus} GPUs do not divide {key} = {batch}")
    n = set_sizes(cfg)[0 if over == "labeled" else 1]
    per_epoch = -(-n // gpus) // (batch // gpus)
    if per_epoch < 1:
        raise ConfigError(None, "train.epochs", f"the {over} set ({n} images) is smaller than one batch of "
                                                f"{batch}: an epoch has no iterations")
    return per_epoch


def set_sizes(cfg: TrialConfig) -> tuple[int, int]:
    """(labeled, unlabeled) image counts of the trial's partition, without reading any image."""
    d = cfg.data
    if d.dataset == "synthetic":
        from sslray.data.splits import parse_partition_spec

        n = parse_partition_spec(d.partition, d.synthetic.num_train)
        return n, d.synthetic.num_train - n
    sizes = []
    for which in ("labeled", "unlabeled"):
        n = _split_file_lines(d.splits_dir, d.dataset, str(d.partition), which)
        if n is None:
            n = _published_count(d.dataset, str(d.partition), which)
        if n is None:
            raise ConfigError(None, "train.epochs", f"needs the size of the {which} set of {d.dataset} partition "
                                                    f"{d.partition!r}: no {which}.txt under data.splits_dir and not "
                                                    "a published UniMatch split; write train.iterations instead")
        sizes.append(n)
    return sizes[0], sizes[1]


def _published_count(dataset: str, partition: str, which: str) -> int | None:
    from sslray.data.fingerprints import UNIMATCH

    entry = UNIMATCH.get(f"{dataset}/{partition}/{which}")
    return entry[0] if entry else None


def _split_file_lines(splits_dir: str | None, dataset: str, partition: str, which: str) -> int | None:
    if not splits_dir:
        return None
    for folder in (os.path.join(splits_dir, dataset, partition), os.path.join(splits_dir, partition)):
        path = os.path.join(folder, f"{which}.txt")
        if os.path.isfile(path):
            st = os.stat(path)
            return _count_lines(path, st.st_mtime_ns, st.st_size)
    return None


@functools.lru_cache(maxsize=256)
def _count_lines(path: str, mtime_ns: int, size: int) -> int:
    """Non-blank lines of a split file (cached by path, mtime and size: a study plans many trials per file)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
