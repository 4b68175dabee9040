"""Pyramid Vision Transformer (PVT v1), Wang et al. 2021, as pure ``(init, apply)`` functions.

Reads top to bottom like the paper: config, spatial-reduction attention, MLP, block,
stage, model, builders.

Two flavors of the same network (docs/parity.md):

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
from lucid_fn.kernels import mlp as mlp_kernel
from lucid_fn.kernels.settings import KernelSettings
from lucid_fn.models import common

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
    scan_blocks: bool | None = None  # None: auto, see common.resolve_scan_blocks
    remat: bool = False
    kernels: KernelSettings | str | None = None  # None: the defaults, see kernels.resolve

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
    cfg = PVTConfig(**c)
    common.check_img_size(cfg.img_size, cfg.total_stride,
                          f"patch_size={cfg.patch_size} x 2 x 2 x 2")
    if cfg.sr_ratios[3] != 1:
        raise ValueError(
            f"sr_ratios[3] must be 1: stage 4 carries the class token, so its tokens do not "
            f"form a map to reduce; got sr_ratios={list(cfg.sr_ratios)}"
        )
    common.check_sr_ratios(cfg.sr_ratios, cfg.img_size, cfg.img_size, cfg.patch_size)
    common.check_mlp_hidden(cfg)
    return cfg


# --------------------------------------------------------- attention, MLP and block
#
# Spatial-reduction attention is shared with PVT v2 (lucid_fn.nn); what is v1's own: no
# output projection in the lucid flavor, and a plain two-layer MLP whose GELU follows the
# flavor.


def init_mlp(cfg: PVTConfig, stage: int) -> dict:
    dim, hidden = cfg.embed_dims[stage], cfg.mlp_hidden(stage)
    return {"fc1": nn.init_linear(dim, hidden), "fc2": nn.init_linear(hidden, dim)}


def mlp(p, x, rngs, *, cfg: PVTConfig):
    """``fc2(GELU(fc1(x)))``, dropout after GELU and after fc2. With no dropout to apply
    (inference, or a rate of 0) one fused op (kernels/mlp.py)."""
    approximate = cfg.flavor == "lucid"
    if rngs[0] is None or cfg.drop_rate == 0:
        return mlp_kernel.mlp_gelu(p["fc1"], p["fc2"], x, approximate=approximate,
                                   dtype=cfg.dtype, kernels=cfg.kernels)
    h = nn.gelu(nn.linear(p["fc1"], x, cfg.dtype), approximate=approximate)
    h = nn.dropout(h, cfg.drop_rate, rngs[0])
    return nn.dropout(nn.linear(p["fc2"], h, cfg.dtype), cfg.drop_rate, rngs[1])


def attention(p, x, rngs, *, cfg: PVTConfig, stage: int, hw):
    """Spatial-reduction attention over the ``hw`` token map (nn/attention.py)."""
    return nn.sra(p, x, rngs, hw=hw, heads=cfg.num_heads[stage], scale=cfg.qk_scale,
                  dtype=cfg.dtype, attn_drop=cfg.attn_drop_rate, drop=cfg.drop_rate,
                  kernels=cfg.kernels)


def init_block(cfg: PVTConfig, stage: int) -> dict:
    dim = cfg.embed_dims[stage]
    attn = nn.init_sra(dim, sr_ratio=cfg.sr_ratios[stage], qkv_bias=cfg.qkv_bias,
                       proj=cfg.flavor == "paper")
    return nn.init_block(dim, attn, init_mlp(cfg, stage))


def block(p, x, rng, path_rate, *, cfg: PVTConfig, stage: int, hw):
    """The encoder block: pre-norm attention and MLP, each a residual branch with
    stochastic depth. ``x`` is the stage's residual stream (an ``nn.Stream``)."""
    k = nn.block_keys(rng)
    norm1 = functools.partial(nn.layer_norm, p["norm1"], eps=cfg.norm_eps)
    norm2 = functools.partial(nn.layer_norm, p["norm2"], eps=cfg.norm_eps)
    attn = functools.partial(attention, p["attn"], cfg=cfg, stage=stage, hw=hw)
    x = x + nn.drop_path(attn(norm1(x), k.attn), path_rate, k.attn_path)
    x = x + nn.drop_path(mlp(p["mlp"], norm2(x), k.mlp, cfg=cfg), path_rate, k.mlp_path)
    return x


def attention_probs(p, x, *, cfg: PVTConfig, stage: int, hw):
    """The block's attention probabilities over the stream entering it (attention maps)."""
    return nn.sra_probs(p["attn"], nn.layer_norm(p["norm1"], x, cfg.norm_eps), hw=hw,
                        heads=cfg.num_heads[stage], scale=cfg.qk_scale, dtype=cfg.dtype)


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


def stage_forward(p, x, rng, path_rates, *, cfg: PVTConfig, stage: int, probe=None):
    """Patch embedding, position embedding, blocks: an NHWC map in, tokens out (with the
    class token first in stage 4), and the token map's (h, w). ``probe``: a block index
    whose attention probabilities also come back."""
    m = nn.patchify_conv(p["patch_embed"]["proj"], x, cfg.dtype)
    b, h, w, c = m.shape
    # Learned for img_size; other sizes get it resized bilinearly, as the official
    # detection code and HF do (a no-op at img_size).
    pos = nn.resize_pos_embed(p["pos_embed"], (h, w), has_cls="cls_token" in p)
    k_pos, k_blocks = (None, None) if rng is None else jax.random.split(rng)
    x = nn.Stream(m.reshape(b, h * w, c), kernels=cfg.kernels, train=rng is not None)
    x = x.layer_norm(p["patch_embed"]["norm"], PATCH_NORM_EPS)
    if "cls_token" in p:
        x = x.prepend(p["cls_token"])
    x = (x + pos).dropout(cfg.drop_rate, k_pos)
    kw = dict(cfg=cfg, stage=stage, hw=(h, w))
    probe = None if probe is None else (probe, functools.partial(attention_probs, **kw))
    out = nn.run_blocks(functools.partial(block, **kw), p["blocks"], x, k_blocks, path_rates,
                        scan=cfg.scan_blocks, remat=cfg.remat, probe=probe)
    x, seen = out if probe else (out, None)
    return x.tokens(), (h, w), seen


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

    def apply(params, x, *, train: bool = False, rng=None, features: bool = False,
              attention=None):
        """Logits (B, num_classes) float32; the pooled class token when num_classes=0;
        with ``features=True`` the four stage maps, NHWC, strides 4/8/16/32 (class token
        left out, before the final norm), in the compute dtype. Images of another size
        than img_size (sides divisible by the total stride) use resized position
        embeddings. ``attention``: one block index per stage; then ``(out, probs)``, the
        4 blocks' attention probabilities (B, heads, N_q, N_kv) float32."""
        common.check_params(params, specs, name)
        x = common.check_images(x, in_channels=cfg.in_channels, stride=cfg.total_stride,
                                model=name)
        common.check_sr_ratios(cfg.sr_ratios, *x.shape[1:3], cfg.patch_size)
        probes = common.attention_blocks(attention, cfg.depths, name)
        rngs = common.stage_rngs(train, rng)
        x = jnp.asarray(x).astype(cfg.dtype)
        maps, probs = [], []
        for i in range(4):
            t, (h, w), seen = stage_forward(params[f"stage{i + 1}"], x, rngs[i], rates[i],
                                            cfg=cfg, stage=i, probe=probes[i])
            grid_tokens = t[:, 1:] if i == 3 else t
            x = grid_tokens.reshape(t.shape[0], h, w, t.shape[-1])
            maps.append(x)
            probs.append(seen)
        if features:
            out = tuple(maps)
        else:
            pooled = nn.layer_norm(params["norm"], t, cfg.norm_eps)[:, 0]
            out = (nn.linear(params["head"], pooled, cfg.dtype) if cfg.num_classes
                   else pooled).astype(jnp.float32)
        return out if attention is None else (out, tuple(probs))

    return apply


# ------------------------------------------------------------------------- builders

_COMMON = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
               mlp_ratios=(8, 8, 4, 4), qkv_bias=True, norm_eps=1e-6, sr_ratios=(8, 4, 2, 1))


_builder = functools.partial(common.builder, make_config=make_config,
                             param_specs=param_specs, make_apply=make_apply)
pvt_tiny = _builder("pvt_tiny", dict(_COMMON, depths=(2, 2, 2, 2)),
                    "PVT-Tiny: depths [2, 2, 2, 2]; 12,457,192 parameters (lucid), "
                    "13,229,288 (paper).")
pvt_small = _builder("pvt_small", dict(_COMMON, depths=(3, 4, 6, 3)),
                     "PVT-Small: depths [3, 4, 6, 3]; 23,003,048 parameters (lucid), "
                     "24,485,864 (paper).")
pvt_medium = _builder("pvt_medium", dict(_COMMON, depths=(3, 4, 18, 3)),
                      "PVT-Medium: depths [3, 4, 18, 3]; 41,492,648 parameters (lucid), "
                      "44,208,104 (paper).")
pvt_large = _builder("pvt_large", dict(_COMMON, depths=(3, 4, 27, 3)),
                     "PVT-Large: depths [3, 4, 27, 3]; 55,359,848 parameters (lucid), "
                     "58,999,784 (paper).")
pvt_huge = _builder("pvt_huge", dict(_COMMON, embed_dims=(128, 256, 512, 768),
                                     num_heads=(2, 4, 8, 12), depths=(3, 10, 60, 3),
                                     drop_path_rate=0.02),
                    "PVT-Huge: widths [128, 256, 512, 768], depths [3, 10, 60, 3], "
                    "drop_path_rate 0.02; 286,706,920 parameters (lucid), 304,945,512 "
                    "(paper). Its 76 blocks are scanned by default (unrolled, its train step "
                    "takes minutes to compile).")
