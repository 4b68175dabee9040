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

import jax
import jax.numpy as jnp

from lucid_fn import nn
from lucid_fn.kernels import mlp as mlp_kernel
from lucid_fn.models import common

# The patch embedding's LayerNorm keeps nn.LayerNorm's default epsilon in the seed; blocks
# and the final norm use the builders' ``norm_eps`` (1e-6).
PATCH_NORM_EPS = 1e-5
FLAVORS = ("lucid", "paper")


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PVTConfig(common.PyramidConfig):
    """PVT v1's builder arguments: the pyramid's (models/common.py) and the flavor."""
    flavor: str = "lucid"

    @property
    def patch_sizes(self) -> tuple:
        return (self.patch_size, 2, 2, 2)

    def grid(self, stage: int) -> int:
        """Side of stage ``stage``'s (0-based) token map for img_size inputs."""
        return self.img_size // (self.patch_size * 2**stage)


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
    common.check_reduction(cfg, cfg.img_size, cfg.img_size)
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


def init_block(cfg: PVTConfig, stage: int) -> dict:
    dim = cfg.embed_dims[stage]
    attn = nn.init_sra(dim, sr_ratio=cfg.sr_ratios[stage], qkv_bias=cfg.qkv_bias,
                       proj=cfg.flavor == "paper")
    return nn.init_block(dim, attn, init_mlp(cfg, stage))


def block(p, x, rng, path_rate, *, cfg: PVTConfig, stage: int, hw):
    """The encoder block: ``x = x + drop_path(attn(norm1(x)))``, ``x = x +
    drop_path(mlp(norm2(x)))`` (nn.prenorm_block) with spatial-reduction attention and
    this MLP, over the stage's residual stream ``x``."""
    return nn.prenorm_block(p, x, rng, path_rate, eps=cfg.norm_eps,
                            attn=functools.partial(common.attention, cfg=cfg, stage=stage,
                                                   hw=hw),
                            mlp=functools.partial(mlp, cfg=cfg))


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
    has_cls, pos = "cls_token" in p, p["pos_embed"]
    if stage == 3 and not has_cls:
        # The dense backbone (dense_specs) runs stage 4 without the class token but keeps
        # its row of the position embedding, unused, as the official code does: a
        # classifier's checkpoint loads unchanged.
        pos = pos[:, 1:]
    pos = nn.resize_pos_embed(pos, (h, w), has_cls=has_cls)
    k_pos, k_blocks = (None, None) if rng is None else jax.random.split(rng)
    x = nn.Stream(m.reshape(b, h * w, c), kernels=cfg.kernels, train=rng is not None)
    x = x.layer_norm(p["patch_embed"]["norm"], PATCH_NORM_EPS)
    if has_cls:
        x = x.prepend(p["cls_token"])
    x = (x + pos).dropout(cfg.drop_rate, k_pos)
    x, seen = common.run_stage_blocks(block, p, x, k_blocks, path_rates, cfg=cfg, stage=stage,
                                      hw=(h, w), probe=probe)
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
    return {**specs, **common.head_specs(cfg)}


def dense_specs(cfg: PVTConfig) -> dict:
    """The detection and segmentation backbone's params: the classifier's without its
    head, class token and final norm, as the official dense-prediction code builds it."""
    specs = param_specs(dataclasses.replace(cfg, num_classes=0))
    del specs["norm"], specs["stage4"]["cls_token"]
    return specs


def dense_features(params, x, rngs, rates, *, cfg: PVTConfig) -> tuple:
    """The four stage maps (NHWC, strides 4 to 32) of the dense backbone (dense_specs):
    stage 4 without the class token, no final norm."""
    maps = []
    for i in range(4):
        t, (h, w), _ = stage_forward(params[f"stage{i + 1}"], x, rngs[i], rates[i], cfg=cfg,
                                     stage=i)
        x = t.reshape(t.shape[0], h, w, t.shape[-1])
        maps.append(x)
    return tuple(maps)


def make_apply(cfg: PVTConfig, name: str, specs: dict):
    def apply(params, x, *, train: bool = False, rng=None, features: bool = False,
              attention=None):
        """Logits (B, num_classes) float32; the pooled class token when num_classes=0;
        with ``features=True`` the four stage maps, NHWC, strides 4/8/16/32 (class token
        left out, before the final norm), in the compute dtype. Images of another size
        than img_size (sides divisible by the total stride) use resized position
        embeddings. ``attention``: one block index per stage; then ``(out, probs)``, the
        4 blocks' attention probabilities (B, heads, N_q, N_kv) float32."""
        x, rngs, rates, probes = common.apply_inputs(
            params, x, cfg=cfg, specs=specs, name=name, train=train, rng=rng,
            attention=attention)
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
# name: (arguments, docstring); parameter counts at 1000 classes, 224x224.

_COMMON = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
               mlp_ratios=(8, 8, 4, 4), qkv_bias=True, norm_eps=1e-6, sr_ratios=(8, 4, 2, 1))
_HUGE = dict(_COMMON, embed_dims=(128, 256, 512, 768), num_heads=(2, 4, 8, 12),
             drop_path_rate=0.02)
BUILDERS = {
    "pvt_tiny": (dict(_COMMON, depths=(2, 2, 2, 2)), "PVT-Tiny: depths [2, 2, 2, 2]; "
                 "12,457,192 parameters (lucid), 13,229,288 (paper)."),
    "pvt_small": (dict(_COMMON, depths=(3, 4, 6, 3)), "PVT-Small: depths [3, 4, 6, 3]; "
                  "23,003,048 parameters (lucid), 24,485,864 (paper)."),
    "pvt_medium": (dict(_COMMON, depths=(3, 4, 18, 3)), "PVT-Medium: depths [3, 4, 18, 3]; "
                   "41,492,648 parameters (lucid), 44,208,104 (paper)."),
    "pvt_large": (dict(_COMMON, depths=(3, 4, 27, 3)), "PVT-Large: depths [3, 4, 27, 3]; "
                  "55,359,848 parameters (lucid), 58,999,784 (paper)."),
    "pvt_huge": (dict(_HUGE, depths=(3, 10, 60, 3)), "PVT-Huge: widths [128, 256, 512, "
                 "768], depths [3, 10, 60, 3], drop_path_rate 0.02; 286,706,920 parameters "
                 "(lucid), 304,945,512 (paper). Its 76 blocks are scanned by default "
                 "(unrolled, its train step takes minutes to compile)."),
}
common.register_builders(BUILDERS, make_config=make_config, param_specs=param_specs,
                         make_apply=make_apply)
