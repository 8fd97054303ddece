"""sslray: hyperparameter searches and ablation studies for semi-supervised semantic segmentation.

Public API (imports are lazy so that ``import sslray`` stays cheap)::

    from sslray import TrialConfig, train, list_methods, list_datasets
    result = train("configs/synthetic_fixmatch.yaml", overrides=["train.iterations=200"])
    result["val/miou"], result.history[-1]      # FitResult: the final metrics mapping, the history beside it
    df = load_results(["runs/quickstart", "runs/voc_classic"])   # one row per trial across studies (pandas)
"""
from __future__ import annotations

from sslray.config import ConfigError, TrialConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "TrialConfig", "train", "load_results", "list_methods", "list_datasets", "list_models",
           "__version__"]


def load_results(paths, history: bool = False):
    """One DataFrame of the stored rows of one or more studies (``sslray.results.load_results``): storage
    directories, study files or glob patterns; ``history=True`` for the per-evaluation rows."""
    from sslray.results import load_results as _load

    return _load(paths, history)


def train(config: "TrialConfig | str | dict | None" = None, overrides: list[str] | tuple[str, ...] = (), **kwargs):
    """Run one trial without Ray (see ``sslray.trainer.fit``; returns its ``FitResult``); ``config`` is a
    TrialConfig, a YAML path or a dict."""
    from sslray.trainer import fit

    if config is None or isinstance(config, dict):
        cfg = TrialConfig.from_dict(config or {}).with_overrides(list(overrides))
    elif isinstance(config, str):
        cfg = TrialConfig.from_yaml(config, overrides)
    else:
        cfg = config.with_overrides(list(overrides)) if overrides else config
    return fit(cfg, **kwargs)


def list_methods() -> list[str]:
    from sslray.methods.registry import list_methods as _list  # torch-free

    return _list()


def list_datasets() -> list[str]:
    from sslray.registries import dataset_names  # the names only: no torch

    return dataset_names()


def list_models() -> list[str]:
    from sslray.registries import model_names

    return model_names()
