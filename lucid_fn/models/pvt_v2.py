"""PVT v2 (Wang et al. 2022, "PVTv2: Improved Baselines with Pyramid Vision Transformer"),
timm's ``pvt_v2_*`` network as pure ``(init, apply)`` functions.

What v2 changes from v1 (lucid_fn.models.pvt):

- overlapping patch embeddings: conv 7x7 stride 4 (padding 3), then 3x3 stride 2
  (padding 1), each followed by LayerNorm;
- no position embeddings and no class token, so any input whose sides 32 divides runs
  with the same params; the head averages the last stage's tokens;
- an MLP with a depthwise 3x3 conv between its two linears (and a ReLU before it in the
  ``linear`` variant);
- attention always has its output projection; ``linear=True`` (``_li``) reduces keys and
  values with a 7x7 adaptive average pool, a 1x1 conv, LayerNorm and GELU;
- a LayerNorm closes every stage; GELU is exact erf everywhere.

Parameters (float32; per-block weights stacked on a leading depth axis)::

    stage{1..4}: patch_embed {proj {kernel (k, k, in, C), bias}, norm {scale, bias}}
                 blocks {norm1, attn {q, kv, [sr, norm], proj}, norm2,
                         mlp {fc1, dwconv {kernel (3, 3, 1, hidden), bias}, fc2}}
                 norm {scale, bias}
    head {kernel (C_4, num_classes), bias}      absent when num_classes == 0
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lucid_fn import nn
from lucid_fn.kernels import conv_mlp as conv_mlp_kernel
from lucid_fn.models import common

PATCH_NORM_EPS = 1e-5  # OverlapPatchEmbed keeps nn.LayerNorm's default
# Patch embeddings over at most this many input channels (the stem on RGB) run as a
# stride-1 conv over space-to-depth blocks: cuDNN was slow on 3 channels, while the 3x3/2
# embeddings were slower that way (benchmarks/NOTES.md).
S2D_MAX_CHANNELS = 8
STRIDES = (4, 2, 2, 2)


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PVTv2Config(common.PyramidConfig):
    """PVT v2's builder arguments: the pyramid's (models/common.py), with ``patch_size``
    stage 1's overlapping kernel (stride 4), and ``linear`` SRA. Any multiple of 32 runs
    (img_size is the size summaries assume)."""
    patch_size: int = 7
    linear: bool = False

    @property
    def kernel_sizes(self) -> tuple:
        return (self.patch_size, 3, 3, 3)

    @property
    def first_stride(self) -> int:
        return STRIDES[0]


ARGUMENTS = tuple(f.name for f in dataclasses.fields(PVTv2Config))


def make_config(builder: str, **kwargs) -> PVTv2Config:
    """Validate builder arguments into a config; every error names the argument."""
    common.check_kwargs(kwargs, ARGUMENTS, builder)
    c = common.normalize_fields({**dataclasses.asdict(PVTv2Config()), **kwargs})
    cfg = PVTv2Config(**c)
    if cfg.patch_size <= STRIDES[0] or cfg.patch_size % 2 == 0:
        raise ValueError(
            f"patch_size={cfg.patch_size}: v2's first patch embedding overlaps, so its "
            f"kernel must be odd and larger than its stride 4 (e.g. 7, the default)"
        )
    common.check_img_size(cfg.img_size, cfg.total_stride, "4 x 2 x 2 x 2")
    common.check_reduction(cfg, cfg.img_size, cfg.img_size)
    common.check_mlp_hidden(cfg)
    return cfg


# --------------------------------------------------------- attention, MLP and block


def init_conv(kernel_size, d_in, d_out, groups: int = 1) -> dict:
    """timm's v2 conv init: N(0, sqrt(2 / fan_out)), fan_out = kh * kw * out / groups."""
    kh, kw = kernel_size
    std = math.sqrt(2.0 / (kh * kw * d_out // groups))
    return {"kernel": nn.normal((kh, kw, d_in // groups, d_out), std),
            "bias": nn.Init((d_out,), "zeros")}


def init_mlp(cfg: PVTv2Config, stage: int) -> dict:
    dim, hidden = cfg.embed_dims[stage], cfg.mlp_hidden(stage)
    return {"fc1": nn.init_linear(dim, hidden),
            "dwconv": init_conv((3, 3), hidden, hidden, groups=hidden),
            "fc2": nn.init_linear(hidden, dim)}


def mlp(p, x, rngs, *, cfg: PVTv2Config, hw):
    """``fc2(GELU(DWConv(fc1(x))))`` (a ReLU after fc1 when ``linear``), dropout after
    GELU and after fc2, on tokens of an ``hw`` map. With no dropout to apply (inference,
    or a rate of 0) one fused op (kernels/conv_mlp.py)."""
    if rngs[0] is None or cfg.drop_rate == 0:
        return conv_mlp_kernel.conv_mlp(p["fc1"], p["dwconv"], p["fc2"], x, hw=hw,
                                        relu=cfg.linear, dtype=cfg.dtype, kernels=cfg.kernels)
    h = nn.linear(p["fc1"], x, cfg.dtype)
    if cfg.linear:
        h = jax.nn.relu(h)
    h = nn.depthwise_conv3x3(p["dwconv"], h, hw, cfg.dtype, portable=cfg.kernels.portable)
    h = nn.dropout(nn.gelu(h, approximate=False), cfg.drop_rate, rngs[0])
    return nn.dropout(nn.linear(p["fc2"], h, cfg.dtype), cfg.drop_rate, rngs[1])


def init_block(cfg: PVTv2Config, stage: int) -> dict:
    dim = cfg.embed_dims[stage]
    attn = nn.init_sra(dim, sr_ratio=cfg.sr_ratios[stage], qkv_bias=cfg.qkv_bias, proj=True,
                       linear=cfg.linear, conv=init_conv)
    return nn.init_block(dim, attn, init_mlp(cfg, stage))


def block(p, x, rng, path_rate, *, cfg: PVTv2Config, stage: int, hw):
    """The encoder block: ``x = x + drop_path(attn(norm1(x)))``, ``x = x +
    drop_path(mlp(norm2(x)))`` (nn.prenorm_block) with spatial-reduction attention and
    the conv MLP, over the stage's residual stream ``x``."""
    return nn.prenorm_block(p, x, rng, path_rate, eps=cfg.norm_eps,
                            attn=functools.partial(common.attention, cfg=cfg, stage=stage,
                                                   hw=hw),
                            mlp=functools.partial(mlp, cfg=cfg, hw=hw))


# ---------------------------------------------------------------------------- stage


def init_stage(cfg: PVTv2Config, stage: int) -> dict:
    dim = cfg.embed_dims[stage]
    c_in = cfg.in_channels if stage == 0 else cfg.embed_dims[stage - 1]
    k = cfg.kernel_sizes[stage]
    return {
        "patch_embed": {"proj": init_conv((k, k), c_in, dim), "norm": nn.init_layer_norm(dim)},
        "blocks": nn.stack(init_block(cfg, stage), cfg.depths[stage]),
        "norm": nn.init_layer_norm(dim),
    }


def patch_embed_conv(p, x, *, cfg: PVTv2Config, stage: int):
    """The overlapping patch embedding's conv (its norm not applied): NHWC in and out."""
    k = cfg.kernel_sizes[stage]
    embed = nn.space_to_depth_conv if x.shape[-1] <= S2D_MAX_CHANNELS else nn.conv
    return embed(p["patch_embed"]["proj"], x, stride=STRIDES[stage], padding=k // 2,
                 dtype=cfg.dtype)


def stage_forward(p, x, rng, path_rates, *, cfg: PVTv2Config, stage: int, probe=None):
    """Overlapping patch embedding, blocks, stage norm: an NHWC map in, an NHWC map out.
    ``probe``: a block index whose attention probabilities also come back."""
    m = patch_embed_conv(p, x, cfg=cfg, stage=stage)
    b, h, w, c = m.shape
    x = nn.Stream(m.reshape(b, h * w, c), kernels=cfg.kernels, train=rng is not None)
    x = x.layer_norm(p["patch_embed"]["norm"], PATCH_NORM_EPS)
    x, seen = common.run_stage_blocks(block, p, x, rng, path_rates, cfg=cfg, stage=stage,
                                      hw=(h, w), probe=probe)
    x = x.layer_norm(p["norm"], cfg.norm_eps)
    return x.tokens().reshape(b, h, w, c), seen


# ---------------------------------------------------------------------------- model


def param_specs(cfg: PVTv2Config) -> dict:
    """Linear weights N(0, 0.02) (timm's trunc_normal_(std=.02) bounds at +-2 absolute, the
    same distribution), convs as timm's v2 init, LayerNorm 1 and 0."""
    specs = {f"stage{i + 1}": init_stage(cfg, i) for i in range(4)}
    return {**specs, **common.head_specs(cfg)}


def dense_specs(cfg: PVTv2Config) -> dict:
    """The detection and segmentation backbone's params: the classifier's without its
    head (v2's stage norms stay, as in the official dense-prediction code)."""
    return param_specs(dataclasses.replace(cfg, num_classes=0))


def dense_features(params, x, rngs, rates, *, cfg: PVTv2Config) -> tuple:
    """The four stage maps (NHWC, strides 4 to 32, after each stage's norm)."""
    maps = []
    for i in range(4):
        x, _ = stage_forward(params[f"stage{i + 1}"], x, rngs[i], rates[i], cfg=cfg, stage=i)
        maps.append(x)
    return tuple(maps)


def make_apply(cfg: PVTv2Config, name: str, specs: dict):
    def apply(params, x, *, train: bool = False, rng=None, features: bool = False,
              attention=None):
        """Logits (B, num_classes) float32; the pooled features when num_classes=0; with
        ``features=True`` the four stage maps (after each stage's norm), NHWC, strides
        4/8/16/32, in the compute dtype. Any image size whose sides 32 divides.
        ``attention``: one block index per stage; then ``(out, probs)``, the 4 blocks'
        attention probabilities (B, heads, N_q, N_kv) float32."""
        x, rngs, rates, probes = common.apply_inputs(
            params, x, cfg=cfg, specs=specs, name=name, train=train, rng=rng,
            attention=attention)
        maps, probs = [], []
        for i in range(4):
            x, seen = stage_forward(params[f"stage{i + 1}"], x, rngs[i], rates[i],
                                    cfg=cfg, stage=i, probe=probes[i])
            maps.append(x)
            probs.append(seen)
        if features:
            out = tuple(maps)
        else:
            pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            out = (nn.linear(params["head"], pooled.astype(cfg.dtype), cfg.dtype).astype(
                jnp.float32) if cfg.num_classes else pooled)
        return out if attention is None else (out, tuple(probs))

    return apply


# ------------------------------------------------------------------------- builders
# name: (arguments, docstring); parameter counts at 1000 classes, 224x224. The seed's
# signature: name(img_size=224, num_classes=1000, in_channels=3, **kwargs).

_WIDE = (64, 128, 320, 512)
BUILDERS = {
    "pvt_v2_b0": (dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
                  "PVT v2 b0: widths 32/64/160/256, depths 2/2/2/2; 3,666,760 parameters."),
    "pvt_v2_b1": (dict(embed_dims=_WIDE, depths=(2, 2, 2, 2)),
                  "PVT v2 b1: depths 2/2/2/2; 14,009,000 parameters."),
    "pvt_v2_b2": (dict(embed_dims=_WIDE, depths=(3, 4, 6, 3)),
                  "PVT v2 b2: depths 3/4/6/3; 25,362,856 parameters."),
    "pvt_v2_b2_li": (dict(embed_dims=_WIDE, depths=(3, 4, 6, 3), linear=True),
                     "PVT v2 b2 with linear SRA (7x7 pooled keys and values, ReLU in the "
                     "MLP); 22,553,512 parameters."),
    "pvt_v2_b3": (dict(embed_dims=_WIDE, depths=(3, 4, 18, 3)),
                  "PVT v2 b3: depths 3/4/18/3; 45,238,696 parameters."),
    "pvt_v2_b4": (dict(embed_dims=_WIDE, depths=(3, 8, 27, 3)),
                  "PVT v2 b4: depths 3/8/27/3; 62,556,072 parameters."),
    "pvt_v2_b5": (dict(embed_dims=_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
                  "PVT v2 b5: depths 3/6/40/3, MLP ratios 4; 81,956,008 parameters."),
}
common.register_builders(BUILDERS, make_config=make_config, param_specs=param_specs,
                         make_apply=make_apply, in_channels=True)
