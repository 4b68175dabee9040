"""Training runs as data: TOML files under ``configs/`` loaded into typed dataclasses.

Every key is checked against the dataclass it lands in: an unknown key or a value of the
wrong type is a ``ConfigError`` (a ``ValueError``) that names the key, the value and what
is allowed. ``--set section.key=value`` overrides take TOML literals (``3e-4``,
``[32, 64]``, ``true``, ``"pvt_v2_b0"``); a bare word is read as a string.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import pathlib
import types
import typing
from typing import Any

import tomllib


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class ModelConfig:
    name: str = "pvt_tiny"
    # Builder keywords; num_classes, in_channels and img_size default to the data's.
    # The default is a narrow pvt_tiny for the 32x32 digits (configs/digits.toml).
    kwargs: dict = dataclasses.field(default_factory=lambda: {
        "embed_dims": [32, 64, 96, 128], "num_heads": [1, 2, 3, 4]})
    # Fine-tuning: a .safetensors written by lucid_fn, or any checkpoint lucid_fn.weights
    # reads (.pth/.bin through torch); "" starts from random init.
    init_from: str = ""
    # "keep": the checkpoint's head must fit; "reset": a fresh head for num_classes.
    head: str = "keep"


@dataclasses.dataclass
class DataConfig:
    # "digits" (embedded), "cifar10", "cifar100", "folder", "npz"; segmentation:
    # "digit_scenes" (embedded), "seg_folder", "npz" with masks (docs/segmentation.md).
    name: str = "digits"
    path: str = ""
    img_size: int = 32
    # 0 keeps the data's channels; 1 or 3 converts (grayscale <-> RGB).
    channels: int = 0
    # Fraction held out as the test split when the data has none (digits, folder, npz).
    test_fraction: float = 0.2
    split_seed: int = 0
    # Per-channel normalisation; empty: 0.5 / 0.5 per channel.
    mean: list = dataclasses.field(default_factory=list)
    std: list = dataclasses.field(default_factory=list)
    # Parallel decoding/augmentation processes for grain (0: in the main process).
    workers: int = 0
    # Segmentation masks whose 0 means "unlabelled" (ADE20K): 0 ignored, 1..K -> 0..K-1.
    reduce_zero_label: bool = False
    # Segmentation's test split: "square" (longer side img_size, padded square, metrics at
    # that size) or "mmseg" (the PVT papers' code: whole images with the shorter side
    # img_size, metrics at each image's own size; one compile per resized shape).
    eval_protocol: str = "square"


@dataclasses.dataclass
class AugmentConfig:
    # Random-resized-crop area range (Inception style); [] turns it off.
    crop_scale: list = dataclasses.field(default_factory=list)
    # Zero-pad by this many pixels and crop back at a random place (CIFAR style).
    pad_crop: int = 0
    hflip: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Probability that a batch is mixed at all when mixup or cutmix is on.
    mix_prob: float = 1.0
    label_smoothing: float = 0.0
    # Segmentation: each image rescaled by a ratio drawn from [min, max] before the random
    # crop ([] keeps its scale); hflip flips image and mask together.
    scale_range: list = dataclasses.field(default_factory=list)
    # Segmentation: a crop in which one class covers this fraction of the labelled pixels
    # or more is redrawn, up to 10 times (mmseg's RandomCrop; 1 turns it off).
    cat_max_ratio: float = 1.0
    # Segmentation: mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue).
    photometric: bool = False


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3
    # "cosine", or "poly": lr * (1 - step / steps) ** poly_power (segmentation's), each
    # after the warmup and ending at lr * final_lr_ratio.
    schedule: str = "cosine"
    poly_power: float = 0.9
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    warmup_steps: int = 0
    # The cosine decays to lr * final_lr_ratio at the last step.
    final_lr_ratio: float = 0.0
    clip_norm: float = 0.0  # 0: no clipping
    ema_decay: float = 0.0  # 0: no EMA; evaluation and export use the EMA when on
    # Micro-batches per step: the batch is split and gradients summed in one jitted step.
    accum_steps: int = 1


@dataclasses.dataclass
class TrainConfig:
    steps: int = 800
    batch_size: int = 64
    seed: int = 0
    # "float32" or "bfloat16": the model's compute dtype (parameters stay float32).
    dtype: str = "float32"
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batch_size: int = 256
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    # "replicated", or "fsdp": parameters and optimizer state sharded over the data axis.
    param_sharding: str = "replicated"
    workdir: str = "runs/digits"


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.name": ("digits", "cifar10", "cifar100", "folder", "npz", "digit_scenes",
                  "seg_folder"),
    "optim.schedule": ("cosine", "poly"),
    "data.eval_protocol": ("square", "mmseg"),
    "data.channels": (0, 1, 3),
    "model.head": ("keep", "reset"),
    "train.dtype": ("float32", "bfloat16"),
    "train.param_sharding": ("replicated", "fsdp"),
}


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: finite, between ``lo`` and ``hi`` (None:
    unbounded), each end closed unless marked open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        lo, hi = _number(self.lo), _number(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "finite"


def _number(x) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x}"


AT_LEAST_1, AT_LEAST_0 = Range(1), Range(0)
PROBABILITY, BELOW_1 = Range(0, 1), Range(0, 1, hi_open=True)
STEP_COUNT = Range(1, 2**31 - 1)  # the step counter is an int32 on the device

# Every numeric setting and its valid values, checked before anything runs (a test checks
# that no numeric field is missing). Cross-field rules are in ``validate``.
RANGES = {
    "data.img_size": Range(1, 16384),  # one 16384^2 RGB image is 800 MB of uint8
    "data.test_fraction": Range(0, 1, lo_open=True, hi_open=True),
    "augment.cat_max_ratio": Range(0, 1, lo_open=True),
    "data.split_seed": AT_LEAST_0,  # numpy seeds are non-negative
    "data.workers": AT_LEAST_0,
    "augment.pad_crop": AT_LEAST_0,
    "augment.mixup_alpha": AT_LEAST_0,  # Beta(alpha, alpha); 0: off
    "augment.cutmix_alpha": AT_LEAST_0,
    "augment.mix_prob": PROBABILITY,
    "augment.label_smoothing": BELOW_1,
    "optim.lr": Range(0, lo_open=True),
    "optim.poly_power": Range(0, lo_open=True),  # a negative lr would ascend the loss
    "optim.weight_decay": AT_LEAST_0,
    "optim.b1": BELOW_1,
    "optim.b2": BELOW_1,
    "optim.warmup_steps": Range(0, 2**31 - 1),
    "optim.final_lr_ratio": PROBABILITY,  # the cosine ends at lr * this
    "optim.clip_norm": AT_LEAST_0,  # 0: off
    "optim.ema_decay": BELOW_1,  # 0: off
    "optim.accum_steps": AT_LEAST_1,
    "train.steps": STEP_COUNT,
    "train.batch_size": AT_LEAST_1,
    "train.seed": AT_LEAST_0,
    "train.log_every": STEP_COUNT,
    "train.eval_every": Range(0, 2**31 - 1),  # 0: at the end only
    "train.eval_batch_size": AT_LEAST_1,
    "train.checkpoint_every": STEP_COUNT,
    "train.keep_checkpoints": AT_LEAST_1,
}
# List settings whose entries are numbers, with the entries' valid values.
LIST_RANGES = {
    "augment.crop_scale": Range(0, 1, lo_open=True),
    "augment.scale_range": Range(0, 16, lo_open=True),
    "data.mean": Range(),
    "data.std": Range(0, lo_open=True),  # divided by
}


# ------------------------------------------------------------------------ building


def from_dict(d: dict, cls=Config, where: str = "") -> Any:
    """A dataclass from nested dicts, checking every key and type."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in d.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} "
                              f"(allowed in [{where or 'top'}]: {', '.join(fields)})")
        out[key] = _coerce(value, hints[key], path)
    cfg = cls(**out)
    if cls is Config:
        validate(cfg)
    return cfg


def _coerce(value, hint, path):
    if dataclasses.is_dataclass(hint):
        return from_dict(value, hint, path)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a table (e.g. {path} = {{...}}), got {value!r}")
        return dict(value)
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if bool not in allowed and isinstance(value, bool):
        raise ConfigError(f"{path} must be {_name(hint)}, got the boolean {value!r}")
    if not isinstance(value, allowed):
        raise ConfigError(f"{path} must be {_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _name(hint) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list"}.get(hint, str(hint))


def _get(cfg: Config, path: str):
    section, key = path.split(".")
    return getattr(getattr(cfg, section), key)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "augment": AugmentConfig,
            "optim": OptimConfig, "train": TrainConfig}


def validate_section(obj, section: str) -> None:
    """The choices and ranges of one section's settings (a ``DataConfig`` alone is
    checked too: ``lucid-fn eval --data`` builds one)."""
    for key in (f.name for f in dataclasses.fields(obj)):
        path, value = f"{section}.{key}", getattr(obj, key)
        if path in CHOICES and value not in CHOICES[path]:
            raise ConfigError(f"{path} must be one of {list(CHOICES[path])}, got {value!r}")
        if path in RANGES and value not in RANGES[path]:
            raise ConfigError(f"{path} must be {RANGES[path]}, got {value!r}")
        if path in LIST_RANGES:
            for v in value:
                if isinstance(v, bool) or not isinstance(v, (int, float)) \
                        or v not in LIST_RANGES[path]:
                    rule = f"numbers {LIST_RANGES[path]}".replace(" finite", "")
                    raise ConfigError(f"{path} must hold {rule}, got {value!r}")
    if section == "data" and obj.name in ("cifar10", "cifar100", "folder", "npz",
                                          "seg_folder") and not obj.path:
        raise ConfigError(f"data.name={obj.name!r} needs data.path (the folder or file); "
                          f"e.g. --data {obj.name}:/path/to/data")


def validate(cfg: Config) -> None:
    for section in SECTIONS:
        validate_section(getattr(cfg, section), section)
    if not cfg.train.workdir.strip():
        raise ConfigError("train.workdir is empty; name a folder, e.g. --workdir runs/my_run")
    if cfg.train.batch_size % cfg.optim.accum_steps:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                          f"optim.accum_steps={cfg.optim.accum_steps}")
    if cfg.augment.crop_scale and (len(cfg.augment.crop_scale) != 2
                                   or not cfg.augment.crop_scale[0] <= cfg.augment.crop_scale[1]):
        raise ConfigError(f"augment.crop_scale must be [min, max] with 0 < min <= max <= 1, "
                          f"got {cfg.augment.crop_scale}")
    if cfg.augment.scale_range and (len(cfg.augment.scale_range) != 2 or not
                                    cfg.augment.scale_range[0] <= cfg.augment.scale_range[1]):
        raise ConfigError(f"augment.scale_range must be [min, max] with 0 < min <= max, "
                          f"got {cfg.augment.scale_range}")
    if cfg.augment.pad_crop > cfg.data.img_size:
        raise ConfigError(f"augment.pad_crop={cfg.augment.pad_crop} is larger than the "
                          f"image (data.img_size={cfg.data.img_size}); pad by a few pixels")
    if cfg.optim.warmup_steps >= cfg.train.steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be less than "
                          f"train.steps={cfg.train.steps}")
    if cfg.data.mean and cfg.data.std and len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError(f"data.mean and data.std must have one value per channel, got "
                          f"{cfg.data.mean} and {cfg.data.std}")
    check_model(cfg)


# Builder keywords the loop sets itself from other settings.
SET_BY_THE_LOOP = {"dtype": "train.dtype"}


def check_model(cfg: Config) -> None:
    """The model name and builder keywords, by building the model's specs (milliseconds,
    no arrays): a bad keyword is named before the data is read or anything compiles."""
    from lucid_fn.registry import registry

    try:
        builder = registry[cfg.model.name]
    except KeyError as e:
        raise ConfigError(f"model.name: {e.args[0]}") from None
    kw = dict(cfg.model.kwargs)
    for key, instead in SET_BY_THE_LOOP.items():
        if key in kw:
            raise ConfigError(f"model.kwargs.{key} is set by {instead}; remove it from "
                              f"model.kwargs and set {instead} instead")
    kw.setdefault("img_size", cfg.data.img_size)
    if cfg.data.channels:
        kw.setdefault("in_channels", cfg.data.channels)
    try:
        builder(**kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.kwargs: {e}") from None


# ------------------------------------------------------------------------ loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003)."""
    if "=" not in item:
        raise ConfigError(f"--set takes section.key=value (e.g. optim.lr=3e-4), got {item!r}")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set key must be section.key (e.g. optim.lr), got {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return parts, value


def apply_overrides(d: dict, overrides) -> dict:
    """Each ``a.b.c=v`` sets key ``c`` of table ``a.b`` and nothing else (tables on the way
    are created when missing)."""
    for item in overrides or ():
        parts, value = parse_override(item)
        node = d
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[:i + 1])} is not a table "
                                  f"(it is {node!r}); set it as a whole")
        node[parts[-1]] = value
    return d


# The default run (`lucid-fn train` with no config; configs/digits.toml, a test checks):
# the dataclass defaults plus these. Small shifts are the augmentation that suits digits;
# the dataclasses keep augmentation off for configs that do not ask for it.
DEFAULT_RUN = {"augment": {"pad_crop": 2}}


def overlay(base: dict, tables: dict) -> dict:
    """``base`` (a complete config as nested dicts) with every ``section.key`` that
    ``tables`` sets replaced by its value, whole (a table value such as ``model.kwargs``
    replaces the default table: a file states a key's full value)."""
    out = copy.deepcopy(base)
    for section, table in tables.items():
        if isinstance(table, dict) and isinstance(out.get(section), dict):
            out[section].update(copy.deepcopy(table))
        else:
            out[section] = copy.deepcopy(table)  # from_dict names what is wrong with it
    return out


def load_config(path=None, overrides=()) -> Config:
    """A ``Config`` from a TOML file (or the default run when ``path`` is None) and
    overrides. Both start from the complete default config, so ``--set a.b.c=v`` changes
    that one key whether or not the file mentions ``a.b``."""
    tables = DEFAULT_RUN
    if path is not None:
        path = pathlib.Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder; give a .toml file "
                              f"(e.g. configs/digits.toml)")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            tables = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return from_dict(apply_overrides(overlay(Config().to_dict(), tables), overrides))


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, so a run can be repeated from its workdir."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(v) -> str:
    """``v`` as a TOML literal (the resolved config; the CLI's --set overrides)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise ConfigError(f"cannot write {v!r} to TOML")
