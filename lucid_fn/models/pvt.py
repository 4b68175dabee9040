"""Pyramid Vision Transformer (PVT v1), Wang et al. 2021, as pure ``(init, apply)`` functions.

Reads top to bottom like the paper: config, spatial-reduction attention, MLP, block,
stage, model, builders.

Two flavors of the same network (see README, "Lucid vs the paper"):

- ``"lucid"`` (default): the seed system, Lucid's ``PVT``: no attention output
  projection (Lucid's ``proj`` is a Dropout), tanh-approximate GELU.
- ``"paper"``: the PVT paper / official code / HF transformers: an output projection
  ``Linear(C, C)`` after attention, exact-erf GELU.

Parameters (float32, nested dicts; per-block weights stacked on a leading depth axis)::

    stage{1..4}: patch_embed {proj {kernel (p, p, in, C), bias}, norm {scale, bias}}
                 pos_embed (1, N_i, C_i)        stage 4 adds cls_token (1, 1, C_4)
                 blocks {norm1, attn {q, kv, [sr, norm], [proj]}, norm2, mlp {fc1, fc2}}
    norm {scale, bias}
    head {kernel (C_4, num_classes), bias}      absent when num_classes == 0
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn import nn
from lucid_fn.models import common
from lucid_fn.registry import Model, register_model

# LayerNorm epsilons the seed hard-codes: nn.LayerNorm's default in the patch embedding and
# the spatial reduction; the builders' ``partial(LayerNorm, eps=1e-6)`` elsewhere.
PATCH_NORM_EPS = 1e-5
SR_NORM_EPS = 1e-5
FLAVORS = ("lucid", "paper")


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PVTConfig:
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
    flavor: str = "lucid"
    dtype: Any = np.dtype("float32")
    scan_blocks: bool | None = None  # None: auto, see resolve_scan_blocks
    remat: bool = False

    @property
    def patch_sizes(self) -> tuple:
        return (self.patch_size, 2, 2, 2)

    @property
    def total_stride(self) -> int:
        return self.patch_size * 8

    def grid(self, stage: int) -> int:
        """Side of stage ``stage``'s (0-based) token map for img_size inputs."""
        return self.img_size // (self.patch_size * 2**stage)

    @property
    def drop_path_rates(self) -> np.ndarray:
        """Stochastic-depth rate of every block, rising linearly over all blocks (seed)."""
        return np.linspace(0.0, self.drop_path_rate, sum(self.depths))

    def mlp_hidden(self, stage: int) -> int:
        return int(self.embed_dims[stage] * self.mlp_ratios[stage])


ARGUMENTS = tuple(f.name for f in dataclasses.fields(PVTConfig))

# Unrolled blocks trained pvt_small 1.6x faster on an H100 (DESIGN.md), but their compile
# time grows faster than linearly with depth: on 2 CPU cores the train step of pvt_small
# (16 blocks) compiled in 12 s unrolled vs 7 s scanned, pvt_huge (76 blocks) in 486 s vs
# 7 s (benchmarks/results/compile_time.md). So unroll up to pvt_small's depth, scan beyond.
MAX_UNROLLED_BLOCKS = 16


def resolve_scan_blocks(scan_blocks, depths) -> bool:
    if scan_blocks is None:
        return sum(depths) > MAX_UNROLLED_BLOCKS
    return scan_blocks


def make_config(builder: str, **kwargs) -> PVTConfig:
    """Validate builder arguments into a config; every error names the argument."""
    common.check_kwargs(kwargs, ARGUMENTS, builder)
    c = {**dataclasses.asdict(PVTConfig()), **kwargs}
    c["img_size"] = common.positive_int("img_size", c["img_size"])
    c["num_classes"] = common.positive_int("num_classes", c["num_classes"], minimum=0)
    c["patch_size"] = common.positive_int("patch_size", c["patch_size"])
    c["in_channels"] = common.positive_int("in_channels", c["in_channels"])
    for name in ("embed_dims", "num_heads", "depths", "sr_ratios"):
        c[name] = common.per_stage(name, c[name], int)
    c["mlp_ratios"] = common.per_stage("mlp_ratios", c["mlp_ratios"], float)
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        c[name] = common.rate(name, c[name])
    if c["qk_scale"] is not None and not (
        isinstance(c["qk_scale"], (int, float)) and c["qk_scale"] > 0
    ):
        raise ValueError(f"qk_scale must be a positive number or None; got {c['qk_scale']!r}")
    if not isinstance(c["norm_eps"], (int, float)) or not 0 < c["norm_eps"] < 1:
        raise ValueError(f"norm_eps must be a small positive number; got {c['norm_eps']!r}")
    common.choice("flavor", c["flavor"], FLAVORS)
    for name in ("qkv_bias", "remat"):
        common.choice(name, c[name], (True, False))
    common.choice("scan_blocks", c["scan_blocks"], (None, True, False))
    c["scan_blocks"] = resolve_scan_blocks(c["scan_blocks"], c["depths"])
    c["dtype"] = common.compute_dtype(c["dtype"])
    cfg = PVTConfig(**c)

    common.check_heads(cfg.embed_dims, cfg.num_heads)
    if cfg.img_size % cfg.total_stride:
        ok = [s for s in range(cfg.total_stride, 4 * cfg.img_size, cfg.total_stride)]
        near = sorted(ok, key=lambda s: abs(s - cfg.img_size))[:3]
        raise ValueError(
            f"img_size={cfg.img_size} is not divisible by the total stride "
            f"{cfg.total_stride} (patch_size={cfg.patch_size} x 2 x 2 x 2); "
            f"use a multiple of {cfg.total_stride}, e.g. {', '.join(map(str, sorted(near)))}"
        )
    if cfg.sr_ratios[3] != 1:
        raise ValueError(
            f"sr_ratios[3] must be 1: stage 4 carries the class token, so its tokens do not "
            f"form a map to reduce; got sr_ratios={list(cfg.sr_ratios)}"
        )
    for i, r in enumerate(cfg.sr_ratios):
        if r > cfg.grid(i):
            raise ValueError(
                f"sr_ratios[{i}]={r} is larger than stage {i + 1}'s {cfg.grid(i)}x"
                f"{cfg.grid(i)} token map at img_size={cfg.img_size}; use at most {cfg.grid(i)}"
            )
    return cfg


# ------------------------------------------------------- spatial-reduction attention


def init_sra(cfg: PVTConfig, stage: int, weight) -> dict:
    dim, r = cfg.embed_dims[stage], cfg.sr_ratios[stage]
    p = {
        "q": nn.init_linear(dim, dim, bias=cfg.qkv_bias, weight=weight),
        "kv": nn.init_linear(dim, 2 * dim, bias=cfg.qkv_bias, weight=weight),
    }
    if r > 1:
        p["sr"] = nn.init_conv((r, r), dim, dim)
        p["norm"] = nn.init_layer_norm(dim)
    if cfg.flavor == "paper":
        p["proj"] = nn.init_linear(dim, dim, weight=weight)
    return p


def sra(p, x, hw, rngs, *, cfg: PVTConfig, stage: int):
    """Attention whose keys and values come from a map reduced ``sr_ratio`` times per side."""
    b, n, c = x.shape
    heads = cfg.num_heads[stage]
    d = c // heads
    scale = cfg.qk_scale or d**-0.5
    dtype = cfg.dtype
    q = nn.linear(p["q"], x, dtype).reshape(b, n, heads, d)
    if "sr" in p:
        m = nn.patchify_conv(p["sr"], x.reshape(b, *hw, c), dtype)
        x = nn.layer_norm(p["norm"], m.reshape(b, -1, c), SR_NORM_EPS)
    # The 2C axis of kv is [k heads..., v heads...], as in the seed and the paper's code.
    kv = nn.linear(p["kv"], x, dtype).reshape(b, -1, 2, heads, d)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits * scale, axis=-1).astype(dtype)
    attn = nn.dropout(attn, cfg.attn_drop_rate, rngs[0])
    out = jnp.einsum("bhnm,bmhd->bnhd", attn, v).reshape(b, n, c)
    if cfg.flavor == "paper":
        out = nn.linear(p["proj"], out, dtype)
    else:
        # Lucid's `proj` is nn.Dropout(attn_drop): a second attention-rate dropout.
        out = nn.dropout(out, cfg.attn_drop_rate, rngs[1])
    return nn.dropout(out, cfg.drop_rate, rngs[2])


# ------------------------------------------------------------------------------ MLP


def init_mlp(cfg: PVTConfig, stage: int, weight) -> dict:
    dim, hidden = cfg.embed_dims[stage], cfg.mlp_hidden(stage)
    return {
        "fc1": nn.init_linear(dim, hidden, weight=weight),
        "fc2": nn.init_linear(hidden, dim, weight=weight),
    }


def mlp(p, x, rngs, *, cfg: PVTConfig):
    h = nn.gelu(nn.linear(p["fc1"], x, cfg.dtype), approximate=cfg.flavor == "lucid")
    h = nn.dropout(h, cfg.drop_rate, rngs[0])
    return nn.dropout(nn.linear(p["fc2"], h, cfg.dtype), cfg.drop_rate, rngs[1])


# ---------------------------------------------------------------------------- block


def init_block(cfg: PVTConfig, stage: int, weight) -> dict:
    dim = cfg.embed_dims[stage]
    return {
        "norm1": nn.init_layer_norm(dim),
        "attn": init_sra(cfg, stage, weight),
        "norm2": nn.init_layer_norm(dim),
        "mlp": init_mlp(cfg, stage, weight),
    }


_RNGS_PER_BLOCK = 7  # attention: 3 dropouts; MLP: 2 dropouts; 2 drop-paths


def block(p, x, rng, path_rate, *, hw, cfg: PVTConfig, stage: int):
    """Pre-norm transformer block. ``rng`` None means inference (no dropout, no drop-path)."""
    rngs = [None] * _RNGS_PER_BLOCK if rng is None else list(jax.random.split(rng, 7))
    y = sra(p["attn"], nn.layer_norm(p["norm1"], x, cfg.norm_eps), hw, rngs[0:3], cfg=cfg,
            stage=stage)
    x = x + nn.drop_path(y, path_rate, rngs[5])
    y = mlp(p["mlp"], nn.layer_norm(p["norm2"], x, cfg.norm_eps), rngs[3:5], cfg=cfg)
    return x + nn.drop_path(y, path_rate, rngs[6])


def run_blocks(blocks, x, rng, path_rates, *, hw, cfg: PVTConfig, stage: int):
    """Run a stage's stacked blocks, scanned or unrolled, each optionally rematerialised.

    Scan keeps compile time flat in depth; unrolled lets XLA fuse across blocks, which
    trained faster on GPU (DESIGN.md). Both compute the same function.
    """
    depth = cfg.depths[stage]
    fn = functools.partial(block, hw=hw, cfg=cfg, stage=stage)
    if cfg.remat:
        fn = jax.checkpoint(fn, prevent_cse=not cfg.scan_blocks)
    keys = None if rng is None else jax.random.split(rng, depth)
    if cfg.scan_blocks:
        def body(carry, xs):
            p, key, r = xs
            return fn(p, carry, key, r), None

        x, _ = jax.lax.scan(body, x, (blocks, keys, jnp.asarray(path_rates, jnp.float32)))
        return x
    for j in range(depth):
        p = jax.tree_util.tree_map(lambda a, j=j: a[j], blocks)
        x = fn(p, x, None if keys is None else keys[j], float(path_rates[j]))
    return x


# ---------------------------------------------------------------------------- stage


def init_stage(cfg: PVTConfig, stage: int, weight) -> dict:
    dim = cfg.embed_dims[stage]
    c_in = cfg.in_channels if stage == 0 else cfg.embed_dims[stage - 1]
    p_size = cfg.patch_sizes[stage]
    tokens = cfg.grid(stage) ** 2 + (1 if stage == 3 else 0)
    p = {
        "patch_embed": {
            "proj": nn.init_conv((p_size, p_size), c_in, dim),
            "norm": nn.init_layer_norm(dim),
        },
        "pos_embed": weight((1, tokens, dim)),
        "blocks": nn.stack(init_block(cfg, stage, weight), cfg.depths[stage]),
    }
    if stage == 3:
        p["cls_token"] = weight((1, 1, dim))
    return p


def stage_forward(p, x, rng, path_rates, *, cfg: PVTConfig, stage: int):
    """Patch embedding, position embedding, blocks. Returns (tokens, (h, w))."""
    dtype = cfg.dtype
    m = nn.patchify_conv(p["patch_embed"]["proj"], x, dtype)
    b, h, w, c = m.shape
    t = nn.layer_norm(p["patch_embed"]["norm"], m.reshape(b, h * w, c), PATCH_NORM_EPS)
    if "cls_token" in p:
        cls = jnp.broadcast_to(p["cls_token"].astype(dtype), (b, 1, c))
        t = jnp.concatenate([cls, t], axis=1)
    t = t + p["pos_embed"].astype(dtype)
    k_pos, k_blocks = (None, None) if rng is None else jax.random.split(rng)
    t = nn.dropout(t, cfg.drop_rate, k_pos)
    t = run_blocks(p["blocks"], t, k_blocks, path_rates, hw=(h, w), cfg=cfg, stage=stage)
    return t, (h, w)


# ---------------------------------------------------------------------------- model


def param_specs(cfg: PVTConfig) -> dict:
    """The parameter tree as ``nn.Init`` specs: shapes and distributions, nothing drawn.

    Linear weights, position embeddings and the class token N(0, 0.02) in both flavors:
    the paper's code calls timm's ``trunc_normal_(std=.02)``, whose bounds are +-2 in
    absolute value (100 std), so it is the same distribution. LayerNorm 1 and 0; convs as
    PyTorch's default.
    """
    weight = nn.normal
    specs = {f"stage{i + 1}": init_stage(cfg, i, weight) for i in range(4)}
    specs["norm"] = nn.init_layer_norm(cfg.embed_dims[3])
    if cfg.num_classes:
        specs["head"] = nn.init_linear(cfg.embed_dims[3], cfg.num_classes, weight=weight)
    return specs


def make_init(cfg: PVTConfig):
    specs = param_specs(cfg)

    # Jitted so that a plain eager call is one compiled program, not hundreds of ops;
    # it still composes with jit, vmap and eval_shape like any function.
    @jax.jit
    def init(key) -> dict:
        return nn.materialize(specs, key)

    return init


def make_apply(cfg: PVTConfig, name: str):
    rates = cfg.drop_path_rates
    offsets = np.cumsum((0,) + cfg.depths)

    def apply(params, x, *, train: bool = False, rng=None, features: bool = False):
        """Logits (B, num_classes) float32; the pooled class token when num_classes=0;
        with ``features=True`` the four stage maps, NHWC, strides 4/8/16/32 (class token
        left out, before the final norm), in the compute dtype."""
        x = common.check_images(
            x, in_channels=cfg.in_channels, img_size=cfg.img_size, stride=cfg.total_stride,
            model=name,
        )
        if train and rng is None:
            raise ValueError(
                "apply(..., train=True) needs a PRNG key for dropout and drop-path: pass "
                "rng=jax.random.key(seed), or train=False for deterministic inference"
            )
        stage_rngs = jax.random.split(rng, 4) if train else [None] * 4
        x = jnp.asarray(x).astype(cfg.dtype)
        maps = []
        for i in range(4):
            t, (h, w) = stage_forward(
                params[f"stage{i + 1}"], x, stage_rngs[i], rates[offsets[i] : offsets[i + 1]],
                cfg=cfg, stage=i,
            )
            grid_tokens = t[:, 1:] if i == 3 else t
            x = grid_tokens.reshape(t.shape[0], h, w, t.shape[-1])
            maps.append(x)
        if features:
            return tuple(maps)
        pooled = nn.layer_norm(params["norm"], t, cfg.norm_eps)[:, 0]
        if not cfg.num_classes:
            return pooled.astype(jnp.float32)
        return nn.linear(params["head"], pooled, cfg.dtype).astype(jnp.float32)

    return apply


def build(name: str, defaults: dict, img_size, num_classes, kwargs) -> Model:
    cfg = make_config(name, **{**defaults, **kwargs, "img_size": img_size,
                               "num_classes": num_classes})
    return Model(make_init(cfg), make_apply(cfg, name), name=name, config=cfg)


# ------------------------------------------------------------------------- builders

_COMMON = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
               mlp_ratios=(8, 8, 4, 4), qkv_bias=True, norm_eps=1e-6, sr_ratios=(8, 4, 2, 1))


@register_model
def pvt_tiny(img_size: int = 224, num_classes: int = 1000, **kwargs) -> Model:
    """PVT-Tiny: depths [2, 2, 2, 2]; 12,457,192 parameters (lucid), 13,229,288 (paper)."""
    return build("pvt_tiny", dict(_COMMON, depths=(2, 2, 2, 2)), img_size, num_classes, kwargs)


@register_model
def pvt_small(img_size: int = 224, num_classes: int = 1000, **kwargs) -> Model:
    """PVT-Small: depths [3, 4, 6, 3]; 23,003,048 parameters (lucid), 24,485,864 (paper)."""
    return build("pvt_small", dict(_COMMON, depths=(3, 4, 6, 3)), img_size, num_classes, kwargs)


@register_model
def pvt_medium(img_size: int = 224, num_classes: int = 1000, **kwargs) -> Model:
    """PVT-Medium: depths [3, 4, 18, 3]; 41,492,648 parameters (lucid), 44,208,104 (paper)."""
    return build("pvt_medium", dict(_COMMON, depths=(3, 4, 18, 3)), img_size, num_classes,
                 kwargs)


@register_model
def pvt_large(img_size: int = 224, num_classes: int = 1000, **kwargs) -> Model:
    """PVT-Large: depths [3, 4, 27, 3]; 55,359,848 parameters (lucid), 58,999,784 (paper)."""
    return build("pvt_large", dict(_COMMON, depths=(3, 4, 27, 3)), img_size, num_classes,
                 kwargs)


@register_model
def pvt_huge(img_size: int = 224, num_classes: int = 1000, **kwargs) -> Model:
    """PVT-Huge: widths [128, 256, 512, 768], depths [3, 10, 60, 3], drop_path_rate 0.02;
    286,706,920 parameters (lucid), 304,945,512 (paper). Its 76 blocks are scanned by
    default (unrolled, its train step takes minutes to compile)."""
    defaults = dict(_COMMON, embed_dims=(128, 256, 512, 768), num_heads=(2, 4, 8, 12),
                    depths=(3, 10, 60, 3), drop_path_rate=0.02)
    return build("pvt_huge", defaults, img_size, num_classes, kwargs)
