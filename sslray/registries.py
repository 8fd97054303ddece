"""The one place where the names in a trial config are checked against the registries that code fills in.

``model.name`` must be in ``sslray.models.MODELS``, ``data.dataset`` in ``sslray.data.datasets.DATASETS`` (which
``--plugin`` modules may extend), ``data.eval_mode`` (when set) in ``sslray.evaluate.EVAL_MODES``::

    cfg = TrialConfig.from_yaml(path)
    check_names(cfg, source=path)      # ConfigError "<path>: model.name: expected one of [...], got 'unet'"

Method presets and loss terms are checked while ``MethodConfig`` is built (``sslray.config`` imports the method
registry, which never imports the config back). These three registries sit above the config (their modules import
it for their types), so the check lives here, above both: ``study.load_study`` runs it for every cell, ``sslray
train`` and ``sslray validate`` for a trial file. Imports are late: the registries import torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sslray.config import ConfigError

if TYPE_CHECKING:
    from sslray.config import TrialConfig


def check_names(cfg: "TrialConfig", source: str | None = None) -> None:
    """Raise ConfigError at the dotted key of the first name that is not registered."""
    from sslray.data.datasets import DATASETS, list_datasets
    from sslray.evaluate import EVAL_MODES
    from sslray.models import MODELS

    if cfg.model.name not in MODELS:
        raise ConfigError(source, "model.name", f"expected one of {list(MODELS)}, got {cfg.model.name!r}")
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(source, "data.dataset",
                          f"unknown dataset {cfg.data.dataset!r} (known: {', '.join(list_datasets())})")
    if cfg.data.eval_mode is not None and cfg.data.eval_mode not in EVAL_MODES:
        raise ConfigError(source, "data.eval_mode",
                          f"expected one of {list(EVAL_MODES)}, got {cfg.data.eval_mode!r}")
