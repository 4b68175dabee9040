"""Training runs as data: TOML files under ``configs/`` loaded into typed dataclasses.

Every key is checked against the dataclass it lands in: an unknown key or a value of the
wrong type is a ``ConfigError`` (a ``ValueError``) that names the key, the value and what
is allowed. ``--set section.key=value`` overrides take TOML literals (``3e-4``,
``[32, 64]``, ``true``, ``"pvt_v2_b0"``); a bare word is read as a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import sys
import types
import typing
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
    # "digits" (embedded), "cifar10", "cifar100", "folder", "npz".
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


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3
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
    "data.name": ("digits", "cifar10", "cifar100", "folder", "npz"),
    "data.channels": (0, 1, 3),
    "model.head": ("keep", "reset"),
    "train.dtype": ("float32", "bfloat16"),
    "train.param_sharding": ("replicated", "fsdp"),
}
POSITIVE = ("train.steps", "train.batch_size", "train.log_every", "train.eval_batch_size",
            "train.keep_checkpoints", "data.img_size", "optim.accum_steps")


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


def validate(cfg: Config) -> None:
    for path, allowed in CHOICES.items():
        if _get(cfg, path) not in allowed:
            raise ConfigError(f"{path} must be one of {list(allowed)}, got {_get(cfg, path)!r}")
    for path in POSITIVE:
        if _get(cfg, path) < 1:
            raise ConfigError(f"{path} must be at least 1, got {_get(cfg, path)}")
    if cfg.data.name in ("cifar10", "cifar100", "folder", "npz") and not cfg.data.path:
        raise ConfigError(f"data.name={cfg.data.name!r} needs data.path (the folder or file); "
                          f"e.g. --data {cfg.data.name}:/path/to/data")
    if cfg.train.batch_size % cfg.optim.accum_steps:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                          f"optim.accum_steps={cfg.optim.accum_steps}")
    if cfg.augment.crop_scale and (len(cfg.augment.crop_scale) != 2
                                   or not 0 < cfg.augment.crop_scale[0]
                                   <= cfg.augment.crop_scale[1] <= 1):
        raise ConfigError(f"augment.crop_scale must be [min, max] with 0 < min <= max <= 1, "
                          f"got {cfg.augment.crop_scale}")
    if not 0 <= cfg.augment.label_smoothing < 1:
        raise ConfigError(f"augment.label_smoothing must be in [0, 1), got "
                          f"{cfg.augment.label_smoothing}")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}")
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {cfg.data.test_fraction}")
    if cfg.optim.warmup_steps >= cfg.train.steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be less than "
                          f"train.steps={cfg.train.steps}")
    if cfg.data.mean and cfg.data.std and len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError(f"data.mean and data.std must have one value per channel, got "
                          f"{cfg.data.mean} and {cfg.data.std}")


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
    for item in overrides or ():
        parts, value = parse_override(item)
        node = d
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[:-1])} is not a table")
        node[parts[-1]] = value
    return d


# The default run (`lucid-fn train` with no config; configs/digits.toml, a test checks):
# the dataclass defaults plus these. Small shifts are the augmentation that suits digits;
# the dataclasses keep augmentation off for configs that do not ask for it.
DEFAULT_RUN = {"augment": {"pad_crop": 2}}


def load_config(path=None, overrides=()) -> Config:
    """A ``Config`` from a TOML file (or the default run when ``path`` is None) and
    overrides."""
    d = {k: dict(v) for k, v in DEFAULT_RUN.items()}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            d = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return from_dict(apply_overrides(d, overrides))


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
