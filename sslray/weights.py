"""Local backbone weight files: read, unwrap and check a state dict before it is loaded (nothing is downloaded).

Shared by the ResNet DeepLabV3+ (``models.py``) and the DINOv2 DPT (``dpt.py``)::

    sd = read_state_dict(path)                 # FileNotFoundError / ValueError naming the file
    check_keys(encoder, sd, path)              # ValueError listing missing, unexpected, mis-shaped keys
    encoder.load_state_dict(sd, strict=False)  # strictness was checked above

Only torch; nothing here knows about configs or models.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

# keys a segmentation backbone never has: a torchvision ResNet's classifier, a ViT's classification head
CLASSIFIER_PREFIXES = ("fc.", "head.")


def unwrap_state_dict(obj: object, path: str) -> dict[str, Tensor]:
    """Peel ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and ``module.`` / ``backbone.`` prefixes,
    and drop the classifier (``fc.*``, ``head.*``), which a segmentation backbone does not have."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        what = f"top-level keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: no state dict of tensors found ({what})")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
        elif any(k.startswith(prefix) for k in sd):
            # a full segmentation checkpoint: keep only the backbone part
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES)}


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The unwrapped tensors of a local weight file (``torch.load(weights_only=True)``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained backbone weights not found: {path!r} (sslray never downloads weights)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise ValueError(f"{path}: not a readable torch weight file ({type(e).__name__}: {str(e)[:200]})") from None
    return unwrap_state_dict(obj, path)


def check_keys(module: nn.Module, sd: dict[str, Tensor], path: str) -> None:
    """Raise ValueError naming ``path`` and every missing, unexpected or mis-shaped key of ``sd`` for ``module``.

    ``num_batches_tracked`` may be absent (older torchvision checkpoints; BatchNorm fills it in itself)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: backbone weights do not match: missing keys {short_list(missing)}; "
                         f"unexpected keys {short_list(unexpected)}; shape mismatches {short_list(shapes)}")


def load_backbone_weights(encoder: nn.Module, path: str) -> None:
    """Load torchvision ResNet weights from a local file into ``encoder``, checking every key and shape.

    Raises:
        FileNotFoundError: ``path`` does not exist (nothing is ever downloaded).
        ValueError: missing, unexpected or mis-shaped backbone keys (listed in the message).
    """
    sd = read_state_dict(path)
    check_keys(encoder, sd, path)
    encoder.load_state_dict(sd, strict=False)  # strictness checked above, allowing num_batches_tracked


def short_list(items: list[str], n: int = 20) -> str:
    """A bounded listing for error messages."""
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + more + "]"
