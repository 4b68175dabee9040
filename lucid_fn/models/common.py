"""What the PVT families share: the config fields of every pyramid, the checks run before
any XLA work (builder arguments, images, params), the attention both families' blocks
run, and the builders' registration.

Errors name the argument, what was given and what is allowed, in the user's terms.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn import kernels, nn
from lucid_fn.registry import Model, register_model

NUM_STAGES = 4


@dataclasses.dataclass(frozen=True)
class PyramidConfig:
    """The builder arguments both families take (each family's config adds its own)."""
    img_size: int = 224
    num_classes: int = 1000
    patch_size: int = 4
    in_channels: int = 3
    embed_dims: tuple = (64, 128, 320, 512)
    num_heads: tuple = (1, 2, 5, 8)
    mlp_ratios: tuple = (8.0, 8.0, 4.0, 4.0)
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    depths: tuple = (3, 4, 6, 3)
    sr_ratios: tuple = (8, 4, 2, 1)
    norm_eps: float = 1e-6
    dtype: Any = np.dtype("float32")
    scan_blocks: bool | None = None  # None: auto, see resolve_scan_blocks
    remat: bool = False
    kernels: Any = None  # a lucid_fn.kernels.KernelSettings once resolved

    def mlp_hidden(self, stage: int) -> int:
        return int(self.embed_dims[stage] * self.mlp_ratios[stage])

    @property
    def first_stride(self) -> int:
        """The first patch embedding's stride; each later stage halves the map."""
        return self.patch_size

    @property
    def total_stride(self) -> int:
        return self.first_stride * 8

# Seed (Lucid) constructor arguments we deliberately replace, with what to use instead.
_RENAMED = {
    "norm_layer": "LayerNorm is the only norm; set its epsilon with norm_eps=...",
    "act_layer": "the activation follows the flavor: 'lucid' uses tanh GELU, 'paper' exact GELU",
    "flavor": "PVT v2 has one flavor, timm's: leave flavor out",
}


def check_kwargs(kwargs: dict, allowed: Sequence[str], builder: str) -> None:
    for key in kwargs:
        if key in allowed:
            continue
        if key in _RENAMED:
            hint = _RENAMED[key]
        else:
            close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"{builder}() got an unknown keyword argument {key!r}. {hint} "
            f"Allowed: {', '.join(sorted(allowed))}.".replace("  ", " ")
        )


def per_stage(name: str, value, kind=int) -> tuple:
    """A per-stage list as a tuple of ``NUM_STAGES`` values of ``kind``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        raise ValueError(
            f"{name} must be a list of {NUM_STAGES} values, one per stage; got {value!r}"
        )
    value = list(value)
    if len(value) != NUM_STAGES:
        raise ValueError(
            f"{name} must have {NUM_STAGES} entries, one per stage; got {len(value)}: {value}"
        )
    out = []
    for v in value:
        if kind is int:
            if isinstance(v, bool) or not float(v).is_integer() or v < 1:
                raise ValueError(f"{name} must hold positive whole numbers; got {value}")
            out.append(int(v))
        else:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must hold positive numbers; got {value}")
            out.append(float(v))
    return tuple(out)


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a probability in [0, 1); got {value!r}")
    return float(value)


def choice(name: str, value, allowed: Sequence) -> object:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def compute_dtype(value, name: str = "dtype") -> np.dtype:
    try:
        dt = None if value is None else jnp.dtype(value)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"{name} must be a floating-point dtype such as jnp.float32 or jnp.bfloat16; "
            f"got {value!r}"
        )
    return dt


# Unrolled blocks trained pvt_small 1.6x faster on an H100 (docs/design.md), but their
# compile time grows faster than linearly with depth: on 2 CPU cores the train step of
# pvt_small (16 blocks) compiled in 12 s unrolled vs 7 s scanned, pvt_huge (76 blocks) in
# 486 s vs 7 s (docs/performance.md, "Compile time"). So unroll up to pvt_small's depth,
# scan beyond.
MAX_UNROLLED_BLOCKS = 16


def resolve_scan_blocks(scan_blocks, depths) -> bool:
    if scan_blocks is None:
        return sum(depths) > MAX_UNROLLED_BLOCKS
    return scan_blocks


def normalize_fields(c: dict) -> dict:
    """Check and normalise the builder arguments the PVT families share (those present)."""
    c = dict(c)
    for name in ("img_size", "patch_size", "in_channels"):
        c[name] = positive_int(name, c[name])
    c["num_classes"] = positive_int("num_classes", c["num_classes"], minimum=0)
    for name in ("embed_dims", "num_heads", "depths", "sr_ratios"):
        c[name] = per_stage(name, c[name], int)
    c["mlp_ratios"] = per_stage("mlp_ratios", c["mlp_ratios"], float)
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        c[name] = rate(name, c[name])
    scale = c["qk_scale"]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not 0 < scale < math.inf):
        raise ValueError(f"qk_scale must be a positive finite number or None (None: "
                         f"head_dim ** -0.5); got {scale!r}")
    eps = c["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"norm_eps must be a small positive number; got {eps!r}")
    for name in ("qkv_bias", "remat", "linear"):
        if name in c:
            choice(name, c[name], (True, False))
    choice("scan_blocks", c["scan_blocks"], (None, True, False))
    c["scan_blocks"] = resolve_scan_blocks(c["scan_blocks"], c["depths"])
    c["dtype"] = compute_dtype(c["dtype"])
    c["kernels"] = kernels.resolve(c["kernels"])
    check_heads(c["embed_dims"], c["num_heads"])
    return c


def check_mlp_hidden(cfg) -> None:
    """Every stage's MLP must be at least one unit wide: int(embed_dim * mlp_ratio) >= 1."""
    for i, (dim, ratio) in enumerate(zip(cfg.embed_dims, cfg.mlp_ratios)):
        if cfg.mlp_hidden(i) < 1:
            raise ValueError(
                f"mlp_ratios[{i}]={ratio} gives stage {i + 1}'s MLP int({dim} * {ratio}) = "
                f"{cfg.mlp_hidden(i)} hidden units; use mlp_ratios[{i}] >= {1 / dim:.6g}"
            )


def attention_blocks(blocks, depths, model: str) -> tuple:
    """``apply``'s ``attention`` argument: None (four Nones), or one block index per stage,
    each in ``0 .. depth - 1`` (attention_maps resolves negative indices first)."""
    if blocks is None:
        return (None,) * NUM_STAGES
    values = tuple(blocks) if isinstance(blocks, Sequence) else ()
    if len(values) != NUM_STAGES or not all(
            isinstance(j, (int, np.integer)) and not isinstance(j, bool) and 0 <= j < d
            for j, d in zip(values, depths)):
        raise ValueError(f"{model}: attention must be {NUM_STAGES} block indices, one per "
                         f"stage, each 0 <= index < that stage's depth (depths="
                         f"{list(depths)}); got {blocks!r}")
    return tuple(int(j) for j in values)


def check_img_size(img_size: int, stride: int, how: str) -> None:
    if img_size % stride:
        below = img_size // stride * stride
        candidates = [below - stride, below, below + stride, below + 2 * stride]
        near = sorted(sorted((c for c in candidates if c > 0),
                             key=lambda c: abs(c - img_size))[:3])
        raise ValueError(
            f"img_size={img_size} is not divisible by the total stride {stride} ({how}); "
            f"use a multiple of {stride}, e.g. {', '.join(map(str, near))}"
        )


def check_heads(embed_dims: tuple, num_heads: tuple) -> None:
    for i, (dim, heads) in enumerate(zip(embed_dims, num_heads)):
        if dim % heads:
            divisors = [h for h in range(1, dim + 1) if dim % h == 0 and h <= 64]
            raise ValueError(
                f"embed_dims[{i}]={dim} is not divisible by num_heads[{i}]={heads}; "
                f"heads that divide {dim}: {divisors}"
            )


def check_sr_ratios(sr_ratios, h: int, w: int, first_stride: int) -> None:
    """Each stage's token map must hold at least one spatial-reduction window."""
    for i, r in enumerate(sr_ratios):
        gh, gw = h // (first_stride * 2**i), w // (first_stride * 2**i)
        # Two comparisons, not min(gh, gw): exported with symbolic sides, gh < gw is
        # undecided while r > gh is not.
        if r > gh or r > gw:
            raise ValueError(
                f"sr_ratios[{i}]={r} is larger than stage {i + 1}'s {gh}x{gw} token map for "
                f"{h}x{w} images; use larger images or sr_ratios[{i}] <= {min(gh, gw)}"
            )


def check_reduction(cfg, h: int, w: int) -> None:
    """:func:`check_sr_ratios` for ``h`` x ``w`` images, unless the attention is linear
    (a 7x7 pool that takes any map)."""
    if not getattr(cfg, "linear", False):
        check_sr_ratios(cfg.sr_ratios, h, w, cfg.first_stride)


def check_images(x, *, in_channels: int, stride: int, model: str):
    """Validate a batch of NHWC images (any size whose sides ``stride`` divides)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    shape, dtype = tuple(x.shape), x.dtype
    want = f"(B, H, W, {in_channels})"
    if len(shape) != 4:
        hint = ""
        if len(shape) == 3 and shape[-1] == in_channels:
            hint = " For a single image add a batch axis: x[None]."
        raise ValueError(
            f"{model} expects a batch of NHWC images {want}; got an array of shape {shape}.{hint}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{model} expects floating-point images; got dtype {dtype}. Convert them first, "
            f"e.g. x.astype(jnp.float32) / 255.0 for uint8 pixels."
        )
    if shape[-1] != in_channels:
        if shape[1] == in_channels:
            raise ValueError(
                f"{model} expects NHWC images {want}; got shape {shape}, which looks like "
                f"NCHW (channels first). Transpose it: x.transpose(0, 2, 3, 1)."
            )
        raise ValueError(
            f"{model} was built for in_channels={in_channels}; got images with "
            f"{shape[-1]} channels (shape {shape}). Build with in_channels={shape[-1]}."
        )
    if shape[0] == 0:
        raise ValueError(f"{model} got an empty batch: images of shape {shape}; pass at "
                         f"least one image")
    h, w = shape[1:3]
    if h % stride or w % stride:
        raise ValueError(
            f"{model} needs image sides divisible by its total stride {stride}; got {h}x{w}. "
            f"Resize or pad to e.g. {math.ceil(h / stride) * stride}x"
            f"{math.ceil(w / stride) * stride}."
        )
    return x


def _leaf_name(path) -> str:
    return "params" + "".join(f"[{k.key!r}]" if hasattr(k, "key") else str(k) for k in path)


def _first_missing(params, path) -> str:
    """The shortest prefix of ``path`` that ``params`` lacks, as ``params['a']['b']``."""
    node = params
    for i, k in enumerate(path):
        if not isinstance(node, dict) or k.key not in node:
            return _leaf_name(path[: i + 1])
        node = node[k.key]
    return _leaf_name(path)


def check_params(params, specs, model: str) -> None:
    """``params`` against the model's parameter ``specs`` (any tree whose leaves have a
    ``shape``: ``nn.Init`` specs, or ``jax.eval_shape(init, key)``): the same nested dicts
    and shapes, floating-point leaves. Shapes are static, so under ``jit`` this costs
    nothing at run time. The error names the first leaf that differs and what was
    expected."""
    if not isinstance(params, dict):
        raise TypeError(f"{model} takes its params as the nested dict that init returns; "
                        f"got {type(params).__name__}")
    want = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda v: isinstance(v, nn.Init))[0]
    got = {_leaf_name(p): v for p, v in
           jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda v: v is None)[0]}
    hint = (" Were the params built for another configuration? Build the model with the "
            "arguments they were made for, or import a checkpoint with "
            "lucid_fn.weights.from_state_dict, which resizes and reports.")
    for path, spec in want:
        name, shape = _leaf_name(path), tuple(spec.shape)
        if name not in got:
            raise ValueError(f"{model}: {_first_missing(params, path)} is missing (expected "
                             f"{name} of shape {shape}).{hint}")
        value = got[name]
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(f"{model}: {name} is {type(value).__name__}, not an array "
                            f"(expected shape {shape})")
        if tuple(value.shape) != shape:
            raise ValueError(f"{model}: {name} has shape {tuple(value.shape)}, expected "
                             f"{shape}.{hint}")
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{model}: {name} has dtype {value.dtype}; params are "
                            f"floating-point arrays (init gives float32)")
    extra = sorted(set(got) - {_leaf_name(p) for p, _ in want})
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise ValueError(f"{model}: unexpected {extra[0]}{more}.{hint}")


# ------------------------------------------------------- pieces of every model's apply


def apply_inputs(params, images, *, cfg, specs, name: str, train: bool, rng, attention):
    """What every ``apply`` checks and sets up first, at trace time: the params against
    the model's ``specs``, the images, each stage's reduction windows, the attention
    probes, the stages' keys and drop-path rates. Returns (images in the compute dtype,
    keys, rates, probes)."""
    check_params(params, specs, name)
    images = check_images(images, in_channels=cfg.in_channels, stride=cfg.total_stride,
                          model=name)
    check_reduction(cfg, *images.shape[1:3])
    probes = attention_blocks(attention, cfg.depths, name)
    rngs = stage_rngs(train, rng)
    rates = stage_path_rates(cfg.depths, cfg.drop_path_rate)
    return jnp.asarray(images).astype(cfg.dtype), rngs, rates, probes


def head_specs(cfg) -> dict:
    """The classifier's specs, none for a headless model (``num_classes=0``)."""
    return {"head": nn.init_linear(cfg.embed_dims[3], cfg.num_classes)} if cfg.num_classes else {}


def _kernels_of(cfg):
    return getattr(cfg, "backbone_config", cfg).kernels


def _with_kernels(cfg, settings):
    """``cfg`` (or a dense model's backbone config inside it) with other kernel settings."""
    if hasattr(cfg, "backbone_config"):
        return dataclasses.replace(
            cfg, backbone_config=_with_kernels(cfg.backbone_config, settings))
    return dataclasses.replace(cfg, kernels=settings)


def apply_where_it_runs(make_apply, cfg, *args):
    """``make_apply(cfg, *args)``, except that each trace first turns off the kernel
    families that cannot run here (kernels/backend.py: no Pallas Triton backend, or on a
    GPU a family that fails to lower), with one warning. Decided when ``apply`` is traced,
    not when the model is built: asking JAX for its backend starts it, and
    ``jax.distributed.initialize`` must come before that."""
    asked = _kernels_of(cfg)
    applies = {asked: make_apply(cfg, *args)}  # by the settings that run

    @functools.wraps(applies[asked])
    def apply(*a, **kw):
        here = kernels.usable(asked)
        if here not in applies:
            applies[here] = make_apply(_with_kernels(cfg, here), *args)
        return applies[here](*a, **kw)

    return apply


def make_init(specs):
    """``init(key) -> params`` drawing ``specs`` (nn.Init leaves).

    Jitted so that a plain eager call is one compiled program, not hundreds of ops; it
    still composes with jit, vmap and eval_shape like any function.
    """

    @jax.jit
    def init(key) -> dict:
        return nn.materialize(specs, key)

    return init


def stage_path_rates(depths: tuple, drop_path_rate: float) -> list[np.ndarray]:
    """Stochastic-depth rates rising linearly from 0 over all blocks in order (as the seed
    and timm do), split per stage."""
    rates = np.linspace(0.0, drop_path_rate, sum(depths))
    return np.split(rates, np.cumsum(depths)[:-1])


def stage_rngs(train: bool, rng) -> list:
    """One key per stage in training, Nones at inference."""
    if not train:
        return [None] * NUM_STAGES
    if rng is None:
        raise ValueError(
            "apply(..., train=True) needs a PRNG key for dropout and drop-path: pass "
            "rng=jax.random.key(seed), or train=False for deterministic inference"
        )
    return list(jax.random.split(rng, NUM_STAGES))


# --------------------------------------------------- spatial-reduction attention


def attention(p, x, rngs, *, cfg, stage: int, hw):
    """Stage ``stage``'s spatial-reduction attention over the ``hw`` token map (nn.sra)."""
    return nn.sra(p, x, rngs, hw=hw, heads=cfg.num_heads[stage], scale=cfg.qk_scale,
                  dtype=cfg.dtype, attn_drop=cfg.attn_drop_rate, drop=cfg.drop_rate,
                  linear=getattr(cfg, "linear", False), kernels=cfg.kernels)


def attention_probs(p, x, *, cfg, stage: int, hw):
    """A block's attention probabilities over the stream entering it (attention maps)."""
    return nn.sra_probs(p["attn"], nn.layer_norm(p["norm1"], x, cfg.norm_eps), hw=hw,
                        heads=cfg.num_heads[stage], scale=cfg.qk_scale, dtype=cfg.dtype,
                        linear=getattr(cfg, "linear", False))


def run_stage_blocks(block, p, x, rng, path_rates, *, cfg, stage: int, hw, probe):
    """A stage's blocks over the stream ``x``: (stream, block ``probe``'s attention
    probabilities or None)."""
    kw = dict(cfg=cfg, stage=stage, hw=hw)
    probe = None if probe is None else (probe, functools.partial(attention_probs, **kw))
    out = nn.run_blocks(functools.partial(block, **kw), p["blocks"], x, rng, path_rates,
                        scan=cfg.scan_blocks, remat=cfg.remat, probe=probe)
    return out if probe else (out, None)


# ------------------------------------------------------------------------- builders


def register_builders(table: dict, *, make_config, param_specs, make_apply,
                      in_channels: bool = False) -> None:
    """Register a builder for each ``name: (defaults, doc)`` of ``table``, with the seed's
    signature ``name(img_size=224, num_classes=1000, **kwargs)`` (``in_channels=3`` third
    with ``in_channels``, as the seed's PVT v2): config, parameter specs, ``(init, apply)``.
    ``pretrained=True`` (or a weights file or folder) builds the published weights' model,
    whose ``init`` returns them (lucid_fn.pretrained)."""
    for name, (defaults, doc) in table.items():
        register_model(_builder(name, defaults, doc, in_channels,
                                (make_config, param_specs, make_apply)))


def _builder(name: str, defaults: dict, doc: str, in_channels: bool, family: tuple):
    make_config, param_specs, make_apply = family

    def build(pretrained=None, **kwargs) -> Model:
        if pretrained is not None and pretrained is not False:
            from lucid_fn.pretrained import pretrained_model  # the table imports the registry

            return pretrained_model(name, pretrained, **kwargs)
        cfg = make_config(name, **{**defaults, **kwargs})
        specs = param_specs(cfg)
        return Model(make_init(specs), apply_where_it_runs(make_apply, cfg, name, specs),
                     name=name, config=cfg)

    if in_channels:
        def fn(img_size: int = 224, num_classes: int = 1000, in_channels: int = 3,
               **kwargs) -> Model:
            return build(img_size=img_size, num_classes=num_classes, in_channels=in_channels,
                         **kwargs)
    else:
        def fn(img_size: int = 224, num_classes: int = 1000, **kwargs) -> Model:
            return build(img_size=img_size, num_classes=num_classes, **kwargs)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.__module__ = make_config.__module__
    return fn
