"""What the fused kernels may do, as values: one frozen dataclass per kernel family and
:class:`KernelSettings` holding them all.

A model takes its settings when it is built (``registry[name](kernels=...)``) and keeps
them in its config, so they are part of what ``apply`` closes over: a different setting
is a different model, traced anew. Nothing is read from module globals, and nothing a
function already jitted could ignore.

The defaults are the tiles measured fastest on an H200 and H100 (benchmarks/NOTES.md).
Each family can be switched off alone (``enabled=False``), which leaves its XLA form,
the same function up to rounding.
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["AttentionSettings", "ConvMlpSettings", "KernelSettings", "MlpSettings",
           "NormSettings", "resolve"]


def _tile(default: int):
    """A setting that must be a power of two, as the kernels' tiles are."""
    return dataclasses.field(default=default, metadata={"pow2": True})


class _Checked:
    """Each field a bool, or an int >= 1 (a power of two where the field is a
    :func:`_tile`); checked as the settings are made."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            where = f"{type(self).__name__}.{f.name}"
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise TypeError(f"{where} must be True or False; got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where} must be an integer >= 1; got {value!r}")
            if f.metadata.get("pow2") and value & (value - 1):
                raise ValueError(f"{where} must be a power of two (the kernels' tiles are); "
                                 f"got {value}")


@dataclasses.dataclass(frozen=True)
class MlpSettings(_Checked):
    """PVT v1's MLP, ``fc2(GELU(fc1(x)))`` in one kernel (kernels/mlp.py): rows per
    program, hidden units per chunk, warps."""
    enabled: bool = True
    block_m: int = _tile(128)
    block_h: int = _tile(128)
    num_warps: int = _tile(8)


@dataclasses.dataclass(frozen=True)
class ConvMlpSettings(_Checked):
    """PVT v2's MLP: fc1's bias, the depthwise 3x3 conv and GELU in one kernel between
    fc1 and fc2, and its backward (kernels/conv_mlp.py, conv_mlp_grad.py).

    A forward program takes ``block_x`` columns (at most; fewer where ``exact_min``
    columns or more cover the width with less overlap) and ``block_h`` channels (more on
    narrow maps, up to ``max_h``, ``max_h_narrow`` for strips under 8 columns), with row
    bands splitting the map until there are ``min_programs`` programs. The backward's
    tiles hold about ``grad_size`` elements a row."""
    enabled: bool = True
    block_x: int = _tile(32)
    block_h: int = _tile(64)
    num_warps: int = _tile(4)
    min_programs: int = 1024
    exact_min: int = _tile(4)
    max_h: int = _tile(256)
    max_h_narrow: int = _tile(128)
    grad_size: int = _tile(512)
    grad_warps: int = _tile(4)


@dataclasses.dataclass(frozen=True)
class AttentionSettings(_Checked):
    """The attention core softmax(q k^T * scale) v (kernels/attention.py): query rows per
    program and warps; its backward: query rows a step, warps, and the least number of
    programs (a program walks several steps down one head's queries)."""
    enabled: bool = True
    block_q: int = _tile(128)
    num_warps: int = _tile(4)
    grad_block_q: int = _tile(64)
    grad_num_warps: int = _tile(4)
    grad_min_programs: int = 1024


@dataclasses.dataclass(frozen=True)
class NormSettings(_Checked):
    """The residual add + LayerNorm family (kernels/layer_norm.py): about ``elements``
    elements per program (whole rows, a power of two of them, at least ``min_rows``),
    warps."""
    enabled: bool = True
    elements: int = _tile(4096)
    num_warps: int = _tile(4)
    min_rows: int = _tile(8)


_FAMILIES = {"mlp": MlpSettings, "conv_mlp": ConvMlpSettings, "attention": AttentionSettings,
             "norm": NormSettings}


_FLAGS = ("interpret", "portable")  # KernelSettings' own switches, beside the families


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """All kernel families' settings. ``interpret``: run the Pallas kernels in interpret
    mode on any backend instead of their XLA forms off CUDA (slow; for tests that check a
    whole model through the kernels on a CPU). ``portable``: one program for every
    platform, every family off and no XLA formulation chosen by platform either (the
    spatial reduction as the CPU computes it, GELU's erf as one primitive): what
    ``lucid_fn.export`` traces for ONNX, because an ONNX graph cannot switch on the
    platform it runs on and converters map ``lax.erf`` to their own op (spec
    ``"portable"``)."""
    mlp: MlpSettings = MlpSettings()
    conv_mlp: ConvMlpSettings = ConvMlpSettings()
    attention: AttentionSettings = AttentionSettings()
    norm: NormSettings = NormSettings()
    interpret: bool = False
    portable: bool = False

    def __post_init__(self):
        for name, kind in _FAMILIES.items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"KernelSettings.{name} must be a {kind.__name__}; "
                                f"got {getattr(self, name)!r}")
        for flag in ("interpret", "portable"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"KernelSettings.{flag} must be True or False; "
                                f"got {getattr(self, flag)!r}")
        on = [name for name in _FAMILIES if getattr(self, name).enabled]
        if self.portable and on:
            raise ValueError(f"KernelSettings(portable=True) runs no kernel, but {', '.join(on)} "
                             f"{'is' if len(on) == 1 else 'are'} enabled; use the spec "
                             f"'portable' (every family off)")

    @classmethod
    def off(cls) -> "KernelSettings":
        """Every family off: XLA ops only."""
        return cls(**{name: kind(enabled=False) for name, kind in _FAMILIES.items()})

    def replace(self, **changes) -> "KernelSettings":
        """A copy with ``family.field`` changes, e.g. ``replace(**{"attention.block_q": 64,
        "mlp.enabled": False})``, or whole families (``replace(norm=NormSettings())``)."""
        families = {name: {} for name in _FAMILIES}
        top = {}
        for key, value in changes.items():
            family, _, field = key.partition(".")
            if family not in _FAMILIES and key not in _FLAGS:
                raise ValueError(f"unknown kernel family {family!r} in {key!r}; families: "
                                 f"{', '.join(_FAMILIES)} (and 'interpret', 'portable')")
            if not field:
                top[key] = value
                continue
            names = [f.name for f in dataclasses.fields(_FAMILIES[family])]
            if field not in names:
                raise ValueError(f"{_FAMILIES[family].__name__} has no setting {field!r}; "
                                 f"its settings: {', '.join(names)}")
            families[family][field] = value
        # one replace, so that the checks see the flags and the families together
        return dataclasses.replace(self, **{
            name: dataclasses.replace(top.pop(name, getattr(self, name)), **fields)
            for name, fields in families.items()}, **top)

    def __str__(self) -> str:
        """The changes from the defaults as ``family.field=value`` items, which
        :func:`resolve` reads back ("default" if none)."""
        default = KernelSettings()
        items = [f"{flag}=1" for flag in _FLAGS if getattr(self, flag)]
        for name in _FAMILIES:
            mine, base = getattr(self, name), getattr(default, name)
            for f in dataclasses.fields(mine):
                value = getattr(mine, f.name)
                if value != getattr(base, f.name):
                    items.append(f"{name}.{f.name}={int(value) if isinstance(value, bool) else value}")
        return ",".join(items) or "default"


def parse(spec: str) -> KernelSettings:
    """``"attention.block_q=64,mlp.enabled=0"`` (``family=off`` for ``family.enabled=0``),
    ``"default"``/``"on"``, ``"off"``, or ``"portable"`` (off, and no per-platform choice)."""
    spec = spec.strip()
    if spec in ("", "default", "on"):
        return KernelSettings()
    if spec == "off":
        return KernelSettings.off()
    if spec == "portable":
        return dataclasses.replace(KernelSettings.off(), portable=True)
    changes = {}
    for item in spec.split(","):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise ValueError(f"kernel setting {item!r} in {spec!r} is not key=value; e.g. "
                             f"'attention.block_q=64' or 'mlp=off'")
        if key in _FAMILIES and value in ("off", "on"):
            key, value = f"{key}.enabled", value == "on"
        elif key.endswith(".enabled") or key in _FLAGS:
            if value not in ("0", "1", "true", "false"):
                raise ValueError(f"{key} must be 0 or 1; got {value!r}")
            value = value in ("1", "true")
        else:
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"kernel setting {key} must be an integer; got "
                                 f"{value!r}") from None
        changes[key] = value
    return KernelSettings().replace(**changes)


def resolve(kernels) -> KernelSettings:
    """A builder's ``kernels`` argument as settings: None (the defaults, or every kernel
    off when ``LUCID_FN_FUSED=off`` is in the environment as the model is built), "on",
    "off", a :func:`parse` spec string, or a :class:`KernelSettings`. (What cannot run
    where the model is traced is turned off then: :func:`backend.usable`.)"""
    if kernels is None:
        off = os.environ.get("LUCID_FN_FUSED", "on").lower() in ("off", "0", "false")
        return KernelSettings.off() if off else KernelSettings()
    if isinstance(kernels, KernelSettings):
        return kernels
    if isinstance(kernels, str):
        return parse(kernels)
    raise ValueError(f"kernels must be None, 'on', 'off', a spec such as "
                     f"'attention.block_q=64', or a lucid_fn.kernels.KernelSettings; "
                     f"got {kernels!r}")
