"""The one place where the names in a trial config are checked against the registries that code fills in.

``model.name`` must be in ``sslray.models.MODELS``, ``data.dataset`` in ``sslray.data.datasets.DATASETS`` (which
``--plugin`` modules may extend), ``data.eval_mode`` (when set) in ``sslray.evaluate.EVAL_MODES``::

    cfg = TrialConfig.from_yaml(path)
    check_names(cfg, source=path)      # ConfigError "<path>: model.name: expected one of [...], got 'unet'"

Method presets and loss terms are checked while ``MethodConfig`` is built (``sslray.config`` imports the method
registry, which never imports the config back). These three registries sit above the config (their modules import
it for their types), so the check lives here, above both: ``study.load_study`` runs it for every cell, ``sslray
train`` and ``sslray validate`` for a trial file.

The model and dataset registries import torch, and the light commands (``status``, ``table``, ``validate``) must
not: the names they hold are listed here (a test checks that they agree with ``MODELS`` and ``DATASETS``), and
whatever a ``--plugin`` adds to a registry counts as soon as its module is loaded (a plugin imports it to register).
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from sslray.config import ConfigError

if TYPE_CHECKING:
    from sslray.config import TrialConfig


EVAL_MODES = ("original", "center_crop", "sliding_window", "sliding_window_v2")  # sslray.evaluate's
MODEL_NAMES = ("small", "deeplabv3plus", "dpt")  # the keys of sslray.models.MODELS
DATASET_NAMES = ("synthetic", "synthetic_voc", "pascal", "cityscapes")  # the keys of sslray.data.datasets.DATASETS


def _names(static: tuple[str, ...], module: str, registry: str) -> list[str]:
    """The built-in names, plus those a plugin added to the registry if its module is loaded."""
    loaded = sys.modules.get(module)
    extra = [n for n in getattr(loaded, registry, {}) if n not in static] if loaded is not None else []
    return [*static, *extra]


def model_names() -> list[str]:
    return _names(MODEL_NAMES, "sslray.models", "MODELS")


def dataset_names() -> list[str]:
    return sorted(_names(DATASET_NAMES, "sslray.data.datasets", "DATASETS"))


def check_names(cfg: "TrialConfig", source: str | None = None) -> None:
    """Raise ConfigError at the dotted key of the first name that is not registered."""
    models, datasets = model_names(), dataset_names()
    if cfg.model.name not in models:
        raise ConfigError(source, "model.name", f"expected one of {models}, got {cfg.model.name!r}")
    if cfg.data.dataset not in datasets:
        raise ConfigError(source, "data.dataset",
                          f"unknown dataset {cfg.data.dataset!r} (known: {', '.join(datasets)})")
    if cfg.data.eval_mode is not None and cfg.data.eval_mode not in EVAL_MODES:
        raise ConfigError(source, "data.eval_mode",
                          f"expected one of {list(EVAL_MODES)}, got {cfg.data.eval_mode!r}")
