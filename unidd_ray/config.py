"""Typed configuration: one frozen dataclass per stage, one YAML file per recipe.

A recipe (``unidd_ray/recipes/<name>.yaml`` or any YAML file) fills a
:class:`Recipe`; ``--set section.key=value`` overrides single keys (values are
parsed as YAML, so ``--set recover.ipc=50`` is an int and
``--set evaluate.crop_scale=[0.5,1.0]`` a list).  Unknown keys are refused with
the list of valid ones.  Every stage saves the resolved config next to its
outputs (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from unidd_ray.data.normalization import check_normalization
from unidd_ray.data.sources import check_source_options
from unidd_ray.methods import ALPHA_SCALES, BASELINES, METHODS, method_filter
from unidd_ray.models import check_model_name, check_model_options, model_normalization
from unidd_ray.spectral import COVARIANCE_MODES, SCHEDULES, SIGNAL_KINDS
from unidd_ray.spectral.filters import PRECISIONS

RECIPE_DIR = Path(__file__).parent / "recipes"
DISTRIBUTIONS = ("exact", "independent")  # recover.distribution: how W workers share a recovery's batches
INITS = ("random", "first")  # recover.init: which real image each (class, slot) starts from
ROLLS = ("symmetric", "nonnegative")  # recover.roll: the signs of the random shifts
LR_SCHEDULES = ("cosine", "constant")  # recover.lr_schedule: the pixels' learning rate over the iterations
AMPS = ("none", "bf16")  # recover.amp, evaluate.amp: the networks in float32 or under bfloat16 autocast
PROTOCOLS = ("ours", "paper")  # evaluate.protocol: how the student is trained and its accuracy reported


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and the valid choices."""


class InvalidSetting(ConfigError):
    """One setting's value is invalid: ``<section>.<key> <what it must be>, got <value>``."""

    def __init__(self, section: str, key: str, text: str):
        super().__init__(f"{section + '.' if section else ''}{key} {text}")
        self.section, self.key, self.text = section, key, text

    def at(self, section: str) -> "InvalidSetting":
        """The same error for the section as the recipe names it (e.g. ``recover_by_ipc.1``)."""
        return InvalidSetting(section, self.key, self.text)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"  # a source of unidd_ray.data.sources
    root: str | None = None  # where the source files are (None: the source's default)
    options: dict = field(default_factory=dict)  # extra source options (e.g. val_labels for imagefolder)
    max_resolution: int = 256  # JPEG storage of images above 64 px
    jpeg_quality: int = 90
    resolution: int | None = None  # training/eval side length (None: as stored)
    num_workers: int = 2  # FFCV loader threads

    SECTION: ClassVar[str] = "data"

    def __post_init__(self):
        check_data(self)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "convnet"
    options: dict = field(default_factory=dict)  # width, depth, norm, stem, ...
    weights: str | None = None  # torchvision-format state_dict to start from (weights_only load)
    # the teacher's input normalisation (unidd_ray/data/normalization.py): dataset (the training split's mean/std) |
    # cifar10 | cifar100 | tiny-imagenet | imagenet (the UniDD authors' constants) | {mean: [...], std: [...]}
    normalization: str | dict = "dataset"
    # a teacher artifact directory (`unidd-ray import unidd`'s OUT/teacher, or an earlier run's teacher-*) used as
    # the run's teacher in place of the squeeze stage; arch, options, weights and normalisation are then its own
    artifact: str | None = None

    SECTION: ClassVar[str] = "teacher"

    def __post_init__(self):
        check_model(self)


@dataclass(frozen=True)
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

    SECTION: ClassVar[str] = "squeeze"

    def __post_init__(self):
        check_squeeze(self)


@dataclass(frozen=True)
class StatsConfig:
    actors: int = 2
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0
    batch_size: int = 256  # forward batch
    block_size: int = 2048  # images per canonical merge block (a multiple of batch_size)
    blocks_per_unit: int = 1  # work unit = this many consecutive blocks
    layers: list[str] | None = None  # taps (None: every Conv2d input but residual 1x1 shortcuts)
    max_retries: int = 3  # re-runs of a unit whose actor died
    # a statistics artifact directory (`unidd-ray import unidd`'s OUT/stats, or an earlier run's stats-*) used in
    # place of the stats stage; it must have been computed with the run's teacher (teacher.artifact)
    artifact: str | None = None

    SECTION: ClassVar[str] = "stats"

    def __post_init__(self):
        check_stats(self)


@dataclass(frozen=True)
class RecoverConfig:
    method: str = "cfm"  # cfm | krr | lfm | dc | dm | mtt | sre2l | ce
    ipc: int = 10
    iterations: int = 1000
    lr: float = 0.25
    lr_schedule: str = "cosine"  # cosine: to 0 over the iterations (the authors') | constant
    adam_betas: tuple[float, float] = (0.5, 0.9)
    alpha: float = 0.1  # weight of the spectral matching terms
    # constant: α for every batch | emu: α·t for the t-th batch, which undoes the 1/t weight the EMU mix
    # gives the current batch, so every slot's matching gradient keeps the first slot's scale
    alpha_scale: str = "constant"
    beta_max: float = 0.1  # cfm: start of the schedule; krr: the fixed beta
    schedule: str = "cosine"  # cosine | linear | constant | geometric
    beta_min: float | None = None  # schedule floor: cosine/linear end near it (None: 0), geometric ends at it (None: beta_max / 100)
    precision: str = "mixed"  # cfm/krr resolvent: mixed (float64 values, float32 gradient products) | float64 | float32
    # none: the teacher in float32 | bf16: its forward and backward under torch.autocast(bfloat16); the taps' inputs
    # are cast back (to the resolvent's dtype, float64 by default) before the moments, the CE is float32
    amp: str = "none"
    mtt_eta: float = 0.1
    mtt_steps: int = 10
    bn_weight: float = 0.01  # sre2l: weight of the BatchNorm statistics loss
    # mean | class | soft (class means, raw / teacher-softmax-weighted) | class_share | mix_share (the authors'
    # class / mix signals: (n_k/N)·μ_k and its softmax-weighted form, over all K columns)
    signal: str = "mean"
    # total | within_class | per_batch (the authors' running_cov; served by imported statistics)
    covariance: str = "total"
    emu: bool = True
    # classes of one batch, the unit the EMU counts once: with distribution exact the global batch (the authors'
    # --batch: classes in order, cut into batches of this size), with independent each worker's own batch;
    # None: every class (exact) or every class of a worker (independent) in one batch
    batch_classes: int | None = None
    workers: int = 1
    cpus_per_worker: float = 1
    use_gpu: bool = False
    # exact: a round is one global batch split across the workers, moments all-reduced at every iteration (the
    # same images for any worker count); independent: each worker its own batch, the EMU summed after each round
    distribution: str = "exact"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    max_roll: int | None = None  # None: 4 px at 32 px, scaled with resolution
    roll: str = "symmetric"  # symmetric: shifts in -max_roll..max_roll | nonnegative: 0..max_roll (the authors')
    flip: bool = True
    augment: bool = True  # false: no crop, flip or roll (deterministic checks, ablations)
    seed: int = 0
    # the real image each (class, slot) starts from: random = a choice seeded by (seed, class); first = the
    # class's first IPC images in file order (the authors')
    init: str = "random"
    classes: tuple[int, ...] | None = None  # the classes to distil (None: every class of the dataset)
    save_beton: bool = False
    # NHWC teacher and images (default): faster convolutions on CPUs (oneDNN) for every method, and every
    # tap's Gram matrix is one product on an (N·H·W, C) view (benchmarks/recover.py); a layout, so not
    # part of the stage key
    channels_last: bool = True
    max_failures: int = 2

    SECTION: ClassVar[str] = "recover"

    def __post_init__(self):
        check_recover(self)


@dataclass(frozen=True)
class EvaluateConfig:
    student: str = "convnet"
    student_options: dict = field(default_factory=dict)
    # more student architectures (registered or zoo names, each with its default options), each evaluated on every
    # set beside `student` in its own evaluation, e.g. [resnet18, torchvision:regnet_y_8gf, timm:convnext_tiny]
    students: list[str] = field(default_factory=list)
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
    # none: the student's and the teacher's forward and backward in float32 | bf16: under bfloat16 autocast (the
    # loss, from float32 logits, and the val tests stay float32)
    amp: str = "none"
    # how the student is trained and reported (docs/CONFIGURATION.md): "ours" (per-step cosine lr to 0, KL × T²,
    # CutMix box and partner per image, final accuracy) | "paper" (the UniDD authors' generate_soft_label_online.py:
    # per-epoch quarter cosine to lr/2, KL without T², one CutMix box, λ and in-batch permutation per batch, and the
    # test-selected best of the late checks recorded beside the final accuracy)
    protocol: str = "ours"
    # batch_size of the sets of one IPC over batch_size, e.g. {1: 10, 10: 50, 50: 100} (EvaluateConfig.for_ipc)
    batch_size_by_ipc: dict[int, int] | None = None

    SECTION: ClassVar[str] = "evaluate"

    def __post_init__(self):
        object.__setattr__(self, "batch_size_by_ipc", _checked_batch_size_by_ipc(self.batch_size_by_ipc))
        check_evaluate(self)

    def for_ipc(self, ipc: int | None) -> "EvaluateConfig":
        """The settings of the IPC-``ipc`` sets: ``batch_size`` from ``batch_size_by_ipc`` where it names ``ipc``,
        the table itself dropped (so a resolved evaluation has the key of one that set that batch_size directly)."""
        if self.batch_size_by_ipc is None:
            return self
        batch = self.batch_size_by_ipc.get(ipc, self.batch_size) if ipc is not None else self.batch_size
        return dataclasses.replace(self, batch_size=batch, batch_size_by_ipc=None)


@dataclass(frozen=True)
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
        check_recipe(self)
        # a repeated entry would name the same stage directories twice, and the pipeline would write them twice
        for name in ("methods", "ipcs"):
            values = getattr(self, name)
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise ConfigError(f"{name} lists {repeated} more than once; give each entry once, "
                                  f"e.g. {name}={list(dict.fromkeys(values))}")
        object.__setattr__(self, "recover_by_ipc", _checked_recover_by_ipc(self.recover_by_ipc, self.recover))
        for ipc in self.ipcs:  # each set's own settings: a method's rules hold for every IPC's entry
            for method in self.methods:
                if method not in BASELINES:
                    self.recover_for(ipc, method=method)

    def recover_for(self, ipc: int, **overrides) -> RecoverConfig:
        """The recover settings of the IPC-``ipc`` sets: the ``recover`` section, this IPC's ``recover_by_ipc``
        entry over it, then ``overrides`` (e.g. ``method``)."""
        return section_from(self, "recover", {**self.recover_by_ipc.get(ipc, {}), **overrides, "ipc": ipc})

    @property
    def run_dir(self) -> Path:
        return Path(self.out if self.out else Path("runs") / self.name)


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


# ----------------------------------------------------------------------------- value checks
# Every value is checked once, when its section is built (from a recipe, an override or in code): a bad
# setting is refused before any stage starts, naming the key and what it accepts.
def _fail(section: str, key: str, text: str, value) -> None:
    raise InvalidSetting(section, key, f"{text}, got {value!r}")


def _integer(section: str, key: str, value: int | None, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < low:
        _fail(section, key, f"must be an integer >= {low}" + (" (or null)" if optional else ""), value)


def _number(section: str, key: str, value: float | None, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """``value`` must be a finite number in [low, high] (an open end with ``low_open``/``high_open``)."""
    if value is None and optional:
        return
    ok = value is not None and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        _fail(section, key, "must be a finite number" + (f" {' and '.join(bounds)}" if bounds else ""), value)


def _choice(section: str, key: str, value, choices) -> None:
    if value not in choices:
        _fail(section, key, f"must be one of {list(choices)}", value)


def _crop_scale(section: str, key: str, value: tuple[float, float]) -> None:
    low, high = value
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high <= 1):
        _fail(section, key, "must be [low, high] with 0 < low <= high <= 1", list(value))


def check_data(cfg: "DataConfig") -> None:
    try:
        check_source_options(cfg.dataset, cfg.options)
    except ValueError as exc:
        raise InvalidSetting("data", "dataset" if "unknown dataset source" in str(exc) else "options",
                             f"is not usable: {exc}") from None
    _integer("data", "max_resolution", cfg.max_resolution, 8)
    _integer("data", "jpeg_quality", cfg.jpeg_quality, 1)
    if cfg.jpeg_quality > 100:
        _fail("data", "jpeg_quality", "must lie in 1..100", cfg.jpeg_quality)
    _integer("data", "resolution", cfg.resolution, 1, optional=True)
    _integer("data", "num_workers", cfg.num_workers, 1)


def _model_name(section: str, key: str, name) -> None:
    """One line naming the setting, the name and the fix (the nearest names of a zoo library)."""
    if not isinstance(name, str):
        _fail(section, key, "must be a model name", name)
    try:
        check_model_name(name)
    except ValueError as exc:
        if not name.startswith(("torchvision:", "timm:")):
            _fail(section, key, str(exc), name)
        raise InvalidSetting(section, key, f"{name!r}: {exc}") from None


def check_model(cfg: "ModelConfig") -> None:
    _model_name(cfg.SECTION, "arch", cfg.arch)
    _model_options(cfg.SECTION, "options", cfg.arch, cfg.options)
    try:
        check_normalization(cfg.normalization)
        if cfg.normalization == "model":
            try:
                model_normalization(cfg.arch)
            except ValueError as exc:
                raise ValueError(f"model takes teacher.arch's own constants, but {exc}") from None
    except ValueError as exc:
        raise InvalidSetting(cfg.SECTION, "normalization", str(exc)) from None
    # (the weights file is read where the teacher is trained, e.g. on a cluster's shared storage: checked there)


def check_squeeze(cfg: "SqueezeConfig") -> None:
    _integer("squeeze", "epochs", cfg.epochs, 0)
    _integer("squeeze", "batch_size", cfg.batch_size, 1)
    _number("squeeze", "lr", cfg.lr, low=0, low_open=True)
    _number("squeeze", "momentum", cfg.momentum, low=0, high=1, high_open=True)
    _number("squeeze", "weight_decay", cfg.weight_decay, low=0)
    _number("squeeze", "label_smoothing", cfg.label_smoothing, low=0, high=1, high_open=True)
    _integer("squeeze", "warmup_epochs", cfg.warmup_epochs, 0)
    _crop_scale("squeeze", "crop_scale", cfg.crop_scale)
    _integer("squeeze", "workers", cfg.workers, 1)
    _number("squeeze", "cpus_per_worker", cfg.cpus_per_worker, low=0, low_open=True)
    _integer("squeeze", "max_failures", cfg.max_failures, 0)
    _integer("squeeze", "seed", cfg.seed, 0)
    _integer("squeeze", "eval_batch_size", cfg.eval_batch_size, 1)


def check_stats(cfg: "StatsConfig") -> None:
    _integer("stats", "actors", cfg.actors, 1)
    _number("stats", "cpus_per_actor", cfg.cpus_per_actor, low=0, low_open=True)
    _number("stats", "gpus_per_actor", cfg.gpus_per_actor, low=0)
    _integer("stats", "batch_size", cfg.batch_size, 1)
    _integer("stats", "block_size", cfg.block_size, 1)
    if cfg.block_size % cfg.batch_size:
        _fail("stats", "block_size", f"must be a multiple of stats.batch_size ({cfg.batch_size}) so that forward "
                                     "batches never straddle a merge block", cfg.block_size)
    _integer("stats", "blocks_per_unit", cfg.blocks_per_unit, 1)
    if cfg.layers is not None and (not cfg.layers or not all(isinstance(n, str) and n for n in cfg.layers)):
        _fail("stats", "layers", "must be a non-empty list of module names (or null: every Conv2d input)", cfg.layers)
    _integer("stats", "max_retries", cfg.max_retries, 0)


def check_recover(cfg: "RecoverConfig") -> None:
    section = cfg.SECTION
    _choice(section, "method", cfg.method, METHODS)
    _integer(section, "ipc", cfg.ipc, 1)
    _integer(section, "iterations", cfg.iterations, 1)
    _number(section, "lr", cfg.lr, low=0, low_open=True)
    if not all(math.isfinite(b) and 0 <= b < 1 for b in cfg.adam_betas):
        _fail(section, "adam_betas", "must be two numbers in [0, 1) (Adam's decay rates)", list(cfg.adam_betas))
    _number(section, "alpha", cfg.alpha, low=0)
    _choice(section, "alpha_scale", cfg.alpha_scale, ALPHA_SCALES)
    _number(section, "beta_max", cfg.beta_max, low=0, low_open=True)
    _choice(section, "schedule", cfg.schedule, SCHEDULES)
    _number(section, "beta_min", cfg.beta_min, low=0, optional=True)
    _choice(section, "precision", cfg.precision, PRECISIONS)
    _choice(section, "amp", cfg.amp, AMPS)
    _number(section, "mtt_eta", cfg.mtt_eta, low=0, low_open=True)
    _integer(section, "mtt_steps", cfg.mtt_steps, 1)
    _number(section, "bn_weight", cfg.bn_weight, low=0)
    _choice(section, "signal", cfg.signal, SIGNAL_KINDS)
    _choice(section, "covariance", cfg.covariance, COVARIANCE_MODES)
    _integer(section, "batch_classes", cfg.batch_classes, 1, optional=True)
    _integer(section, "workers", cfg.workers, 1)
    _number(section, "cpus_per_worker", cfg.cpus_per_worker, low=0, low_open=True)
    _choice(section, "distribution", cfg.distribution, DISTRIBUTIONS)
    _crop_scale(section, "crop_scale", cfg.crop_scale)
    _integer(section, "max_roll", cfg.max_roll, 0, optional=True)
    _choice(section, "roll", cfg.roll, ROLLS)
    _choice(section, "lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    _integer(section, "seed", cfg.seed, 0)
    _choice(section, "init", cfg.init, INITS)
    if cfg.classes is not None and (not cfg.classes or len(set(cfg.classes)) != len(cfg.classes)
                                    or any(isinstance(k, bool) or not isinstance(k, int) or k < 0
                                           for k in cfg.classes)):
        _fail(section, "classes", "must be a non-empty list of distinct class indices >= 0 (or null: every class)",
              cfg.classes)
    _integer(section, "max_failures", cfg.max_failures, 0)
    try:
        method_filter(cfg)  # the method's own checks of the filter settings it reads (a schedule's beta_min...)
    except ValueError as exc:  # the only setting a filter refuses that is not checked above: beta_min's range
        raise InvalidSetting(section, "beta_min", f"does not suit method {cfg.method!r}: {exc}") from None


def _model_options(section: str, key: str, arch: str, options: dict) -> None:
    try:
        check_model_options(arch, options)
    except ValueError as exc:
        raise InvalidSetting(section, key, f"do not suit {arch!r}: {exc}; set {section}.{key} to its options ({{}} "
                                           "for its defaults)") from None


def check_evaluate(cfg: "EvaluateConfig") -> None:
    _model_name("evaluate", "student", cfg.student)
    _model_options("evaluate", "student_options", cfg.student, cfg.student_options)
    for i, name in enumerate(cfg.students):
        _model_name("evaluate", f"students[{i}]", name)
    if len(set(cfg.students)) != len(cfg.students):  # (evaluate.student among them is evaluated once: see pipeline)
        _fail("evaluate", "students", "must name each architecture once", list(cfg.students))
    _integer("evaluate", "epochs", cfg.epochs, 1)
    _choice("evaluate", "amp", cfg.amp, AMPS)
    _integer("evaluate", "batch_size", cfg.batch_size, 1, optional=True)
    _number("evaluate", "lr", cfg.lr, low=0, low_open=True)
    _number("evaluate", "weight_decay", cfg.weight_decay, low=0)
    _number("evaluate", "temperature", cfg.temperature, low=0, low_open=True)
    _crop_scale("evaluate", "crop_scale", cfg.crop_scale)
    _number("evaluate", "cutmix", cfg.cutmix, low=0)
    _integer("evaluate", "seeds", cfg.seeds, 1)
    _integer("evaluate", "aug_seed", cfg.aug_seed, 0)
    _integer("evaluate", "eval_every", cfg.eval_every, 0)
    _integer("evaluate", "eval_batch_size", cfg.eval_batch_size, 1)
    _integer("evaluate", "workers", cfg.workers, 1)
    _choice("evaluate", "split", cfg.split, ("data", "seeds"))
    _number("evaluate", "cpus_per_worker", cfg.cpus_per_worker, low=0, low_open=True)
    _choice("evaluate", "protocol", cfg.protocol, PROTOCOLS)


def _checked_batch_size_by_ipc(table) -> dict[int, int] | None:
    """``evaluate.batch_size_by_ipc`` with integer IPCs (YAML and ``--set`` may give them as strings) and batch
    sizes >= 1; None or an empty table: none."""
    if table is None or table == {}:
        return None
    example = "e.g. evaluate.batch_size_by_ipc={1: 10, 10: 50, 50: 100}"
    if not isinstance(table, dict):
        raise InvalidSetting("evaluate", "batch_size_by_ipc", f"must map IPCs to batch sizes, got {table!r}; {example}")
    out: dict[int, int] = {}
    for raw, batch in table.items():
        ipc = int(raw) if isinstance(raw, str) and raw.strip().isdigit() else raw
        if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
            raise InvalidSetting("evaluate", "batch_size_by_ipc", f"keys must be IPCs (positive integers), got "
                                                                  f"{raw!r}; {example}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidSetting("evaluate", "batch_size_by_ipc", f"values must be batch sizes (integers >= 1), got "
                                                                  f"{batch!r} for IPC {ipc}; {example}")
        out[ipc] = batch
    return dict(sorted(out.items()))


def check_recipe(recipe: "Recipe") -> None:
    """The recipe-level settings (each section checks its own when it is built)."""
    if not recipe.methods:
        _fail("", "methods", "must name at least one method", recipe.methods)
    for method in recipe.methods:
        if method not in METHODS and method not in BASELINES:
            _fail("", "methods", f"must hold methods among {list(BASELINES) + list(METHODS)}", method)
    if not recipe.ipcs:
        _fail("", "ipcs", "must name at least one IPC", recipe.ipcs)
    for ipc in recipe.ipcs:
        _integer("", "ipcs", ipc, 1)
    _integer("", "parallel_recoveries", recipe.parallel_recoveries, 1, optional=True)
    if recipe.teacher.artifact is not None and recipe.teacher.weights is not None:
        _fail("teacher", "artifact", "replaces the squeeze stage, so teacher.weights (its starting weights) cannot "
                                     "be given with it; drop one of them", recipe.teacher.artifact)
    if recipe.stats.artifact is not None and recipe.teacher.artifact is None:
        _fail("stats", "artifact", "needs the teacher its statistics were computed with: set teacher.artifact to "
                                   "that teacher's directory", recipe.stats.artifact)


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
    if cls is RecoverConfig:
        data = _former_recover_names(data, where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except InvalidSetting as exc:
        section = getattr(cls, "SECTION", None)
        raise (exc.at(where) if where and section and exc.section == section else exc) from None


def _former_recover_names(data: dict, where: str) -> dict:
    """A recover section in the names it had before ``batch_classes`` and ``distribution`` (a run's stored
    ``config.yaml``, an older recipe) in today's: ``classes_per_batch`` is ``batch_classes``, ``sync: round``
    (each worker its own batch) is ``distribution: independent`` and ``sync: step`` (the moments all-reduced
    at every iteration) ``distribution: exact``."""
    former = {"classes_per_batch": "batch_classes", "sync": "distribution"}
    if not any(k in data for k in former):
        return data
    data, prefix = dict(data), f"{where}." if where else ""
    for old, new in former.items():
        if old in data:
            if new in data:
                raise ConfigError(f"{prefix}{old} is the former name of {prefix}{new}; give only {prefix}{new}")
            value = data.pop(old)
            data[new] = {"round": "independent", "step": "exact"}.get(value, value) if old == "sync" else value
    return data


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
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); "
                          "save the recipe as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_one_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
        if path.is_dir():
            raise ConfigError(f"--config {path} is a directory; give a recipe YAML file (e.g. {path}/config.yaml)")
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
