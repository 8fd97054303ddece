"""Readable names for tables and figures: config keys, metrics (with their units) and method presets.

A study's ``report.names`` (``{raw name: display name}``) overrides any entry; a composed method ``a+b`` reads as
``A + B``. Raw names stay in CSV output and in the results (they are what ``--baseline`` and ``--rows`` take).
"""
from __future__ import annotations

from typing import Mapping

KEY_NAMES = {"method.name": "method", "data.partition": "labeled images", "variant": "variant", "seed": "seed",
             "model.name": "model", "model.backbone": "backbone", "data.dataset": "dataset",
             "method.conf_thresh": "confidence threshold", "optim.lr": "learning rate",
             "train.iterations": "iterations"}
METRIC_NAMES = {"val/miou": "mIoU (%)", "val/pixel_acc": "pixel accuracy (%)", "val/iou": "IoU (%)",
                "train/mask_ratio": "mask ratio", "train/pseudo_acc": "pseudo-label accuracy",
                "train/loss": "training loss"}
METHOD_NAMES = {"supervised": "Supervised", "fixmatch": "FixMatch", "unimatch": "UniMatch", "meanteacher": "Mean Teacher",
                "ipixmatch": "IPixMatch", "guidedmix": "GuidedMix-Net", "guidedmix_paper": "GuidedMix-Net (paper)",
                "pcr_base": "U2PL-style base", "pcr": "PCR", "mllc": "MLLC"}


def display(name: str, names: Mapping[str, str] | None = None) -> str:
    """The readable form of a key, metric or method name (``names`` first); unknown names unchanged."""
    names = names or {}
    if name in names:
        return names[name]
    for table in (KEY_NAMES, METRIC_NAMES, METHOD_NAMES):
        if name in table:
            return table[name]
    if "+" in name and all(p.strip() in METHOD_NAMES or p.strip() in names for p in name.split("+")):
        return " + ".join(display(p.strip(), names) for p in name.split("+"))
    return name


def metric_label(metric: str, agg: str = "last", names: Mapping[str, str] | None = None) -> str:
    """``mIoU (%)``, or ``best mIoU (%)`` for the best evaluation."""
    label = display(metric, names)
    return f"best {label}" if agg == "best" else label
