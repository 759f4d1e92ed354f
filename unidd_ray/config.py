"""Typed configuration: one dataclass per stage, one YAML file per recipe.

A recipe (``unidd_ray/recipes/<name>.yaml`` or any YAML file) fills a
:class:`Recipe`; ``--set section.key=value`` overrides single keys (values are
parsed as YAML, so ``--set recover.ipc=50`` is an int and
``--set evaluate.crop_scale=[0.5,1.0]`` a list).  Unknown keys are refused with
the list of valid ones.  Every stage saves the resolved config next to its
outputs (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # a source of unidd_ray.data.sources
    root: str | None = None  # where the source files are (None: the source's default)
    options: dict = field(default_factory=dict)  # extra source options (e.g. val_labels for imagefolder)
    max_resolution: int = 256  # JPEG storage of images above 64 px
    jpeg_quality: int = 90
    resolution: int | None = None  # training/eval side length (None: as stored)
    num_workers: int = 2  # FFCV loader threads


@dataclass
class ModelConfig:
    arch: str = "convnet"
    options: dict = field(default_factory=dict)  # width, depth, norm, stem, ...
    weights: str | None = None  # torchvision-format state_dict to start from (weights_only load)


@dataclass
class SqueezeConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.05  # SGD, scaled by batch_size / 256 is NOT applied: give the final value
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: int = 0
    crop_scale: tuple[float, float] = (0.35, 1.0)
    workers: int = 1  # Ray Train workers (DDP)
    cpus_per_worker: float = 2
    use_gpu: bool = False
    max_failures: int = 2  # automatic restarts after a worker failure
    seed: int = 0
    eval_batch_size: int = 1024  # the per-epoch val pass (eval mode: a performance setting only)


@dataclass
class StatsConfig:
    actors: int = 2
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0
    batch_size: int = 256  # forward batch
    block_size: int = 2048  # images per canonical merge block (a multiple of batch_size)
    blocks_per_unit: int = 1  # work unit = this many consecutive blocks
    layers: list[str] | None = None  # taps (None: every Conv2d input but residual 1x1 shortcuts)
    max_retries: int = 3  # re-runs of a unit whose actor died


@dataclass
class RecoverConfig:
    method: str = "cfm"  # cfm | krr | dc | dm | mtt | sre2l | ce
    ipc: int = 10
    iterations: int = 1000
    lr: float = 0.25
    adam_betas: tuple[float, float] = (0.5, 0.9)
    alpha: float = 0.1  # weight of the spectral matching terms
    # constant: α for every batch | emu: α·t for the t-th batch, which undoes the 1/t weight the EMU mix
    # gives the current batch, so every slot's matching gradient keeps the first slot's scale
    alpha_scale: str = "constant"
    beta_max: float = 0.1  # cfm: start of the schedule; krr: the fixed beta
    schedule: str = "cosine"  # cosine | linear | constant | geometric
    beta_min: float | None = None  # schedule floor: cosine/linear end near it (None: 0), geometric ends at it (None: beta_max / 100)
    precision: str = "mixed"  # cfm/krr resolvent: mixed (float64 values, float32 gradient products) | float64 | float32
    mtt_eta: float = 0.1
    mtt_steps: int = 10
    bn_weight: float = 0.01  # sre2l: weight of the BatchNorm statistics loss
    signal: str = "mean"  # mean | class | soft
    covariance: str = "total"  # total | within_class
    emu: bool = True
    classes_per_batch: int | None = None  # None: all classes of a worker in one batch
    workers: int = 1
    cpus_per_worker: float = 1
    use_gpu: bool = False
    sync: str = "round"  # round: all-reduce EMU moments after each round; step: every iteration
    crop_scale: tuple[float, float] = (0.08, 1.0)
    max_roll: int | None = None  # None: 4 px at 32 px, scaled with resolution
    flip: bool = True
    seed: int = 0
    save_beton: bool = False
    # NHWC teacher and images (default): faster convolutions on CPUs (oneDNN) for every method, and every
    # tap's Gram matrix is one product on an (N·H·W, C) view (benchmarks/recover.py); a layout, so not
    # part of the stage key
    channels_last: bool = True
    max_failures: int = 2
    fail_at_batch: int | None = None  # fault injection: fail once after this many finished batches


@dataclass
class EvaluateConfig:
    student: str = "convnet"
    student_options: dict = field(default_factory=dict)
    epochs: int = 300
    batch_size: int | None = None  # None: the whole distilled set per step
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 20.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    cutmix: float = 1.0  # Beta(cutmix, cutmix) mixing; 0 disables CutMix
    seeds: int = 3
    hard_labels: bool = False
    aug_seed: int = 0  # seed of the augmentation stream (independent of the training seed)
    eval_every: int = 0  # evaluate on val every k epochs (0: only at the end)
    eval_batch_size: int = 1000
    workers: int = 1
    # "data": the workers train each student together (DDP over the distilled set);
    # "seeds": each worker trains its own seeds (no communication; on small CPUs, two 1-thread
    # processes get through two seeds ~1.6x faster than one 2-thread process does)
    split: str = "data"
    cpus_per_worker: float = 1
    use_gpu: bool = False
    # NHWC student/teacher/batches: same arithmetic, other summation order (like a thread count);
    # faster convolutions on CPUs (benchmarks/evaluate.py)
    channels_last: bool = False


@dataclass
class Recipe:
    name: str = "fashion-mnist"
    out: str | None = None  # run directory (None: runs/<name>)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    # recover settings of one IPC over the `recover` section, e.g. {1: {lr: 0.1}}: the pipeline, `recover`
    # and Tune trials read a set's settings with recover_for(ipc)
    recover_by_ipc: dict[int, dict] = field(default_factory=dict)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    methods: list[str] = field(default_factory=lambda: ["random", "dm", "sre2l", "cfm"])
    ipcs: list[int] = field(default_factory=lambda: [10])
    # recoveries the pipeline runs at the same time, each its own Ray Train run (None: as many as the
    # Ray cluster's CPUs and GPUs hold side by side; 1: one after another)
    parallel_recoveries: int | None = None
    ray_address: str | None = None  # None: RAY_ADDRESS or an embedded local Ray
    storage_path: str | None = None  # shared storage for Ray Train/Tune (None: <out>/ray)

    def __post_init__(self):
        # a repeated entry would name the same stage directories twice, and the pipeline would write them twice
        for name in ("methods", "ipcs"):
            values = getattr(self, name)
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise ConfigError(f"{name} lists {repeated} more than once; give each entry once, "
                                  f"e.g. {name}={list(dict.fromkeys(values))}")
        self.recover_by_ipc = _checked_recover_by_ipc(self.recover_by_ipc, self.recover)

    def recover_for(self, ipc: int, **overrides) -> RecoverConfig:
        """The recover settings of the IPC-``ipc`` sets: the ``recover`` section, this IPC's ``recover_by_ipc``
        entry over it, then ``overrides`` (e.g. ``method``)."""
        return section_from(self, "recover", {**self.recover_by_ipc.get(ipc, {}), **overrides, "ipc": ipc})

    @property
    def run_dir(self) -> Path:
        return Path(self.out if self.out else Path("runs") / self.name)


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and the valid choices."""


def _checked_recover_by_ipc(table: dict, recover: RecoverConfig) -> dict[int, dict]:
    """``recover_by_ipc`` with integer IPCs and type-checked settings; each entry must name recover keys
    other than ``ipc`` and ``method`` (the entry's own IPC; the method comes from ``methods``)."""
    example = "e.g. recover_by_ipc={1: {lr: 0.1}}"
    out: dict[int, dict] = {}
    for raw, settings in table.items():
        ipc = int(raw) if isinstance(raw, str) and raw.strip().isdigit() else raw
        if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
            raise ConfigError(f"recover_by_ipc: {raw!r} is not an IPC (a positive integer); {example}")
        if ipc in out:
            raise ConfigError(f"recover_by_ipc gives IPC {ipc} twice; merge its settings into one entry")
        where = f"recover_by_ipc.{ipc}"
        if not isinstance(settings, dict):
            raise ConfigError(f"{where} must be a mapping of recover keys, got {settings!r}; {example}")
        if not settings:
            continue  # an empty entry sets nothing
        fixed = sorted({"ipc", "method"} & set(settings))
        if fixed:
            raise ConfigError(f"{where} cannot set {fixed}: an entry's IPC is its own and the method comes from "
                              "`methods`")
        resolved = from_dict(RecoverConfig, {**to_dict(recover), **settings}, where)
        out[ipc] = {k: getattr(resolved, k) for k in settings}
    return out


# ----------------------------------------------------------------------------- conversion
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {_type_name(tp)} keys, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} entries, got {list(value)!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [v if item is Any else _coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a (nested) mapping, refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists, for YAML)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


# ----------------------------------------------------------------------------- recipes
def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse the value of override {text!r}: {exc}") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` (a recipe mapping) with ``section.key=value`` overrides applied in order.  An override of
    ``recover.<key>`` sets that key at every IPC: it also drops ``<key>`` from the ``recover_by_ipc`` entries,
    and drops an entry that this leaves empty (a later ``recover_by_ipc.<ipc>.<key>=...`` sets one IPC's
    again)."""
    data = _deep_copy(data)
    for text in overrides or []:
        path, value = parse_override(text)
        by_ipc = data.get("recover_by_ipc")
        if len(path) == 2 and path[0] == "recover" and isinstance(by_ipc, dict):
            for ipc, entry in list(by_ipc.items()):
                if isinstance(entry, dict):
                    entry.pop(path[1], None)
                    if not entry:
                        del by_ipc[ipc]  # nothing left for that IPC
        node = data
        for part in path[:-1]:
            node = node.setdefault(_existing_key(node, part), {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[_existing_key(node, path[-1])] = value
    return data


def _existing_key(node: dict, part: str):
    """The key of ``node`` that an override's ``part`` names: the integer key an IPC entry of a YAML file
    has (``recover_by_ipc.1.lr`` names ``{1: {lr: ...}}``), else ``part`` itself."""
    if part not in node and part.isdigit() and int(part) in node:
        return int(part)
    return part


def _deep_copy(data):
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_recipe(recipe: str | None = None, *, config: str | Path | None = None,
                overrides: list[str] | None = None) -> Recipe:
    """Resolve a recipe: built-in ``recipe`` name or a YAML ``config`` file, then ``overrides``."""
    if recipe is not None and config is not None:
        raise ConfigError("give either a recipe name or a config file, not both")
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = _read_yaml(path)
    else:
        name = recipe or "fashion-mnist"
        path = RECIPE_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown recipe {name!r}; built-in recipes: {available_recipes()}")
        data = _read_yaml(path)
        data.setdefault("name", name)
    return from_dict(Recipe, apply_overrides(data, overrides or []))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def section_from(recipe: Recipe, name: str, overrides: dict | None = None):
    """A copy of one section with keyword overrides applied and type-checked."""
    section = getattr(recipe, name)
    data = to_dict(section)
    data.update(overrides or {})
    return from_dict(type(section), data, name)
