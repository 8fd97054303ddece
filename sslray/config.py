"""Typed, frozen trial configuration.

Defaults live here, in code; YAML files and ``--set key=value`` only override them. Every field has a
dotted path (``optim.lr``, ``method.terms.u_fp.weight``) that grids, ablations and search spaces use.
Unknown keys and wrong types are errors that name the source (file) and the dotted key::

    cfg = TrialConfig.from_dict(yaml.safe_load(open(path)), source=path)
    cfg = apply_overrides_to_config(cfg, ["method.terms.u_fp.weight=0.3"])
    cfg.trial_id()   # sha256 over the fields that change results (not ``run.*``, not ``name``)

Methods are presets (data, see ``sslray.methods.METHOD_PRESETS``): ``method.name: unimatch`` fills in the
teacher, thresholds and loss terms, and anything the user writes under ``method`` is merged on top.

Imports go one way: this module imports the method registry (late, inside the builder: the registry imports torch)
and nothing it imports imports it back; a term's settings type, ``TermConfig``, lives with the other method types
in ``sslray.methods.base``. Model, dataset and eval-mode names are checked against their registries by
``sslray.registries.check_names`` (those registries import this module for their config types).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from collections.abc import Mapping  # not typing.Mapping: its isinstance is ~10x slower (planning)
from typing import Any

import yaml

IDENTITY_VERSION = "sslray-trial-v1"
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration problem, reported as one line: ``<source>: <dotted.key>: <what was expected>``."""

    def __init__(self, source: str | None, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key or '<root>'}: {message}")

    def __reduce__(self):  # rebuilt from its three parts after pickling (Ray and DataLoader workers send it back)
        return (type(self), (self.source, self.key, self.message))


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded synthetic dataset (see ``sslray.data.synthetic``)."""

    size: int = 64  # image side in pixels
    num_train: int = 2016  # the pool that labeled/unlabeled partitions are drawn from
    num_val: int = 300
    seed: int = 1234  # generator seed: the same (seed, index) always gives the same image


@dataclass(frozen=True)
class AugConfig:
    """UniMatch's weak and strong views (``datasets.md`` section 4)."""

    scale: tuple[float, float] = (0.5, 2.0)  # random rescale of the long side
    hflip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutmix_p: float = 0.5
    cutmix_area: tuple[float, float] = (0.02, 0.4)
    cutmix_ratio: tuple[float, float] = (0.3, 1 / 0.3)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"
    root: str | None = None  # dataset root on disk (real datasets)
    partition: str = "16"  # "16": 16 labeled images; "1_8": 1/8 of the pool; or a named standard split
    split_seed: int = 0  # seed of generated partitions
    splits_dir: str | None = None  # split files in UniMatch layout: <dir>/[<dataset>/]<partition>/labeled.txt, val.txt
    mask_dir: str | None = None  # VOC mask folder for bare-id split files only (a two-column file names its masks); None: SegmentationClassAug if present under root, else SegmentationClass
    crop_size: int | None = None  # None: the dataset spec's crop
    batch_size_x: int = 8  # global labeled batch (split across DDP ranks)
    batch_size_u: int = 8  # global unlabeled batch
    eval_mode: str | None = None  # original | center_crop | sliding_window; None: the dataset spec's
    augment_on: str = "loader"  # loader | device: where the strong views are made (sslray.data.device_augs)
    aug: AugConfig = field(default_factory=AugConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


RESNET_BACKBONES = ("resnet18", "resnet50", "resnet101")
# DINOv2 ViT/14 sizes for model.name: dpt (sslray.dpt); "tiny" is a test size for CPU tests and synthetic studies
DINOV2_BACKBONES = tuple(f"dinov2_{s}{r}" for s in ("small", "base", "large", "giant", "tiny") for r in ("", "_reg4"))


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small"  # small | deeplabv3plus | dpt
    backbone: str = "resnet50"  # resnet18 | resnet50 | resnet101 (deeplabv3plus); dinov2_small|base|large|giant[_reg4] (dpt)
    pretrained: str | None = None  # local path to backbone weights (torchvision ResNet; DINOv2 Meta or timm layout)
    width: int = 32  # channel width of the small model
    output_stride: int = 16
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    fp_dropout: float = 0.5  # UniMatch feature perturbation: Dropout2d on c1 and c4
    patch_fit: str = "resize"  # dpt, input sides not a multiple of 14: resize (V2) | pad (zero-pad, crop logits)

    def problems(self) -> list[tuple[str, str]]:
        if self.name == "dpt" and self.backbone not in DINOV2_BACKBONES:
            return [("backbone", f"model dpt needs one of {list(DINOV2_BACKBONES)}, got {self.backbone!r}")]
        if self.name == "deeplabv3plus" and self.backbone not in RESNET_BACKBONES:
            return [("backbone", f"model deeplabv3plus needs one of {list(RESNET_BACKBONES)}, got {self.backbone!r}")]
        return []


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.01  # backbone learning rate
    head_lr_mult: float = 10.0  # decoder/head group gets lr * head_lr_mult (UniMatch lr_multi)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    optimizer: str = "sgd"  # sgd (UniMatch V1: momentum, weight decay) | adamw (UniMatch V2: betas (0.9, 0.999))


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher that makes pseudo-labels. An EMA teacher always predicts in eval mode (BN running statistics);
    ``bn_stats`` says where those statistics come from (methods.md §3.3):

    - ``forward`` (default; U2PL, and so PCR): the EMA averages parameters only, and the teacher's BN statistics
      come from its own no-grad forward in *train* mode on ``cat(x, mixed strong view)`` after it has made its
      pseudo-labels, every step (U2PL ``train_semi.py``: ``model_teacher.train()`` + ``out_t``).
    - ``ema`` (CutMix-Seg, UniMatch V2): the float buffers are averaged with the same ``a_k`` as the parameters;
      no extra forward. (This was ``ema_buffers: true``.)
    """

    CHOICES: typing.ClassVar[dict[str, tuple]] = {"bn_stats": ("forward", "ema")}

    kind: str = "self"  # self: the student itself, detached (FixMatch/UniMatch); ema: mean teacher
    ema_alpha: float = 0.99
    ema_warmup: bool = True  # alpha_k = min(1 - 1/(k+1), alpha)
    bn_stats: str = "forward"  # EMA teacher's BN statistics: forward (own train-mode pass, U2PL) | ema (averaged)


@dataclass(frozen=True)
class MethodConfig:
    name: str = "supervised"  # a preset from sslray.methods.METHOD_PRESETS, or "a+b" to compose presets
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    conf_thresh: float = 0.95  # tau: pseudo-labels with confidence below are masked out
    global_div: float = 1.0  # the total loss is sum(weight * term) / global_div (UniMatch's "/ 2")
    mix_source: str = "batch"  # batch: CutMix with a second unlabeled batch (UniMatch); roll / flip: the same batch
    # rolled by one / reversed (UniMatch V2: img.flip(0))
    strong_dropout: str = "none"  # channel dropout on the encoder features of cat(s1, s2): none | complementary (V2) | independent
    terms: Mapping[str, Any] = field(default_factory=dict)  # term name -> sslray.methods.base.TermConfig (subclass)


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 1000
    eval_every: int = 250  # iterations between evaluations (and checkpoints); the last iteration always evaluates
    amp: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | none (fp32) | bf16 | fp16 (CUDA only)
    eval_model: str = "student"  # student | teacher | both (val/* = student, val_ema/* = EMA teacher, as V2 logs)


@dataclass(frozen=True)
class RunConfig:
    """How a trial runs, not what it computes: excluded from the trial id."""

    out_dir: str | None = None  # None: runs/<trial id>
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: str = "auto"  # auto (a bar when stderr is a terminal) | on | off
    log_every: int = 50
    num_workers: int = 0  # DataLoader worker processes
    checkpoint: bool = True
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    # Throughput (README "On GPUs"; sslray.throughput): auto = on for CUDA, off on CPU.
    channels_last: str = "auto"  # auto | on | off: NHWC model and inputs
    optimizer_impl: str = "auto"  # auto (fused on CUDA, foreach on CPU) | fused | foreach | for_loop
    compile: str = "off"  # off | on: torch.compile of the model (compile time not yet measured to pay back)
    cudnn_benchmark: str = "auto"  # auto | on | off
    finite_check_every: int = 0  # read the device-side NaN flag every N steps too (0: at log/eval points only)
    gpu_memory_fraction: float = 0  # this trial's share of its GPU (set from resources.gpus_per_worker < 1); 0: all


@dataclass(frozen=True)
class TrialConfig:
    name: str = "trial"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=lambda: _build_method({}, "method", None))  # the preset
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    NON_IDENTITY = ("name", "run")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str | None = None) -> "TrialConfig":
        return _build(cls, d or {}, "", source)

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | tuple[str, ...] = ()) -> "TrialConfig":
        d = load_yaml(path)
        if not isinstance(d, dict):
            raise ConfigError(path, "", f"expected a mapping at the top level, got {type(d).__name__}")
        try:
            d = apply_overrides(d, overrides)
        except ConfigError as e:
            raise ConfigError(path + " (--set)", e.key, e.message) from None
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def identity(self, plain: dict[str, Any] | None = None) -> dict[str, Any]:
        """The fields that define the trial; ``plain`` is this config's ``to_dict()`` when the caller has it."""
        d = dict(self.to_dict() if plain is None else plain)
        for k in self.NON_IDENTITY:
            d.pop(k, None)
        return d

    def trial_id(self, plain: dict[str, Any] | None = None) -> str:
        """sha256 of the identity; ``plain`` (this config's ``to_dict()``) saves converting it again when planning
        thousands of trials."""
        blob = json.dumps({"v": IDENTITY_VERSION, **self.identity(plain)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def short_id(self) -> str:
        return self.trial_id()[:12]

    def with_overrides(self, overrides: list[str] | tuple[str, ...], source: str = "--set") -> "TrialConfig":
        """A copy with ``key=value`` strings applied (see :meth:`replace` for ``method.name``)."""
        return self.replace(_source=source, **_parse_overrides(overrides, source))

    def replace(self, _source: str = "replace()", **dotted: Any) -> "TrialConfig":
        """``cfg.replace(**{"optim.lr": 0.1})``: a copy with dotted keys set (validated again).

        Setting ``method.name`` to another preset re-derives the whole method section from that preset (plus
        the other ``method.*`` keys given in the same call): the resolved section holds the old preset's
        teacher and terms, which must not leak into the new method.
        """
        d = self.to_dict()
        new_name = dotted.get("method.name")
        if new_name is not None and new_name != self.method.name:
            d["method"] = {"name": new_name}
        for k, v in dotted.items():
            set_dotted(d, k, v)
        return TrialConfig.from_dict(d, source=_source)


# --------------------------------------------------------------------------------------------------
# YAML and dotted keys


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (a silent overwrite hides typos in study files)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for k_node, v_node in node.value:
        k = loader.construct_object(k_node, deep=deep)
        if k in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {k!r}", k_node.start_mark)
        out[k] = loader.construct_object(v_node, deep=deep)
    return out


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 reads ``1_8`` as the integer 18 (digit separators), ``1e-3`` as a string and ``off`` as false. Partition names like
# 1_8 are everywhere in this field, so numbers follow YAML 1.2 here: no underscores, exponents without a dot.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                                                   "tag:yaml.org,2002:bool")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(  # YAML 1.2 booleans: "progress: off" stays the string "off"
    "tag:yaml.org,2002:bool", re.compile(r"^(true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9]*|0x[0-9a-fA-F]+|0o[0-7]+)$"), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^([-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN))$"),
    list("-+0123456789."))


def yaml_value(text: str) -> Any:
    """Parse one scalar or flow value (``--set`` right-hand sides) with the same rules as files."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass


MAX_YAML_BYTES = 1 << 20
# PyYAML's safe loader shares aliased nodes, so a few hundred bytes of nested anchors ("billion laughs") load
# fine but expand to billions of values in anything that walks the data (deepcopy, flatten, our checks).
MAX_YAML_NODES = 100_000


def load_yaml(path: str, what: str = "YAML files") -> Any:
    """Read a YAML file as data only (no Python tags), rejecting duplicate keys, files over ``MAX_YAML_BYTES``
    (checked before reading) and alias trees over ``MAX_YAML_NODES`` values; errors name the file. ``what`` names
    the kind of file in the size error."""
    try:
        size = os.path.getsize(path)
        if size > MAX_YAML_BYTES:
            raise ConfigError(path, "", f"file is {size} bytes; {what} are limited to {MAX_YAML_BYTES} bytes (1 MiB)")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(path, "", f"invalid YAML: {where}{problem}") from None
    if _count_nodes(data, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(path, "", f"more than {MAX_YAML_NODES} values after expanding YAML aliases; refusing to "
                                    "load (nested anchors multiply)")
    return data


def _count_nodes(obj: Any, limit: int) -> int:
    """Values reachable from ``obj``, counting shared (aliased) ones each time; stops just past ``limit``, so the
    count itself costs O(limit) even for an exponential alias tree."""
    count, stack = 0, [obj]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


PLUGIN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PLUGINS_LOADED: set[str] = set()


def load_plugins(modules: "list[str] | tuple[str, ...]") -> None:
    """Import each ``--plugin`` module and call its ``register()`` (once per process).

    The only way sslray runs code it was not shipped with: a study file is data and cannot name a module; the user
    passes ``--plugin mypkg.sslray_ext`` on the command line, and Ray trials import the same list. ``register()``
    adds entries to the explicit registries (``sslray.methods.METHOD_PRESETS``/``TERMS``,
    ``sslray.data.datasets.DATASETS``).
    """
    for name in modules:
        if name in _PLUGINS_LOADED:
            continue
        if not isinstance(name, str) or not PLUGIN_RE.fullmatch(name):
            raise ConfigError("--plugin", str(name), "expected an importable module name like mypkg.sslray_ext")
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise ConfigError("--plugin", name, f"cannot import: {e}") from None
        register = getattr(module, "register", None)
        if not callable(register):
            raise ConfigError("--plugin", name, "has no register() function")
        register()
        _PLUGINS_LOADED.add(name)


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(None, key, "empty component in dotted key")
    node = d
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(None, key, f"{'.'.join(parts[: i + 1])} is a value ({nxt!r}), not a section")
        node = nxt
    node[parts[-1]] = value


def get_dotted(d: Mapping, key: str, default: Any = KeyError) -> Any:
    node: Any = d
    for p in key.split("."):
        if not isinstance(node, Mapping) or p not in node:
            if default is KeyError:
                raise KeyError(key)
            return default
        node = node[p]
    return node


def _parse_overrides(overrides: list[str] | tuple[str, ...], source: str) -> dict[str, Any]:
    """``["a.b=0.3", "c=[1, 2]"]`` -> ``{"a.b": 0.3, "c": [1, 2]}`` (values parsed as YAML, in order)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(source, item, "expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml_value(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def apply_overrides(d: Mapping, overrides: list[str] | tuple[str, ...], source: str = "--set") -> dict:
    """Apply ``key=value`` strings (value parsed as YAML: ``0.3``, ``true``, ``[1, 2]``) to a copy of d."""
    out = copy.deepcopy(dict(d))
    for key, value in _parse_overrides(overrides, source).items():
        set_dotted(out, key, value)
    return out


def deep_merge(base: Mapping, over: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------------------------------
# dict -> dataclass, with checks


def _type_name(t: Any) -> str:
    if isinstance(t, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}.get(
            t.__name__, t.__name__)
    return str(t).replace("typing.", "")


def _coerce(t: Any, v: Any, path: str, source: str | None) -> Any:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, path, source)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(source, path, errors[0] if len(errors) == 1 else f"expected one of {args}, got {v!r}")
    if origin is tuple:
        args = typing.get_args(t)
        if not isinstance(v, (list, tuple)):
            raise ConfigError(source, path, f"expected a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], x, f"{path}[{i}]", source) for i, x in enumerate(v))
        if len(v) != len(args):
            raise ConfigError(source, path, f"expected a list of {len(args)} values, got {len(v)}")
        return tuple(_coerce(a, x, f"{path}[{i}]", source) for i, (a, x) in enumerate(zip(args, v)))
    if t is bool:
        if isinstance(v, bool):
            return v
        raise ConfigError(source, path, f"expected true/false, got {v!r}")
    if t is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise ConfigError(source, path, f"expected an integer, got {v!r}")
    if t is float:
        if isinstance(v, str) and _SCI_FLOAT.fullmatch(v.strip()):
            v = float(v)  # YAML 1.1 reads 1e-3 (no dot) as a string; researchers write it anyway
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            f = float(v)
            if f != f or f in (float("inf"), float("-inf")):
                raise ConfigError(source, path, f"expected a finite number, got {v!r}")
            return f
        raise ConfigError(source, path, f"expected a number, got {v!r}")
    if t is str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)  # partition: 16 is as good as partition: "16"
        raise ConfigError(source, path, f"expected a string, got {v!r}")
    if dataclasses.is_dataclass(t):
        return _build(t, v, path, source)
    raise ConfigError(source, path, f"unsupported field type {_type_name(t)}")


def build_section(cls: type, d: Any, path: str, source: str | None) -> Any:
    """Any frozen dataclass from a mapping with the rules of this module, for sections beyond ``TrialConfig`` (a
    study's ``resources``, ``report``, ``tracking``, ``search``): unknown keys and wrong types are errors at
    ``<path>.<key>``; the class attributes ``CHOICES`` (field -> allowed values) and ``RANGES`` (field ->
    :class:`Range`) are checked, then ``problems()`` if the class has one ((field, message) pairs; field ``""``
    reports at ``path`` itself)."""
    return _build(cls, d, path, source)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` once per class: it re-evaluates every annotation string on each call, which was
    most of the time of planning a large study."""
    return typing.get_type_hints(cls)


def _build(cls: type, d: Any, path: str, source: str | None, problems: bool = True) -> Any:
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(source, path, f"expected a mapping, got {d!r}")
    if cls is MethodConfig:
        return _build_method(d, path, source)
    hints = _type_hints(cls)
    fields = _init_fields(cls)
    for k in d:
        if k not in fields:
            where = f"{path}.{k}" if path else str(k)
            raise ConfigError(source, where, f"unknown key (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, v in d.items():
        key = f"{path}.{name}" if path else name
        rng = _RANGES.get((cls, name), getattr(cls, "RANGES", {}).get(name))
        try:
            kwargs[name] = _coerce(hints[name], v, key, source)
        except ConfigError as e:
            if rng is not None and rng.typed and e.key == key:  # "expected an integer >= 1, got 'two'"
                raise ConfigError(source, key, f"expected {rng.words}, got {v!r}") from None
            raise
        if rng is not None:
            _check_range(rng, kwargs[name], v, key, source)
    obj = cls(**kwargs)
    _check(obj, path, source)
    if problems and callable(getattr(obj, "problems", None)):
        for name, message in obj.problems():
            raise ConfigError(source, (f"{path}.{name}" if path else name) if name else path, message)
    return obj


def _build_method(d: Mapping, path: str, source: str | None) -> MethodConfig:
    """The method section (memoised on its written content: a study plans thousands of trials whose method
    sections are a handful of distinct ones, and MethodConfig is immutable)."""
    key = _freeze(d)
    if key is None:
        return _build_method_uncached(d, path, source)
    key = (key, path, source)
    hit = _METHOD_CACHE.get(key)
    if hit is None:
        if len(_METHOD_CACHE) >= 1024:
            _METHOD_CACHE.clear()
        hit = _METHOD_CACHE[key] = _build_method_uncached(d, path, source)
    return hit


_METHOD_CACHE: dict = {}


def _freeze(v: Any) -> Any:
    """A hashable, type-exact key of a YAML value (``1``, ``1.0`` and ``True`` differ), or None if it has none."""
    if isinstance(v, Mapping):
        items = [(k, _freeze(x)) for k, x in v.items()]
        return None if any(x is None and v[k] is not None for k, x in items) else ("d", tuple(sorted(items, key=repr)))
    if isinstance(v, (list, tuple)):
        items = tuple(_freeze(x) for x in v)
        return None if any(x is None and y is not None for x, y in zip(items, v)) else ("l", items)
    if type(v) in _SCALARS:
        return (type(v).__name__, v)
    return None


def _build_method_uncached(d: Mapping, path: str, source: str | None) -> MethodConfig:
    from sslray.methods import METHOD_PRESETS, TERMS  # late: the registry imports torch

    p = f"{path}." if path else ""
    name = d.get("name", MethodConfig.name)
    if not isinstance(name, str):
        raise ConfigError(source, p + "name", f"expected a string, got {name!r}")
    merged: dict = {}
    for i, part in enumerate(name.split("+")):
        part = part.strip()
        if part not in METHOD_PRESETS:
            raise ConfigError(source, p + "name",
                              f"unknown method {part!r} (expected one of: {', '.join(METHOD_PRESETS)})")
        preset = dict(METHOD_PRESETS[part])
        base = preset.pop("base", None)  # an add-on's own base, used only when it comes first (standalone)
        if base is not None and i == 0:
            merged = deep_merge(merged, METHOD_PRESETS[base])
        merged = deep_merge(merged, preset)
    _check_added_terms(merged.get("terms") or {}, d.get("terms"), name, p, source)
    merged = deep_merge(merged, {k: v for k, v in d.items() if k != "name"})
    terms_raw = merged.pop("terms", {}) or {}
    if not isinstance(terms_raw, Mapping):
        raise ConfigError(source, p + "terms", f"expected a mapping of term name -> settings, got {terms_raw!r}")
    terms = {}
    for tname, tval in terms_raw.items():
        if tname not in TERMS:
            raise ConfigError(source, f"{p}terms.{tname}",
                              f"unknown loss term (expected one of: {', '.join(TERMS)})")
        terms[tname] = _build_term(TERMS[tname].config_cls, tval or {}, f"{p}terms.{tname}", source)
    rest = {k: v for k, v in merged.items()}
    hints = _type_hints(MethodConfig)
    fields = [f.name for f in dataclasses.fields(MethodConfig)]
    kwargs: dict[str, Any] = {"name": name, "terms": terms}
    for k, v in rest.items():
        if k not in fields:
            raise ConfigError(source, p + str(k), f"unknown key (expected one of: {', '.join(fields)})")
        kwargs[k] = _coerce(hints[k], v, p + k, source)
    obj = MethodConfig(**kwargs)
    _check(obj, path, source)
    _check_families(obj, p, source)
    return obj


def _check_added_terms(preset_terms: Mapping, written: Any, name: str, p: str, source: str | None) -> None:
    """A term the method's preset lacks is added only with its weight written out.

    Settings alone (``method.terms.pcr_x.warmup_frac``) on a method without that term would add it at the default
    weight 1.0 (an unknown name is left to the check that lists the terms). In a study that writes term settings under ``base.method`` and has a variant or axis that switches
    ``method.name``, that silently turns the other method into this one (issue 11: the PCR ablation's ``pcr_base``
    row trained PCR, bit for bit). Writing the weight (0 leaves it out) says which was meant.
    """
    from sslray.methods import TERMS

    if not isinstance(written, Mapping):
        return  # the generic check below names the wrong type
    for tname, tval in written.items():
        if tname not in TERMS or tname in preset_terms or (isinstance(tval, Mapping) and "weight" in tval):
            continue
        raise ConfigError(source, f"{p}terms.{tname}",
                          f"is not a term of method {name!r} (its terms: {', '.join(preset_terms) or 'none'}); "
                          f"its settings alone would add it at weight 1.0: write {p}terms.{tname}.weight "
                          "(0 to leave it out)")


def _build_term(cls: type, d: Any, path: str, source: str | None) -> Any:
    """A term's settings (a ``TermConfig`` subclass): the generic rules, a weight >= 0, then its ``problems()``."""
    obj = _build(cls, d, path, source, problems=False)
    if obj.weight < 0:
        raise ConfigError(source, f"{path}.weight", f"expected a non-negative weight, got {obj.weight!r}")
    for key, message in obj.problems():
        raise ConfigError(source, f"{path}.{key}", message)
    return obj


def _check_families(method: MethodConfig, prefix: str, source: str | None) -> None:
    """Settings that must agree across the active terms of one family (e.g. PCR's shared prototypes)."""
    from sslray.methods import FAMILIES, TERMS

    by_family: dict[str, dict[str, Any]] = {}
    for name, tcfg in method.terms.items():
        family = TERMS[name].family
        if tcfg.weight > 0 and family is not None:
            by_family.setdefault(family, {})[name] = tcfg
    for family, terms in by_family.items():
        check = FAMILIES[family].check
        for key, message in (check(terms) if check is not None else []):
            raise ConfigError(source, f"{prefix}terms.{key}", message)


@dataclass(frozen=True)
class Range:
    """Where a number means something: ``low`` / ``high`` (None: unbounded), inclusive unless ``low_open`` /
    ``high_open``. The error is ``expected <words>, got <value>``; ``typed`` words name the type too (``an integer
    >= 1``), so a value of the wrong type gets the same message. A tuple field is checked element by element."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    words: str = ""
    typed: bool = False

    def contains(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return self.high is None or not (v > self.high or (self.high_open and v == self.high))


# Per-class ranges beside the name-based ones below (which also cover the term settings of the method files).
_RANGES: dict[tuple[type, str], Range] = {
    (OptimConfig, "momentum"): Range(0.0, 1.0, words="a value in [0, 1]"),
    (ModelConfig, "aspp_rates"): Range(1, words="dilation rates >= 1"),
    (AugConfig, "jitter"): Range(0.0, words="non-negative jitter strengths"),
    (RunConfig, "gpu_memory_fraction"): Range(0.0, 1.0, words="a fraction in [0, 1]"),
}
_CHOICES = {
    (ModelConfig, "backbone"): RESNET_BACKBONES + DINOV2_BACKBONES,
    (ModelConfig, "patch_fit"): ("resize", "pad"),
    (OptimConfig, "optimizer"): ("sgd", "adamw"),
    (MethodConfig, "strong_dropout"): ("none", "complementary", "independent"),
    (ModelConfig, "output_stride"): (8, 16),
    (TeacherConfig, "kind"): ("self", "ema"),
    (MethodConfig, "mix_source"): ("batch", "roll", "flip"),
    (TrainConfig, "amp"): ("auto", "none", "bf16", "fp16"),
    (DataConfig, "augment_on"): ("loader", "device"),
    (RunConfig, "channels_last"): ("auto", "on", "off"),
    (RunConfig, "optimizer_impl"): ("auto", "fused", "foreach", "for_loop"),
    (RunConfig, "compile"): ("off", "on"),
    (RunConfig, "cudnn_benchmark"): ("auto", "on", "off"),
    (TrainConfig, "eval_model"): ("student", "teacher", "both"),
    (RunConfig, "progress"): ("auto", "on", "off"),
}
_PROBABILITIES = {"hflip_p", "jitter_p", "gray_p", "blur_p", "cutmix_p", "fp_dropout", "conf_thresh", "ema_alpha"}
_POSITIVE = {"size", "num_train", "num_val", "batch_size_x", "batch_size_u", "width", "iterations", "eval_every",
             "log_every", "global_div", "crop_size", "temperature", "max_nodes"}
_NON_NEGATIVE = {"seed", "split_seed", "lr", "head_lr_mult", "momentum", "weight_decay", "poly_power",
                 "num_workers", "threads", "finite_check_every"}


def _check(obj: Any, path: str, source: str | None) -> None:
    p = f"{path}." if path else ""
    for name, allowed, prob, pos, nonneg in _field_rules(type(obj)):
        v = getattr(obj, name)
        if allowed is not None and v not in allowed:
            raise ConfigError(source, p + name, f"expected one of {[a for a in allowed if a is not None]}, got {v!r}")
        if prob and isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ConfigError(source, p + name, f"expected a value in [0, 1], got {v!r}")
        if pos and isinstance(v, (int, float)) and v <= 0:
            raise ConfigError(source, p + name, f"expected a positive value, got {v!r}")
        if nonneg and isinstance(v, (int, float)) and v < 0:
            raise ConfigError(source, p + name, f"expected a non-negative value, got {v!r}")
    if isinstance(obj, AugConfig):
        for name in ("scale", "blur_sigma", "cutmix_area", "cutmix_ratio"):
            lo, hi = getattr(obj, name)
            if not 0 < lo <= hi:
                raise ConfigError(source, p + name, f"expected 0 < low <= high, got {[lo, hi]}")
        if obj.jitter[3] > 0.5:  # torchvision's ColorJitter: hue is a fraction of the colour wheel, at most 0.5
            raise ConfigError(source, p + "jitter[3]", f"expected a hue jitter in [0, 0.5], got {obj.jitter[3]!r}")


@functools.lru_cache(maxsize=None)
def _field_rules(cls: type) -> tuple[tuple[str, Any, bool, bool, bool], ...]:
    """(name, allowed choices or None, probability?, positive?, non-negative?) of each field, once per class."""
    return tuple((name, _CHOICES.get((cls, name), getattr(cls, "CHOICES", {}).get(name)), name in _PROBABILITIES,
                  name in _POSITIVE, name in _NON_NEGATIVE) for name in _field_names(cls))


@functools.lru_cache(maxsize=None)
def _init_fields(cls: type) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...]:
    """The field names of a dataclass (``dataclasses.fields`` rebuilds its tuple on every call); () otherwise."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return ()
    return tuple(f.name for f in dataclasses.fields(cls))


def _check_range(rng: Range, value: Any, written: Any, key: str, source: str | None) -> None:
    """``value`` (coerced) against ``rng``; the error shows the value as written (``1``, not ``1.0``)."""
    if isinstance(value, tuple):
        items = [(f"{key}[{i}]", x, w) for i, (x, w) in enumerate(zip(value, written))]
    else:
        items = [(key, value, written)]
    for where, x, w in items:
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not rng.contains(x):
            raise ConfigError(source, where, f"expected {rng.words}, got {w!r}")


_SCALARS = (str, int, float, bool, type(None))


def _to_plain(obj: Any) -> Any:
    if type(obj) in _SCALARS:  # the common case first: planning converts thousands of configs
        return obj
    names = _field_names(type(obj))
    if names:
        return {n: _to_plain(getattr(obj, n)) for n in names}
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
