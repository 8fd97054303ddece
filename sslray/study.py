"""Study files: YAML -> validated :class:`Study` -> the list of fully resolved trials.

A study is the unit of work (``design.md`` section 1): a grid ("these methods x these partitions"), an ablation
("this method with each component removed"), or an Optuna search, each repeated over seeds::

    study = load_study("studies/quickstart.yaml", overrides=["train.iterations=200"])
    for t in study.trials():          # grid x (baseline + variants) x seeds, each with a stable trial id
        print(t.trial_id[:12], t.config.name, t.point, t.seed)

Everything is checked when the file is loaded, before any GPU time is spent, and every problem is one
``ConfigError`` line ``<file>: <dotted key in the study file>: <message>``, e.g.
``studies/x.yaml: grid.optim.lr: expected a number, got 'fast'``. Grid values, ablation overrides and search bounds
are validated by building the configs they produce, so they obey exactly the rules of ``sslray.config``.

The sections other than ``base``/``grid``/``ablation``/``seeds`` (``resources``, ``report``, ``tracking``, ``search``
and its ``scheduler``) are frozen dataclasses built by ``sslray.config.build_section``, the same builder as the trial
config: unknown keys and types, then each class's ``CHOICES``, ``RANGES`` and ``problems()``. A search space is parsed once
into :class:`Distribution` objects (Optuna, Tune and the report read their fields). Names of models, datasets and
eval modes are checked against their registries by ``sslray.registries.check_names`` for every cell, and a
``report.paper_numbers`` file is read here (:func:`load_paper_numbers`), so the report package imports this module
and never the reverse.

How a cell is built: the ``base`` section *as written* (plus ``--set`` overrides), with the cell's dotted keys set on
it, then ``TrialConfig.from_dict``. Building from the written section rather than the resolved config matters for a
``method.name`` axis: each method is re-derived from its own preset, while keys the user wrote under ``base.method``
(say ``conf_thresh``) still apply to every method.
"""
from __future__ import annotations

import collections.abc
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from sslray.config import (MAX_YAML_BYTES, ConfigError, MethodConfig, Range, TrainConfig, TrialConfig, apply_overrides,
                           build_section, flatten, get_dotted, load_yaml, set_dotted)
from sslray.epochs import EPOCH_KEYS, check_epoch_keys, epoch_iterations, pop_epoch_keys
from sslray.stats import TESTS

STUDY_KEYS = ("name", "base", "grid", "ablation", "seeds", "search", "resources", "report", "storage", "tracking",
              "max_trials")
DEFAULT_MAX_TRIALS = 5000  # a plan above this is refused before it is expanded (study key max_trials raises it)
WANDB_MODES = ("offline", "online", "disabled")
MAX_FILE_BYTES = MAX_YAML_BYTES  # load_yaml refuses bigger files before reading, and alias bombs after
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")

SAMPLERS = ("tpe", "gp", "random", "grid", "bruteforce")
# Samplers that enumerate values, and the distributions they can enumerate (Optuna's GridSampler takes lists).
DISCRETE_SAMPLERS = {"grid": ("choice",), "bruteforce": ("int", "choice")}
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SCHEDULER_TYPES = ("asha",)
AGGS = ("last", "best")
AT_LEAST_ONE = Range(1, words="an integer >= 1", typed=True)
NUMBER_GE_0 = Range(0, words="a number >= 0", typed=True)
VARIANT = "variant"  # report.rows / report.cols may name the ablation variant instead of a config key


# --------------------------------------------------------------------------------------------------
# the parsed study


@dataclass(frozen=True)
class Distribution:
    """One search-space entry, parsed once from ``{kind: args}``: ``uniform`` / ``loguniform`` ``[low, high]``,
    ``int`` ``[low, high]`` or ``[low, high, step]`` (inclusive; ``step`` None when not written), ``choice``
    ``[a, b, ...]``. Optuna (``optuna()``), Ray Tune (``ray_adapter``) and the report read its fields; ``as_dict()``
    gives the written form back."""

    kind: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    choices: tuple = ()

    def as_dict(self) -> dict[str, list]:
        if self.kind == "choice":
            return {"choice": list(self.choices)}
        return {self.kind: [self.low, self.high] + ([self.step] if self.step is not None else [])}

    def optuna(self):
        """The ``optuna.distributions`` object of this entry (imports optuna)."""
        import optuna.distributions as od

        if self.kind in ("uniform", "loguniform"):
            return od.FloatDistribution(self.low, self.high, log=self.kind == "loguniform")
        if self.kind == "int":
            return od.IntDistribution(self.low, self.high, step=self.step or 1)
        return od.CategoricalDistribution(list(self.choices))


@dataclass(frozen=True)
class AshaSpec:
    """ASHA early stopping; the time unit is one evaluation (``train.eval_every`` iterations), and ``max_t``
    defaults to the evaluations of ``base`` (``ceil(train.iterations / train.eval_every)``)."""

    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2
    brackets: int = 1
    max_t: int = 1

    CHOICES: ClassVar[dict] = {"type": SCHEDULER_TYPES}
    RANGES: ClassVar[dict] = {"grace_period": AT_LEAST_ONE, "max_t": AT_LEAST_ONE, "brackets": AT_LEAST_ONE,
                              "reduction_factor": Range(1, low_open=True, words="a number > 1", typed=True)}

    def problems(self) -> list[tuple[str, str]]:
        if self.grace_period > self.max_t:
            return [("grace_period", f"{self.grace_period} is more than max_t = {self.max_t} evaluations")]
        return []


@dataclass(frozen=True)
class SearchSpec:
    """An Optuna search. ``space`` maps dotted config keys to one :class:`Distribution` each (validated: bounds
    and choices are values the config accepts). ``scheduler`` is None or an ASHA dict with every key filled in
    (``type, grace_period, reduction_factor, brackets, max_t``, see :class:`AshaSpec`)."""

    sampler: str = "tpe"
    num_samples: int = 1
    metric: str = "val/miou"
    mode: str = "max"
    space: dict[str, Distribution] = dataclasses.field(default_factory=dict)
    scheduler: dict | None = None
    seed: int = 0

    CHOICES: ClassVar[dict] = {"sampler": SAMPLERS, "mode": ("max", "min")}
    RANGES: ClassVar[dict] = {"num_samples": AT_LEAST_ONE, "seed": Range(0, words="a non-negative integer", typed=True)}

    def problems(self) -> list[tuple[str, str]]:
        if not self.metric:
            return [("metric", f"expected a metric name like val/miou, got {self.metric!r}")]
        return []


@dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for: ``workers`` training processes, each with these CPUs and GPUs (fractions ok)."""

    workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    placement: str = "pack"  # pack: workers share nodes when they fit; spread: one per node where possible

    CHOICES: ClassVar[dict] = {"placement": ("pack", "spread")}
    RANGES: ClassVar[dict] = {"workers": AT_LEAST_ONE, "cpus_per_worker": NUMBER_GE_0, "gpus_per_worker": NUMBER_GE_0}

    def problems(self) -> list[tuple[str, str]]:
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:  # Ray cannot schedule a request for nothing
            return [("", "cpus_per_worker and gpus_per_worker are both 0; a worker needs some")]
        g = self.gpus_per_worker
        if g > 1 and g != int(g):  # Ray: quantities above 1 must be whole
            return [("gpus_per_worker", f"expected a fraction in (0, 1] or a whole number of GPUs, got {g!r}")]
        if 0 < g < 1 and round(g, 4) != g:  # Ray keeps fractional resources to 1e-4
            return [("gpus_per_worker", f"expected a fraction with at most 4 decimals, got {g!r}")]
        if 0 < g < 1 and self.workers > 1:  # NCCL needs a GPU of its own per rank
            return [("gpus_per_worker", f"a fraction of a GPU ({g:g}) packs single-worker trials; "
                                        f"with workers: {self.workers} every worker needs a whole GPU")]
        return []


@dataclass(frozen=True)
class ReportSpec:
    """The comparison table: ``rows`` and ``cols`` are dotted config keys or ``"variant"``; ``agg`` is ``last`` (the
    final evaluation) or ``best`` (the ``best/<metric>`` columns); ``baseline`` is a row label for the delta columns.

    Against the baseline: ``significance`` is the paired test over seeds (``auto``: exact Wilcoxon from 6 seeds on,
    else a paired t-test; ``t``, ``wilcoxon``, ``none``), Holm-corrected at ``alpha``; ``bootstrap`` resamples of the
    validation images give CIs (0: off). ``paper_numbers`` is a YAML file of published numbers printed beside the
    reproduced ones (path relative to the study file; format in :func:`load_paper_numbers`). ``names`` maps raw
    names (methods, keys, metrics) to the display names of tables and figures (``sslray.report.names``)."""

    rows: str = "method.name"
    cols: str = "data.partition"
    metric: str = "val/miou"
    agg: str = "last"
    baseline: str | None = None
    significance: str = "auto"
    alpha: float = 0.05
    bootstrap: int = 0
    paper_numbers: str | None = None
    names: tuple[tuple[str, str], ...] = ()  # report.names as (raw, display) pairs

    CHOICES: ClassVar[dict] = {"agg": AGGS, "significance": TESTS}
    RANGES: ClassVar[dict] = {"alpha": Range(0, 1, True, True, "a number between 0 and 1", typed=True),
                              "bootstrap": Range(0, words="a number of resamples >= 0", typed=True)}

    def problems(self) -> list[tuple[str, str]]:
        if not self.metric:
            return [("metric", f"expected a metric name like val/miou, got {self.metric!r}")]
        if self.paper_numbers is not None and not self.paper_numbers.strip():
            return [("paper_numbers", f"expected a YAML file path, got {self.paper_numbers!r}")]
        return []


@dataclass(frozen=True)
class TrackingSpec:
    """W&B: ``wandb`` is ``offline`` (runs written under the study's storage, ``wandb sync`` later), ``online`` or
    ``disabled``; None (not written) means the ``WANDB_MODE`` environment variable, else offline."""

    wandb: str | None = None
    project: str = "sslray"
    entity: str | None = None

    CHOICES: ClassVar[dict] = {"wandb": (None, *WANDB_MODES)}

    def problems(self) -> list[tuple[str, str]]:
        if not NAME_RE.fullmatch(self.project):
            return [("project", f"expected a W&B project name ([A-Za-z0-9_.-]+), got {self.project!r}")]
        if self.entity is not None and not self.entity.strip():
            return [("entity", f"expected a W&B entity (user or team) name, got {self.entity!r}")]
        return []


@dataclass(frozen=True)
class Ablation:
    """A baseline row plus named variants; each variant is a dict of flattened dotted overrides."""

    baseline: str
    variants: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class PlannedTrial:
    """One resolved trial. ``point`` holds the values that define its table cell (the grid values, and
    ``"variant"`` for an ablation), as they appear in the resolved config."""

    config: TrialConfig
    trial_id: str
    variant: str | None
    point: dict[str, Any]
    seed: int


@dataclass(frozen=True)
class Study:
    """A validated study file. ``base_dict`` is the ``base`` section as written plus ``--set`` overrides: cells are
    built from it (see the module docstring)."""

    name: str
    path: str
    base: TrialConfig
    grid: dict[str, list]
    ablation: Ablation | None
    seeds: tuple[int, ...]
    search: SearchSpec | None
    resources: Resources
    report: ReportSpec
    storage: str
    base_dict: dict = dataclasses.field(repr=False, compare=False)
    tracking: TrackingSpec = TrackingSpec()
    paired: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    max_trials: int = DEFAULT_MAX_TRIALS
    # the planned trials (unique=False), filled on first use; not copied by dataclasses.replace
    _planned: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def trials(self, unique: bool = True) -> list[PlannedTrial]:
        """Every trial of a grid / ablation study; ``[]`` for a search study (its searcher proposes the trials, see
        :meth:`trial_from_params`).

        Order: seeds outermost, then grid points (``itertools.product`` over the axes in file order), then the
        baseline and the variants in file order. Seed-major order means the first trials to finish already fill the
        whole table once. With ``unique`` (the default) a trial id seen before is dropped, keeping the first; pass
        ``unique=False`` to a table so that a trial shared by two cells counts in both.
        """
        if self.search is not None:
            return []
        if self._planned is None:
            object.__setattr__(self, "_planned", tuple(self._plan(cell, seed) for seed in self.seeds
                                                       for cell in self._cells()))
        if not unique:
            return list(self._planned)
        out, seen = [], set()
        for t in self._planned:
            if t.trial_id not in seen:
                seen.add(t.trial_id)
                out.append(t)
        return out

    def plan_size(self) -> int:
        """How many trials :meth:`trials` (``unique=False``) plans, computed from the axis sizes without expanding."""
        return plan_size(self.axis_sizes())

    def axis_sizes(self) -> dict[str, int]:
        """Every multiplying axis of the plan and its size: ``seeds``, ``grid.<key>``, ``ablation`` (1 + variants)."""
        sizes = {"seeds": len(self.seeds), **{f"grid.{k}": len(v) for k, v in self.grid.items()}}
        if self.ablation is not None:
            sizes["ablation"] = 1 + len(self.ablation.variants)
        return sizes if self.search is None else {}

    def search_space(self) -> dict:
        """The validated search space as written (dotted key -> ``{distribution: args}``); ``{}`` without a search.
        ``search.space`` holds the same as :class:`Distribution` objects."""
        return {k: d.as_dict() for k, d in self.search.space.items()} if self.search else {}

    def trial_from_params(self, params: Mapping[str, Any], seed: int) -> TrialConfig:
        """The config of a search sample: ``base`` with the dotted ``params`` set, ``seed``, and the name
        ``<study>-<short trial id>``. Raises ConfigError for a value the config rejects. Which of ``seeds`` a
        sample runs with (once, or once per seed) is the caller's choice. See :func:`trial_from_params`."""
        return trial_from_params(self.base_dict, params, seed, self.name, self.path)

    def _cells(self) -> typing.Iterator[tuple[dict[str, Any], str | None, dict[str, Any]]]:
        """(grid point, variant label, dotted overrides) for every cell, in plan order (lazily). A paired axis
        contributes its value to the point and its entry's other keys to the overrides; a variant's overrides
        apply last."""
        keys = list(self.grid)
        variants = {self.ablation.baseline: {}, **self.ablation.variants} if self.ablation else {None: {}}
        for index in itertools.product(*(range(len(v)) for v in self.grid.values())):
            point = {k: self.grid[k][i] for k, i in zip(keys, index)}
            sets = dict(point)
            for k, i in zip(keys, index):
                if k in self.paired:
                    sets.update(self.paired[k][i])
            for label, over in variants.items():
                yield point, label, {**sets, **over}

    def _plan(self, cell: tuple[dict[str, Any], str | None, dict[str, Any]], seed: int) -> PlannedTrial:
        point, variant, sets = cell
        in_variant = self.ablation is not None and variant in self.ablation.variants
        cfg = _build(self.base_dict, {**sets, "seed": seed}, self.path,
                     f"ablation.variants.{variant}" if in_variant else "grid")
        resolved = cfg.to_dict()
        point = {k: point[k] if k in EPOCH_KEYS else get_dotted(resolved, k) for k in point}
        if variant is not None:
            point[VARIANT] = variant
        label = "-".join([cell_label(v) for v in point.values()] + [f"s{seed}"])
        label = re.sub(r"[^A-Za-z0-9_.+=-]", "_", label)
        if len(label) > 64:  # names become paths; a long grid point is better named by its id
            label = f"{cfg.short_id()}-s{seed}"
        cfg = dataclasses.replace(cfg, name=f"{self.name}-{label}")
        resolved["name"] = cfg.name
        return PlannedTrial(cfg, cfg.trial_id(resolved), variant, point, seed)


def plan_size(sizes: Mapping[str, int]) -> int:
    """The product of the axis sizes (``Study.axis_sizes()``): the number of trials, before anything is expanded."""
    return math.prod(sizes.values()) if sizes else 0


def trial_from_params(base_dict: Mapping, params: Mapping[str, Any], seed: int, study_name: str,
                      source: str | None) -> TrialConfig:
    """A search sample's config from the study's ``base_dict`` alone: pure (no file is read; ``source`` only names
    the study in errors), so a Ray trial builds it from what its ``TrialSpec`` carries, on any node."""
    cfg = _build(base_dict, {**params, "seed": seed}, source, "search.space")
    return dataclasses.replace(cfg, name=f"{study_name}-{cfg.short_id()}")


def cell_label(value: Any) -> str:
    """How a config value is written as a row/column label or in a trial name: strings as they are, everything else
    as JSON (``0.05``, ``true``, ``[0.5, 2.0]``). Results rows store non-scalars as the same JSON, so labels taken
    from a planned config and from a Parquet column agree."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)):
        value = value.item()  # numpy scalars from a DataFrame
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # json.dumps's spelling of scalars, without its cost (planning labels every cell)
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return repr(value)
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


# --------------------------------------------------------------------------------------------------
# loading


def load_study(path: str, overrides: Sequence[str] = ()) -> Study:
    """Read and validate a study file; ``overrides`` (``"key=value"``, like ``sslray train --set``) apply to
    ``base``. Raises ConfigError naming the file and the key for anything wrong."""
    raw = _read(path)
    for key in raw:
        if key not in STUDY_KEYS:
            raise ConfigError(path, str(key), f"unknown key (expected one of: {', '.join(STUDY_KEYS)})")
    name = _name(raw, path)
    max_trials = _max_trials(raw, path)  # before anything is built: an oversized plan is refused at once
    base_dict, base = _base(raw.get("base"), path, overrides)
    grid, paired = _grid(raw.get("grid"), path, base_dict, overrides)
    ablation = _ablation(raw.get("ablation"), path, base_dict, grid, paired)
    seeds = _seeds(raw.get("seeds", [0]), path)
    search = _search(raw.get("search"), path, base, base_dict)
    if search is not None and search.scheduler is not None and len(seeds) > 1:
        _check_lockstep(path, base, _resources(raw.get("resources"), path), len(seeds))
    if search is not None:
        for other in ("grid", "ablation"):
            if other in raw:
                raise ConfigError(path, "search", f"cannot be combined with {other}: a search samples its own "
                                                  "configs (put fixed values in base, one study per setting)")
    study = Study(name=name, path=path, base=base, grid=grid, ablation=ablation, seeds=seeds, search=search,
                  resources=_resources(raw.get("resources"), path),
                  report=ReportSpec(), storage=_storage(raw.get("storage"), name, path), base_dict=base_dict,
                  tracking=_tracking(raw.get("tracking"), path), paired=paired, max_trials=max_trials)
    planned = study.trials(unique=False)  # builds every cell once: combinations fail here, not on the cluster
    report = _report(raw.get("report"), path, grid, ablation, planned)
    out = dataclasses.replace(study, report=report)
    object.__setattr__(out, "_planned", study._planned)  # the same plan: not built twice
    return out


def _max_trials(raw: dict, path: str) -> int:
    """The study's trial limit, checked against the plan's size from the lengths of the written lists alone (no
    config is built and nothing is expanded, so a plan of 10^12 trials is refused in microseconds)."""
    limit = raw.get("max_trials", DEFAULT_MAX_TRIALS)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(path, "max_trials", f"expected an integer >= 1, got {limit!r}")
    sizes = {}
    seeds, grid, ablation = raw.get("seeds", [0]), raw.get("grid"), raw.get("ablation")
    if isinstance(seeds, list):
        sizes["seeds"] = len(seeds)
    if isinstance(grid, dict):
        sizes.update({f"grid.{k}": len(v) for k, v in grid.items() if isinstance(v, list)})
    if isinstance(ablation, dict) and isinstance(ablation.get("variants"), dict):
        sizes["ablation"] = 1 + len(ablation["variants"])
    n = plan_size(sizes)
    if raw.get("search") is None and n > limit:
        what = " x ".join(f"{k} {v:,}" for k, v in sizes.items())
        raise ConfigError(path, "max_trials", f"the plan has {n:,} trials ({what}), more than max_trials = "
                                              f"{limit:,}; shrink an axis or raise max_trials in the study")
    return limit


def _read(path: str) -> dict:
    """The file's top-level mapping (load_yaml refuses oversized files before parsing and alias bombs after)."""
    raw = load_yaml(path, what="study files")
    if raw is None:
        raise ConfigError(path, "", "the file is empty (a study needs at least a name)")
    if not isinstance(raw, dict):
        raise ConfigError(path, "", f"expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _name(raw: dict, path: str) -> str:
    if "name" not in raw:
        raise ConfigError(path, "name", "required: the study name ([A-Za-z0-9_.-]+, used in paths)")
    name = raw["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.startswith("."):
        raise ConfigError(path, "name", f"expected [A-Za-z0-9_.-]+ not starting with '.' (used in paths), got {name!r}")
    return name


def _base(section: Any, path: str, overrides: Sequence[str]) -> tuple[dict, TrialConfig]:
    """The written base dict (with overrides) and its TrialConfig; errors name ``base.<key>`` or ``--set``."""
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ConfigError(path, "base", f"expected a mapping (a trial config), got {section!r}")
    for key in ("name", "seed"):
        if key in section:
            raise ConfigError(path, f"base.{key}", _RESERVED[key])
    base = _build(section, {}, path, "base", relocate_all=True)
    if not overrides:
        return section, base
    source = f"{path} (--set)"
    try:
        with_set = apply_overrides(_schedule_replaced(section, _set_keys(overrides)), list(overrides), source)
    except ConfigError as e:
        raise ConfigError(source, e.key, e.message) from None
    for key in flatten(apply_overrides({}, list(overrides), source)):
        if key.split(".")[0] in _RESERVED:
            raise ConfigError(source, key, _RESERVED[key.split(".")[0]])
        _check_key(key, source, "")
    try:
        return with_set, _build(with_set, {}, source, "")
    except ConfigError as e:
        raise ConfigError(source, e.key, e.message) from None


def _set_keys(overrides: Sequence[str]) -> set[str]:
    return {o.split("=", 1)[0].strip() for o in overrides}


def _schedule_replaced(d: Mapping, keys: typing.Collection[str]) -> dict:
    """A copy of the nested config ``d`` ready to take the dotted ``keys``: setting ``train.epochs`` (or another
    epoch key) there removes a ``train.iterations`` written before, and setting ``train.iterations`` removes the
    epoch keys, so a later place (a cell, ``--set``) may say the length either way. Both in ``keys``: an error."""
    epoch_set = any(k in EPOCH_KEYS for k in keys)
    if epoch_set and "train.iterations" in keys:
        raise ConfigError(None, "train.epochs", _EXCLUSIVE)
    d = _copy_tree(d)
    train = d.get("train")
    if isinstance(train, dict) and (epoch_set or "train.iterations" in keys):
        drop = ("iterations",) if epoch_set else tuple(k.split(".")[1] for k in EPOCH_KEYS)
        d["train"] = {k: v for k, v in train.items() if k not in drop}
    return d


def _copy_tree(v: Any) -> Any:
    """A copy of YAML data (dicts and lists copied, other values shared: they are immutable scalars here);
    ``copy.deepcopy`` costs several times more and planning copies the base once per trial."""
    if isinstance(v, dict):
        return {k: _copy_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy_tree(x) for x in v]
    return copy.deepcopy(v) if not isinstance(v, (str, int, float, bool, type(None), tuple)) else v


_EXCLUSIVE = "train.epochs and train.iterations are exclusive (the epochs set the iterations); write one"
_RESERVED = {"name": "set by the study (<study>-<cell label>); remove it",
             "seed": "set seeds with the top-level 'seeds' list"}


def _grid(section: Any, path: str, base_dict: dict,
          overrides: Sequence[str]) -> tuple[dict[str, list], dict[str, list[dict[str, Any]]]]:
    """(axis -> values, paired axis -> each value's other settings). An axis whose entries are all mappings that
    set the axis key itself is paired: ``data.partition: [{data.partition: "92", train.epochs: 80}, ...]``."""
    if section is None:
        return {}, {}
    if not isinstance(section, dict):
        raise ConfigError(path, "grid", f"expected a mapping of dotted key -> list of values, got {section!r}")
    if not section:  # written but empty: the axes were forgotten, and the study would silently run the base alone
        raise ConfigError(path, "grid", "is empty; list at least one axis (dotted key: [values]) or remove it")
    set_keys = _set_keys(overrides)
    grid, paired = {}, {}
    for key, values in section.items():
        key = str(key)
        where = f"grid.{key}"
        if key.split(".")[0] in _RESERVED:
            raise ConfigError(path, where, _RESERVED[key.split(".")[0]])
        _check_key(key, path, "grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(path, where, f"expected a non-empty list of values, got {values!r}")
        if key in set_keys:
            raise ConfigError(f"{path} (--set)", key, "is a grid axis of this study; the grid sets it")
        if _is_paired(key, values):
            values, paired[key] = _paired_axis(key, values, path, base_dict, set_keys)
        for i, v in enumerate(values):
            if v in values[:i]:
                raise ConfigError(path, where, f"lists {v!r} twice")
            if key not in paired:
                _build(base_dict, {key: v}, path, "grid")
        grid[key] = list(values)
    _check_paired_overlap(grid, paired, path)
    return grid, paired


def _is_paired(key: str, values: list) -> bool:
    """A value axis (not a section, whose values are mappings of its fields) with at least one mapping entry."""
    return not _is_section(field_type(key)) and any(isinstance(v, dict) for v in values)


def _paired_axis(key: str, entries: list, path: str, base_dict: dict,
                 set_keys: set[str]) -> tuple[list, list[dict[str, Any]]]:
    """The axis values and, per value, the entry's other dotted keys (validated by building each entry's cell).
    Keys that ``--set`` overrides are dropped from the entries (the command line wins), and so is the other way
    of saying the schedule length (``--set train.iterations`` over an entry's ``train.epochs``)."""
    values, extras = [], []
    replaced = set(set_keys)
    if any(k in EPOCH_KEYS for k in set_keys):
        replaced |= {"train.iterations"}
    if "train.iterations" in set_keys:
        replaced |= set(EPOCH_KEYS)
    for i, entry in enumerate(entries):
        where = f"grid.{key}[{i}]"
        if not isinstance(entry, dict):  # a plain value among paired entries: no other settings
            entry = {key: entry}
        flat = flatten(entry)
        if key not in flat:
            raise ConfigError(path, where, f"a paired entry sets the axis key itself, e.g. {{{key}: <value>, "
                                           f"<other key>: <value>}}; got {entry!r}")
        value = flat.pop(key)
        for k in flat:
            if k.split(".")[0] in _RESERVED:
                raise ConfigError(path, f"{where}.{k}", _RESERVED[k.split(".")[0]])
            _check_key(k, path, where)
        extra = {k: v for k, v in flat.items() if k not in replaced}
        _build(base_dict, {key: value, **extra}, path, where)
        values.append(value)
        extras.append(extra)
    return values, extras


def _check_paired_overlap(grid: dict[str, list], paired: dict[str, list[dict[str, Any]]], path: str) -> None:
    """A paired entry may not set another axis, nor a key another paired axis sets: one cell, one value."""
    owner: dict[str, str] = {}
    for axis, extras in paired.items():
        for i, extra in enumerate(extras):
            for k in extra:
                clash = next((g for g in grid if g != axis and _overlaps(k, g)), None)
                if clash is None:
                    clash = next((a for o, a in owner.items() if a != axis and _overlaps(k, o)), None)
                if clash is not None:
                    raise ConfigError(path, f"grid.{axis}[{i}].{k}", f"is also set by the grid axis {clash}; "
                                                                     "one key, one axis")
                owner.setdefault(k, axis)


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _ablation(section: Any, path: str, base_dict: dict, grid: dict,
              paired: dict | None = None) -> Ablation | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(path, "ablation", f"expected a mapping with baseline and variants, got {section!r}")
    for key in section:
        if key not in ("baseline", "variants"):
            raise ConfigError(path, f"ablation.{key}", "unknown key (expected one of: baseline, variants)")
    baseline = section.get("baseline", "full")
    if not isinstance(baseline, str) or not baseline.strip():
        raise ConfigError(path, "ablation.baseline", f"expected a non-empty row label, got {baseline!r}")
    variants = section.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(path, "ablation.variants",
                          f"expected a non-empty mapping of label -> {{dotted key: value}}, got {variants!r}")
    out = {}
    for label, over in variants.items():
        out[str(label)] = _variant(str(label), over, baseline, path, base_dict, grid)
    return Ablation(baseline, out)


def _variant(label: str, over: Any, baseline: str, path: str, base_dict: dict, grid: dict) -> dict[str, Any]:
    """One variant's overrides, flattened (``{method: {terms: ...}}`` and ``{method.terms...: v}`` both work)."""
    where = f"ablation.variants.{label}"
    if label == baseline:
        raise ConfigError(path, where, "has the baseline's label")
    if not label.strip() or "\n" in label:
        raise ConfigError(path, where, "expected a non-empty one-line label")
    if not isinstance(over, dict) or not over:
        raise ConfigError(path, where, f"expected a non-empty mapping of dotted key -> value, got {over!r}")
    flat = flatten(over)
    for key in flat:
        if key.split(".")[0] in _RESERVED:
            raise ConfigError(path, f"{where}.{key}", _RESERVED[key.split(".")[0]])
        _check_key(key, path, where)
        if any(key == g or key.startswith(g + ".") or g.startswith(key + ".") for g in grid):
            raise ConfigError(path, f"{where}.{key}", "is also a grid axis; a variant may not change it")
    _build(base_dict, flat, path, where)
    return flat


def _seeds(seeds: Any, path: str) -> tuple[int, ...]:
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(path, "seeds", f"expected a non-empty list of non-negative integers, got {seeds!r}")
    for i, s in enumerate(seeds):
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(path, "seeds", f"expected non-negative integers, got {s!r}")
        if s in seeds[:i]:
            raise ConfigError(path, "seeds", f"{s} is listed twice")
    return tuple(seeds)


def _resources(section: Any, path: str) -> Resources:
    return build_section(Resources, {} if section is None else section, "resources", path)


def _storage(value: Any, name: str, path: str) -> str:
    return f"runs/{name}" if value is None else check_storage_value(value, path, "storage")


def check_storage_value(value: Any, source: str | None, key: str = "storage") -> str:
    """The rules of a storage as written (``storage:`` in a study, ``--storage`` on the command line): a non-empty
    path or URI that does not climb out with ``..``, and not a regular file. Returns it unchanged."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, f"expected a path or URI (a non-empty string), got {value!r}")
    if ".." in re.split(r"[/\\]", value):  # every write of the study goes under this one directory
        raise ConfigError(source, key, f"{value!r} climbs out with '..'; write the directory you mean "
                                       "(absolute, or relative to where sslray runs)" +
                                       ("" if key == "--storage" else " or pass --storage"))
    if "://" not in value and os.path.lexists(value) and not os.path.isdir(value):
        raise ConfigError(source, key, f"{value!r} is a file, not a storage directory")
    return value


def _report(section: Any, path: str, grid: dict[str, list], ablation: Ablation | None,
            planned: list[PlannedTrial]) -> ReportSpec:
    """The table spec. An ablation study defaults to rows = variant, and rows = variant defaults the baseline to
    the ablation's baseline row."""
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ConfigError(path, "report", f"expected a mapping, got {section!r}")
    section = dict(section)
    names = _report_names(section.pop("names", None), path)
    spec = build_section(ReportSpec, {"rows": VARIANT if ablation else ReportSpec.rows, **section}, "report", path)
    spec = dataclasses.replace(spec, names=names)
    if ablation and spec.rows == VARIANT and "baseline" not in section:
        spec = dataclasses.replace(spec, baseline=ablation.baseline)
    for key in ("rows", "cols"):
        _report_axis(getattr(spec, key), f"report.{key}", path, ablation)
    if spec.rows == spec.cols:
        raise ConfigError(path, "report.cols", f"is the same key as report.rows ({spec.rows!r})")
    _report_covers_axes(spec, path, grid, ablation)
    if spec.baseline is not None:
        _report_baseline(spec, path, planned)
    return _report_paper(spec, path)


def _report_names(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(path, "report.names", f"expected a mapping of name -> display name (strings), e.g. "
                                                f"{{fixmatch: FixMatch}}, got {value!r}")
    return tuple(value.items())


def _report_paper(spec: ReportSpec, path: str) -> ReportSpec:
    """Read the paper numbers now (their errors name their own file); ``paper_numbers`` is returned resolved
    against the study file's directory."""
    if spec.paper_numbers is None:
        return spec
    resolved = os.path.join(os.path.dirname(os.path.abspath(path)), spec.paper_numbers)
    if not os.path.isfile(resolved):
        raise ConfigError(path, "report.paper_numbers", f"no such file: {resolved}")
    paper = load_paper_numbers(resolved)
    if paper.metric is not None and paper.metric != spec.metric:
        raise ConfigError(path, "report.paper_numbers", f"{resolved} holds {paper.metric}, the report shows "
                                                        f"{spec.metric}")
    return dataclasses.replace(spec, paper_numbers=resolved)


def _tracking(section: Any, path: str) -> TrackingSpec:
    if section is not None and not isinstance(section, dict):
        raise ConfigError(path, "tracking", f"expected a mapping like {{wandb: offline}}, got {section!r}")
    return build_section(TrackingSpec, section or {}, "tracking", path)


def _report_covers_axes(spec: ReportSpec, path: str, grid: dict[str, list], ablation: Ablation | None) -> None:
    """A varied axis that is neither rows nor cols would put different configs in one cell, averaged as if they
    were seeds. With at most two varied axes the report can always cover them, so that is an error here; with
    more, the study is still valid and a table has to be asked for per slice (tables refuse mixed cells)."""
    varied = [k for k, values in grid.items()  # run.* values do not change the trial: nothing to average there
              if len(values) > 1 and k.split(".")[0] not in TrialConfig.NON_IDENTITY] + ([VARIANT] if ablation else [])
    uncovered = [k for k in varied if k not in (spec.rows, spec.cols)]
    if uncovered and len(varied) <= 2:
        raise ConfigError(path, "report", f"{uncovered[0]} varies in this study but is neither report.rows nor "
                                          f"report.cols ({spec.rows} x {spec.cols}); its cells would average "
                                          "different configs")


def _report_axis(key: Any, where: str, path: str, ablation: Ablation | None) -> None:
    if key == VARIANT:
        if ablation is None:
            raise ConfigError(path, where, "'variant' needs an ablation section")
        return
    if not isinstance(key, str):
        raise ConfigError(path, where, f"expected a dotted config key or 'variant', got {key!r}")
    t = _check_key(key, path, "report", where=where)
    if _is_section(t):
        raise ConfigError(path, where, "is a config section; expected a single value (or 'variant')")


def _report_baseline(spec: ReportSpec, path: str, planned: list[PlannedTrial]) -> None:
    if not isinstance(spec.baseline, str):
        raise ConfigError(path, "report.baseline", f"expected a row label, got {spec.baseline!r}")
    if not planned:  # a search study: rows are not known in advance
        return
    rows = list(dict.fromkeys(row_label(t, spec.rows) for t in planned))
    if spec.baseline not in rows:
        raise ConfigError(path, "report.baseline", f"{spec.baseline!r} is not a row (rows: {', '.join(rows)})")


def row_label(trial: PlannedTrial, key: str) -> str:
    """The table label of a planned trial along ``key`` (a dotted config key or ``"variant"``)."""
    if key == VARIANT:
        return trial.variant if trial.variant is not None else ""
    return cell_label(get_dotted(trial.config.to_dict(), key))


# --------------------------------------------------------------------------------------------------
# paper numbers (read while the study loads, so their errors come before any GPU time)


@dataclass(frozen=True)
class PaperNumbers:
    """Published numbers to print beside reproduced ones: ``numbers[(row, col)]``, in the table's unit."""

    source: str
    metric: str | None
    numbers: dict[tuple[str, str], float]


def load_paper_numbers(path: str) -> PaperNumbers:
    """Read a paper-numbers YAML file; ConfigError names the file and the key::

        source: UniMatch (CVPR 2023), Table 1          # printed under the table
        metric: val/miou                               # optional; must match the table's metric
        rows:                                          # row label -> column label -> number
          supervised: {92: 45.1, 183: 55.3}
          unimatch: {92: 75.2, 183: 77.2}
    """
    try:
        raw = load_yaml(path)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read file: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(path, "", f"expected a mapping with source, metric and rows, got {type(raw).__name__}")
    for key in raw:
        if key not in ("source", "metric", "rows"):
            raise ConfigError(path, str(key), "unknown key (expected one of: source, metric, rows)")
    source, metric, rows = raw.get("source"), raw.get("metric"), raw.get("rows")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(path, "source", "required: where the numbers come from (paper, table)")
    if metric is not None and not isinstance(metric, str):
        raise ConfigError(path, "metric", f"expected a metric name like val/miou, got {metric!r}")
    if not isinstance(rows, dict) or not rows:
        raise ConfigError(path, "rows", "expected a mapping of row label -> {column label: number}")
    numbers = {}
    for r, by_col in rows.items():
        if not isinstance(by_col, dict):
            raise ConfigError(path, f"rows.{r}", f"expected a mapping of column label -> number, got {by_col!r}")
        for c, v in by_col.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigError(path, f"rows.{r}.{c}", f"expected a number, got {v!r}")
            numbers[(cell_label(r), cell_label(c))] = float(v)
    return PaperNumbers(source.strip(), metric, numbers)


# --------------------------------------------------------------------------------------------------
# search


def _search(section: Any, path: str, base: TrialConfig, base_dict: dict) -> SearchSpec | None:
    """The search section: its settings by the config builder, then the space and the scheduler."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(path, "search", f"expected a mapping, got {section!r}")
    settings = {k: v for k, v in section.items() if k not in ("space", "scheduler")}
    unknown = set(settings) - {f.name for f in dataclasses.fields(SearchSpec)}
    if "num_samples" not in section and not unknown:  # an unknown key (a misspelt num_samples?) is the better error
        raise ConfigError(path, "search.num_samples", "required: how many configs to try")
    spec = build_section(SearchSpec, settings, "search", path)
    space = _space(section.get("space"), path, base, base_dict)
    allowed = DISCRETE_SAMPLERS.get(spec.sampler)
    for key, dist in space.items():
        if allowed and dist.kind not in allowed:
            raise ConfigError(path, "search.sampler", f"{spec.sampler} enumerates values: {key} needs "
                                                      f"a distribution of type {' or '.join(allowed)}")
    return dataclasses.replace(spec, space=space, scheduler=_scheduler(section.get("scheduler"), path, base))


def _space(space: Any, path: str, base: TrialConfig, base_dict: dict) -> dict[str, Distribution]:
    if not isinstance(space, dict) or not space:
        raise ConfigError(path, "search.space", f"expected a non-empty mapping of dotted key -> distribution, "
                                                f"got {space!r}")
    resolved = flatten(base.to_dict())
    out = {}
    for key, dist in space.items():
        key = str(key)
        where = f"search.space.{key}"
        if key.split(".")[0] in _RESERVED:
            raise ConfigError(path, where, _RESERVED[key.split(".")[0]])
        t = _check_key(key, path, "search.space")
        if key not in resolved:
            raise ConfigError(path, where, _absent_reason(key, base, t))
        out[key] = _distribution(dist, key, t, path, base_dict)
    return out


def _absent_reason(key: str, base: TrialConfig, t: Any) -> str:
    if _is_section(t):
        return "is a config section; search a single value"
    parts = key.split(".")
    if parts[:2] == ["method", "terms"]:
        return (f"loss term {parts[2]} is not in the base method {base.method.name!r} (its terms: "
                f"{', '.join(base.method.terms)}); add it to base.method.terms first")
    return "is not a value of the base config"


def _distribution(dist: Any, key: str, t: Any, path: str, base_dict: dict) -> Distribution:
    where = f"search.space.{key}"
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(path, where, f"expected one distribution, e.g. {{uniform: [low, high]}} "
                                       f"({', '.join(DISTRIBUTIONS)}), got {dist!r}")
    kind, args = next(iter(dist.items()))
    where = f"{where}.{kind}"
    problem = _DIST_CHECKS[kind](args)
    if problem:
        raise ConfigError(path, where, problem)
    leaf = unwrap_optional(t)
    if kind in ("uniform", "loguniform") and leaf is not float:
        raise ConfigError(path, where, f"{key} is {_type_word(leaf)}; use int or choice")
    if kind == "int" and leaf not in (int, float):
        raise ConfigError(path, where, f"{key} is {_type_word(leaf)}; use choice")
    values = args if kind == "choice" else args[:2]
    for v in values:  # bounds and choices must be values the config accepts
        _build(base_dict, {key: v}, path, where, relocate_all=True)
    if kind == "choice":
        return Distribution(kind, choices=tuple(args))
    return Distribution(kind, args[0], args[1], args[2] if len(args) > 2 else None)


def _check_bounds(args: Any, log: bool) -> str | None:
    ok = (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)
          and (args[0] > 0 or not log) and args[0] < args[1])
    if ok:
        return None
    return "expected [low, high] with 0 < low < high" if log else "expected [low, high] with low < high"


def _check_int(args: Any) -> str | None:
    ok = (isinstance(args, list) and len(args) in (2, 3) and all(_is_int(a) for a in args)
          and args[0] < args[1] and (len(args) == 2 or args[2] >= 1))
    return None if ok else "expected [low, high] or [low, high, step] integers with low < high and step >= 1"


def _check_choice(args: Any) -> str | None:
    if not isinstance(args, list) or not args:
        return "expected a non-empty list of values"
    for i, a in enumerate(args):
        if not (a is None or isinstance(a, (str, int, float, bool))):
            return f"choices must be strings, numbers, booleans or null (Optuna's categorical), got {a!r}"
        if a in args[:i]:
            return f"lists {a!r} twice"
    return None


_DIST_CHECKS = {
    "uniform": lambda a: _check_bounds(a, log=False),
    "loguniform": lambda a: _check_bounds(a, log=True),
    "int": _check_int,
    "choice": _check_choice,
}

def _check_lockstep(path: str, base: TrialConfig, resources: Resources, seeds: int) -> None:
    """ASHA with several seeds runs them in turns per evaluation, each resuming from its checkpoint: that needs
    checkpoints, and one worker per trial (a Train worker group reports each seed to Tune itself)."""
    if not base.run.checkpoint:
        raise ConfigError(path, "base.run.checkpoint", f"ASHA with {seeds} seeds per configuration needs "
                                                       "checkpoints (the seeds take turns, each resuming from its "
                                                       "own); set it to true or use one seed")
    if resources.workers != 1:
        raise ConfigError(path, "search.scheduler", f"ASHA with {seeds} seeds per configuration is not supported "
                                                    f"with resources.workers = {resources.workers} yet; use one "
                                                    "worker, one seed or no scheduler")


def _scheduler(section: Any, path: str, base: TrialConfig) -> dict | None:
    """ASHA with every key filled in (:class:`AshaSpec`); ``max_t`` defaults to the evaluations of ``base``."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(path, "search.scheduler", f"expected a mapping like {{type: asha}}, got {section!r}")
    evaluations = math.ceil(base.train.iterations / base.train.eval_every)
    return dataclasses.asdict(build_section(AshaSpec, {"max_t": evaluations, **section}, "search.scheduler", path))


# --------------------------------------------------------------------------------------------------
# keys and cells


def field_type(key: str) -> Any:
    """The annotation of a dotted TrialConfig key (a dataclass for a section, ``Mapping`` for ``method.terms``).

    ``method.terms.<t>.<field>`` resolves through the term registry, so any registered term is a valid key even if
    the base method does not use it (an ablation may add a term). Raises ConfigError(None, key, ...) otherwise.
    """
    from sslray.methods import TERMS  # late: the registry imports torch

    if key in EPOCH_KEYS:  # study-file keys resolved into train.iterations (sslray.epochs)
        return EPOCH_KEYS[key]
    parts, t, i = key.split("."), TrialConfig, 0
    while i < len(parts):
        where = ".".join(parts[:i])
        if not dataclasses.is_dataclass(t):
            raise ConfigError(None, key, f"{where} is a value, not a section")
        if t is MethodConfig and parts[i] == "terms" and i + 1 < len(parts):
            if parts[i + 1] not in TERMS:
                raise ConfigError(None, key, f"unknown loss term {parts[i + 1]!r} (known: {', '.join(TERMS)})")
            t, i = TERMS[parts[i + 1]].config_cls, i + 2
            continue
        names = [f.name for f in dataclasses.fields(t)]
        if parts[i] not in names:
            raise ConfigError(None, key, f"unknown config key ({where or 'the top level'} has: {', '.join(names)})")
        t, i = typing.get_type_hints(t)[parts[i]], i + 1
    return t


def _check_key(key: str, path: str, prefix: str, where: str | None = None) -> Any:
    """field_type(key), with errors at ``<prefix>.<key>`` (or ``where``) in ``path``."""
    try:
        return field_type(key)
    except ConfigError as e:
        loc = where or (f"{prefix}.{key}" if prefix else key)
        raise ConfigError(path, loc, e.message) from None


def _build(base_dict: Mapping, sets: Mapping[str, Any], path: str, prefix: str,
           relocate_all: bool = False) -> TrialConfig:
    """TrialConfig of ``base_dict`` with dotted ``sets`` applied, plus the checks the config cannot make alone.

    An error at a key that ``sets`` touched is reported at ``<prefix>.<key>``; an error elsewhere (a combination
    that breaks another key) at the first set key, naming both. With ``relocate_all`` every error goes to
    ``<prefix>.<key>`` (validating the base itself), or to ``prefix`` when ``sets`` is a single key.
    """
    try:
        d = _schedule_replaced(base_dict, sets)
        for k, v in sets.items():
            set_dotted(d, k, v)
        epochs = pop_epoch_keys(d)
        if epochs and "iterations" in d.get("train", {}):
            raise ConfigError(None, "train.epochs", _EXCLUSIVE)
        check_epoch_keys(epochs)
        cfg = TrialConfig.from_dict(d, source=path)
        if epochs:
            cfg = _with_epochs(cfg, d, epochs, path)
        _check_semantics(cfg)
        return cfg
    except ConfigError as e:
        raise _relocate(e, sets, path, prefix, relocate_all) from None


def _with_epochs(cfg: TrialConfig, d: dict, epochs: Mapping[str, Any], path: str) -> TrialConfig:
    """``cfg`` with ``train.iterations`` = epochs x one epoch's iterations, and ``train.eval_every`` one epoch
    unless written (``sslray.epochs``)."""
    per_epoch = epoch_iterations(cfg, epochs.get("epoch_over", "auto"), epochs.get("epoch_gpus", 1))
    train = dict(d.get("train") or {})
    train["iterations"] = epochs["epochs"] * per_epoch
    train.setdefault("eval_every", per_epoch)
    return dataclasses.replace(cfg, train=build_section(TrainConfig, train, "train", path))


def _relocate(e: ConfigError, sets: Mapping[str, Any], path: str, prefix: str, relocate_all: bool) -> ConfigError:
    user_keys = [k for k in sets if k != "seed"]
    if relocate_all:
        loc = prefix if len(user_keys) == 1 else f"{prefix}.{e.key}" if prefix else e.key
        return ConfigError(path, loc, e.message)
    for k in user_keys:
        if e.key == k or e.key.startswith((k + ".", k + "[")):
            return ConfigError(path, f"{prefix}.{e.key}" if prefix else e.key, e.message)
    if not user_keys:
        return ConfigError(path, f"{prefix}.{e.key}" if prefix else e.key, e.message)
    first = user_keys[0]
    what = ", ".join(f"{k}={sets[k]!r}" for k in user_keys)
    return ConfigError(path, f"{prefix}.{first}" if prefix else first, f"with {what}: {e.key}: {e.message}")


def _check_semantics(cfg: TrialConfig) -> None:
    """Checks that need more than one field or the study: the partition fits its pool, and the trial leaves its
    output directory to the study (all writes stay under the storage); model, dataset and eval-mode names are
    checked against their registries (``sslray.registries.check_names``)."""
    from sslray.data.splits import parse_partition_spec
    from sslray.registries import check_names

    check_names(cfg)
    if cfg.run.out_dir is not None:
        raise ConfigError(None, "run.out_dir", "set by the study (every trial writes under <storage>/trials/<trial "
                                               "id>); remove it and choose the storage instead")
    if cfg.data.dataset == "synthetic":  # real datasets: the pool size is only known with the files on disk
        try:
            parse_partition_spec(cfg.data.partition, cfg.data.synthetic.num_train)
        except ValueError as e:
            raise ConfigError(None, "data.partition", str(e)) from None


def unwrap_optional(t: Any) -> Any:
    """``float | None`` -> ``float``; anything else unchanged."""
    if typing.get_origin(t) not in (typing.Union, types.UnionType):
        return t
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if len(args) == 1 else t


def _is_section(t: Any) -> bool:
    return dataclasses.is_dataclass(t) or typing.get_origin(t) in (collections.abc.Mapping, dict)


def _type_word(t: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(t, "not a number")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
