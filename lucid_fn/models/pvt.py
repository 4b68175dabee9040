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

# The patch embedding's LayerNorm keeps nn.LayerNorm's default epsilon in the seed; blocks
# and the final norm use the builders' ``norm_eps`` (1e-6).
PATCH_NORM_EPS = 1e-5
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

    def mlp_hidden(self, stage: int) -> int:
        return int(self.embed_dims[stage] * self.mlp_ratios[stage])


ARGUMENTS = tuple(f.name for f in dataclasses.fields(PVTConfig))

def make_config(builder: str, **kwargs) -> PVTConfig:
    """Validate builder arguments into a config; every error names the argument."""
    common.check_kwargs(kwargs, ARGUMENTS, builder)
    c = common.normalize_fields({**dataclasses.asdict(PVTConfig()), **kwargs})
    common.choice("flavor", c["flavor"], FLAVORS)
    c["scan_blocks"] = common.resolve_scan_blocks(c["scan_blocks"], c["depths"])
    cfg = PVTConfig(**c)
    common.check_img_size(cfg.img_size, cfg.total_stride,
                          f"patch_size={cfg.patch_size} x 2 x 2 x 2")
    if cfg.sr_ratios[3] != 1:
        raise ValueError(
            f"sr_ratios[3] must be 1: stage 4 carries the class token, so its tokens do not "
            f"form a map to reduce; got sr_ratios={list(cfg.sr_ratios)}"
        )
    common.check_sr_ratios(cfg.sr_ratios, cfg.img_size, cfg.img_size, cfg.patch_size)
    return cfg


# ------------------------------------------------------- attention, MLP and block
#
# Spatial-reduction attention and the pre-norm block are shared with PVT v2 (lucid_fn.nn);
# what is v1's own: attention with no output projection in the lucid flavor, and a plain
# two-layer MLP whose GELU follows the flavor.


def init_mlp(cfg: PVTConfig, stage: int) -> dict:
    dim, hidden = cfg.embed_dims[stage], cfg.mlp_hidden(stage)
    return {"fc1": nn.init_linear(dim, hidden), "fc2": nn.init_linear(hidden, dim)}


def mlp(p, x, rngs, *, cfg: PVTConfig, defer_bias: bool = False):
    """``defer_bias`` is accepted and not used: the fused kernel (stages 1-2) adds fc2's
    bias on chip, and stages 3-4 are a small share of the time."""
    if rngs[0] is None or cfg.drop_rate == 0:
        # No dropout to apply (inference, or a rate of 0): one fused kernel where it pays
        # (nn.fused; in training its backward recomputes the XLA form).
        return nn.fused.mlp_gelu(p["fc1"], p["fc2"], x, approximate=cfg.flavor == "lucid",
                                 dtype=cfg.dtype)
    h = nn.gelu(nn.linear(p["fc1"], x, cfg.dtype), approximate=cfg.flavor == "lucid")
    h = nn.dropout(h, cfg.drop_rate, rngs[0])
    return nn.dropout(nn.linear(p["fc2"], h, cfg.dtype), cfg.drop_rate, rngs[1])


def init_block(cfg: PVTConfig, stage: int) -> dict:
    dim = cfg.embed_dims[stage]
    attn = nn.init_sra(dim, sr_ratio=cfg.sr_ratios[stage], qkv_bias=cfg.qkv_bias,
                       proj=cfg.flavor == "paper")
    return nn.init_block(dim, attn, init_mlp(cfg, stage))


def block_fn(cfg: PVTConfig, stage: int, hw):
    """Stage ``stage``'s block as ``fn(p, (x, y), rng, path_rate) -> (x, y)`` (``nn.block``)."""
    attn = functools.partial(
        nn.sra, hw=hw, heads=cfg.num_heads[stage], scale=cfg.qk_scale, dtype=cfg.dtype,
        attn_drop=cfg.attn_drop_rate, drop=cfg.drop_rate,
    )
    return functools.partial(nn.block, attn=attn, mlp=functools.partial(mlp, cfg=cfg),
                             eps=cfg.norm_eps)


# ---------------------------------------------------------------------------- stage


def init_stage(cfg: PVTConfig, stage: int) -> dict:
    dim = cfg.embed_dims[stage]
    c_in = cfg.in_channels if stage == 0 else cfg.embed_dims[stage - 1]
    p_size = cfg.patch_sizes[stage]
    tokens = cfg.grid(stage) ** 2 + (1 if stage == 3 else 0)
    p = {
        "patch_embed": {
            "proj": nn.init_conv((p_size, p_size), c_in, dim),
            "norm": nn.init_layer_norm(dim),
        },
        "pos_embed": nn.normal((1, tokens, dim)),
        "blocks": nn.stack(init_block(cfg, stage), cfg.depths[stage]),
    }
    if stage == 3:
        p["cls_token"] = nn.normal((1, 1, dim))
    return p


def stage_forward(p, x, rng, path_rates, *, cfg: PVTConfig, stage: int):
    """Patch embedding, position embedding, blocks. Returns (tokens, (h, w))."""
    dtype = cfg.dtype
    m = nn.patchify_conv(p["patch_embed"]["proj"], x, dtype)
    b, h, w, c = m.shape
    t, norm = m.reshape(b, h * w, c), p["patch_embed"]["norm"]
    # Learned for img_size; other sizes get it resized bilinearly, as the official
    # detection code and HF do (a no-op at img_size).
    pos = nn.resize_pos_embed(p["pos_embed"], (h, w), has_cls="cls_token" in p)
    k_pos, k_blocks = (None, None) if rng is None else jax.random.split(rng)
    embed_norm = None
    if "cls_token" not in p and (k_pos is None or cfg.drop_rate == 0):
        # nothing between the norm, the position embedding and norm1: all three go to the
        # first block (one kernel at inference)
        embed_norm = (norm, PATCH_NORM_EPS, pos)
    else:
        t = nn.layer_norm(norm, t, PATCH_NORM_EPS)
        if "cls_token" in p:
            cls = jnp.broadcast_to(p["cls_token"].astype(dtype), (b, 1, c))
            t = jnp.concatenate([cls, t], axis=1)
        t = nn.dropout(t + pos.astype(dtype), cfg.drop_rate, k_pos)
    t = nn.run_blocks(block_fn(cfg, stage, (h, w)), p["blocks"], t, k_blocks, path_rates,
                      scan=cfg.scan_blocks, remat=cfg.remat, embed_norm=embed_norm)
    return t, (h, w)


# ---------------------------------------------------------------------------- model


def param_specs(cfg: PVTConfig) -> dict:
    """The parameter tree as ``nn.Init`` specs: shapes and distributions, nothing drawn.

    Linear weights, position embeddings and the class token N(0, 0.02) in both flavors:
    the paper's code calls timm's ``trunc_normal_(std=.02)``, whose bounds are +-2 in
    absolute value (100 std), so it is the same distribution. LayerNorm 1 and 0; convs as
    PyTorch's default.
    """
    specs = {f"stage{i + 1}": init_stage(cfg, i) for i in range(4)}
    specs["norm"] = nn.init_layer_norm(cfg.embed_dims[3])
    if cfg.num_classes:
        specs["head"] = nn.init_linear(cfg.embed_dims[3], cfg.num_classes)
    return specs


def make_apply(cfg: PVTConfig, name: str, specs: dict):
    rates = common.stage_path_rates(cfg.depths, cfg.drop_path_rate)

    def apply(params, x, *, train: bool = False, rng=None, features: bool = False):
        """Logits (B, num_classes) float32; the pooled class token when num_classes=0;
        with ``features=True`` the four stage maps, NHWC, strides 4/8/16/32 (class token
        left out, before the final norm), in the compute dtype. Images of another size
        than img_size (sides divisible by the total stride) use resized position
        embeddings."""
        common.check_params(params, specs, name)
        x = common.check_images(x, in_channels=cfg.in_channels, stride=cfg.total_stride,
                                model=name)
        common.check_sr_ratios(cfg.sr_ratios, *x.shape[1:3], cfg.patch_size)
        rngs = common.stage_rngs(train, rng)
        x = jnp.asarray(x).astype(cfg.dtype)
        maps = []
        for i in range(4):
            t, (h, w) = stage_forward(
                params[f"stage{i + 1}"], x, rngs[i], rates[i],
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
    specs = param_specs(cfg)
    return Model(common.make_init(specs), make_apply(cfg, name, specs), name=name, config=cfg)


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
