"""Semantic FPN (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks") on a PVT
backbone, as the PVT papers use it for ADE20K: pure ``(init, apply)`` functions.

    init, apply = registry["semantic_fpn"](backbone="pvt_v2_b2", num_classes=150)
    logits = apply(params, images)        # (B, H, W, num_classes) float32, at input size

Reads top to bottom like the paper: config, the FPN neck (1x1 lateral convs to 256
channels, top-down nearest-neighbour upsampling and addition, a 3x3 conv per level), the
semantic FPN head (per level, 3x3 conv + norm + ReLU, with 2x bilinear upsampling, until
stride 4; the four summed; channel dropout; a 1x1 classifier; bilinear upsampling to the
input size), the model, the builder. The numbers are those of mmsegmentation's
``FPN`` + ``FPNHead`` config that the official PVT segmentation code trains.

GroupNorm (32 groups) replaces the head's SyncBN: the same parameters per channel, and no
batch statistics, so ``apply`` stays a pure function of params and images.

Parameters (float32)::

    backbone   the classifier's tree without its head (v1: also without the class token
               and final norm, as the official dense-prediction backbones)
    neck       lateral{1..4} {kernel (1, 1, C_i, 256), bias}, fpn{1..4} {kernel (3, 3, 256,
               256), bias}
    head       level{1..4} {conv{j} {kernel (3, 3, ., 128)}, norm{j} {scale, bias}},
               cls {kernel (1, 1, 128, num_classes), bias}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lucid_fn import nn
from lucid_fn.models import common, pvt, pvt_v2
from lucid_fn.registry import Model, register_model, registry

LEVELS = 4
# The head's keywords; everything else a builder is given goes to the backbone's builder.
HEAD_ARGUMENTS = ("fpn_channels", "head_channels", "head_dropout", "norm_groups",
                  "logits_dtype")
# The backbone is built at its classifier's size (``backbone_img_size``), whatever the
# images: PVT v1's position embeddings are then those of the ImageNet checkpoints, resized
# to each input on the fly, as the official segmentation code does (and counted as its
# 28.2M for PVT-Small does); v2's params do not depend on it.
BACKBONE_IMG_SIZE = 224
GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm's default


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SemanticFPNConfig:
    """The segmentation model's arguments and its backbone's resolved config."""
    backbone: str
    backbone_config: Any
    backbone_kwargs: tuple  # the (key, value) pairs the backbone was built with
    img_size: int = 512
    num_classes: int = 150
    fpn_channels: int = 256
    head_channels: int = 128
    head_dropout: float = 0.1
    norm_groups: int = 32
    # The logits' dtype at the input's size, their largest tensor by far (150 classes at
    # 512x512). "bfloat16" writes half the bytes, as PyTorch's autocast does; the loss and
    # the metrics compute in float32 either way.
    logits_dtype: str = "float32"
    task: str = "segment"  # the training loop's cue: per-pixel labels, not one per image

    @property
    def in_channels(self) -> int:
        return self.backbone_config.in_channels

    @property
    def dtype(self):
        return self.backbone_config.dtype

    @property
    def total_stride(self) -> int:
        return self.backbone_config.total_stride

    def builder_kwargs(self) -> dict:
        """Keywords that build this model again: ``registry["semantic_fpn"](**kw)``."""
        return {"backbone": self.backbone, "img_size": self.img_size,
                "num_classes": self.num_classes,
                **{k: getattr(self, k) for k in HEAD_ARGUMENTS},
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self.backbone_kwargs}}


def _family(backbone_cfg):
    return pvt if isinstance(backbone_cfg, pvt.PVTConfig) else pvt_v2


BACKBONES = tuple([*pvt.BUILDERS, *pvt_v2.BUILDERS])


def make_config(backbone: str, img_size: int, num_classes: int, **kwargs) -> SemanticFPNConfig:
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be a PVT model name, one of {', '.join(BACKBONES)}; "
                         f"got {backbone!r}")
    head = {k: kwargs.pop(k) for k in HEAD_ARGUMENTS if k in kwargs}
    if "img_size" in kwargs:
        raise ValueError("semantic_fpn takes img_size once (the images'); the backbone's "
                         "own size is backbone_img_size")
    if "backbone_img_size" in kwargs:
        kwargs["img_size"] = kwargs.pop("backbone_img_size")
    if "num_classes" in kwargs or "features" in kwargs:
        raise ValueError("semantic_fpn takes num_classes for its classifier; the backbone "
                         "is always headless")
    img_size = common.positive_int("img_size", img_size)
    try:
        built = registry[backbone](**{"img_size": BACKBONE_IMG_SIZE, **kwargs},
                                   num_classes=0)
    except ValueError as e:
        raise ValueError(f"semantic_fpn(backbone={backbone!r}): {e}") from None
    bkw = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
    bkw = tuple((k if k != "img_size" else "backbone_img_size", v) for k, v in bkw)
    cfg = SemanticFPNConfig(backbone, built.config, bkw, img_size=img_size,
                            num_classes=common.positive_int("num_classes", num_classes), **head)
    common.check_img_size(img_size, cfg.total_stride, "the backbone's strides")
    common.check_reduction(cfg.backbone_config, img_size, img_size)
    for name in ("fpn_channels", "head_channels", "norm_groups"):
        common.positive_int(name, getattr(cfg, name))
    common.rate("head_dropout", cfg.head_dropout)
    # kept by name: builder keywords are saved beside checkpoints
    cfg = dataclasses.replace(
        cfg, logits_dtype=common.compute_dtype(cfg.logits_dtype, "logits_dtype").name)
    for name in ("fpn_channels", "head_channels"):
        if getattr(cfg, name) % cfg.norm_groups:
            raise ValueError(f"{name}={getattr(cfg, name)} is not divisible by norm_groups="
                             f"{cfg.norm_groups}; GroupNorm splits the channels evenly")
    return cfg


# -------------------------------------------------------------------- layers
#
# GroupNorm, channel dropout and exact 2x upsampling have no other user yet, so they live
# here (docs/design.md: nothing moves to nn/ before its second user).


def init_conv(kernel_size: int, d_in: int, d_out: int, *, bias: bool, init: str) -> dict:
    """mmcv's inits: ``"xavier"`` (uniform, the FPN neck), ``"kaiming"`` (normal,
    fan_out, ReLU: the head's ConvModules), ``"classifier"`` (N(0, 0.01))."""
    k = kernel_size
    if init == "xavier":
        kernel = nn.Init((k, k, d_in, d_out), "uniform",
                         math.sqrt(6.0 / (k * k * (d_in + d_out))))
    elif init == "kaiming":
        kernel = nn.normal((k, k, d_in, d_out), math.sqrt(2.0 / (k * k * d_out)))
    else:
        kernel = nn.normal((k, k, d_in, d_out), 0.01)
    return {"kernel": kernel, **({"bias": nn.Init((d_out,), "zeros")} if bias else {})}


def group_norm(p, x, groups: int):
    """GroupNorm over an NHWC map, statistics in float32."""
    b, h, w, c = x.shape
    x32 = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)).reshape(b, h, w, c)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def channel_dropout(x, rate: float, rng):
    """``nn.Dropout2d``: whole channels of each image dropped (mmseg's head dropout)."""
    if rng is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, x.shape[-1]))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def upsample_nearest(x, factor: int):
    """Nearest-neighbour upsampling by a whole factor, a repeat (PyTorch's nearest picks
    row floor(i / f), as a repeat does)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def _upsample_axis(x, factor: int, axis: int, dtype=None):
    """Bilinear upsampling by a whole ``factor`` along ``axis`` with half-pixel centres
    (PyTorch's ``align_corners=False``, edges clamped), in float32, written in ``dtype``
    (default x's). Output row f k + r reads rows k and k - 1 or k + 1 with fixed weights,
    so it is slices, multiply-adds and a reshape: no gather whose gradient would be a
    scatter, and no size-dependent constant, so symbolic sizes export."""
    dtype = dtype or x.dtype
    x = x.astype(jnp.float32)
    n = x.shape[axis]
    take = lambda a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)  # noqa: E731
    prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)  # row k - 1, clamped
    nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)  # row k + 1, clamped
    phases = []
    for r in range(factor):
        d = (r + 0.5) / factor - 0.5  # where output row f k + r falls, from row k
        other = prev if d < 0 else nxt
        phases.append(x * (1 - abs(d)) + other * abs(d))
    y = jnp.stack(phases, axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = n * factor
    return y.reshape(shape).astype(dtype)


def upsample_bilinear(x, factor: int, dtype=None):
    """An NHWC map upsampled ``factor`` times in each side, bilinear, half-pixel centres
    (PyTorch's ``interpolate(mode="bilinear", align_corners=False)``), written in
    ``dtype`` (default x's)."""
    return _upsample_axis(_upsample_axis(x, factor, 1, dtype), factor, 2, dtype)


# ---------------------------------------------------------------------- neck and head


def neck_specs(cfg: SemanticFPNConfig) -> dict:
    dims, c = cfg.backbone_config.embed_dims, cfg.fpn_channels
    specs = {}
    for i in range(LEVELS):
        specs[f"lateral{i + 1}"] = init_conv(1, dims[i], c, bias=True, init="xavier")
    for i in range(LEVELS):
        specs[f"fpn{i + 1}"] = init_conv(3, c, c, bias=True, init="xavier")
    return specs


def fpn(p, maps, *, dtype):
    """FPN neck: ``l_i = lateral_i(c_i)``; from the top, ``l_{i-1} += up(l_i)``; ``p_i =
    fpn_i(l_i)``."""
    laterals = [nn.conv(p[f"lateral{i + 1}"], m, stride=1, padding=0, dtype=dtype)
                for i, m in enumerate(maps)]
    for i in range(LEVELS - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + upsample_nearest(laterals[i], 2)
    return [nn.conv(p[f"fpn{i + 1}"], lat, stride=1, padding=1, dtype=dtype)
            for i, lat in enumerate(laterals)]


def head_convs(level: int) -> int:
    """Convs of level ``level`` (0-based, stride 4 * 2**level): one per 2x step to stride
    4, at least one."""
    return max(1, level)


def head_specs(cfg: SemanticFPNConfig) -> dict:
    specs = {}
    for i in range(LEVELS):
        level = {}
        for j in range(head_convs(i)):
            c_in = cfg.fpn_channels if j == 0 else cfg.head_channels
            level[f"conv{j}"] = init_conv(3, c_in, cfg.head_channels, bias=False,
                                          init="kaiming")
            level[f"norm{j}"] = nn.init_layer_norm(cfg.head_channels)
        specs[f"level{i + 1}"] = level
    specs["cls"] = init_conv(1, cfg.head_channels, cfg.num_classes, bias=True,
                             init="classifier")
    return specs


def semantic_head(p, feats, rng, *, cfg: SemanticFPNConfig):
    """Each level climbs to stride 4 by (3x3 conv, GroupNorm, ReLU[, 2x bilinear]) steps;
    the four are summed, channels dropped out, classified by a 1x1 conv."""
    dtype = cfg.dtype
    out = None
    for i, x in enumerate(feats):
        q = p[f"level{i + 1}"]
        for j in range(head_convs(i)):
            x = nn.conv(q[f"conv{j}"], x, stride=1, padding=1, dtype=dtype)
            x = jax.nn.relu(group_norm(q[f"norm{j}"], x, cfg.norm_groups))
            if i:
                x = upsample_bilinear(x, 2)
        out = x if out is None else out + x
    out = channel_dropout(out, cfg.head_dropout, rng)
    return nn.conv(p["cls"], out, stride=1, padding=0, dtype=dtype)


# ---------------------------------------------------------------------------- model


def param_specs(cfg: SemanticFPNConfig) -> dict:
    return {"backbone": _family(cfg.backbone_config).dense_specs(cfg.backbone_config),
            "neck": neck_specs(cfg), "head": head_specs(cfg)}


def make_apply(cfg: SemanticFPNConfig, name: str, specs: dict):
    family, bcfg = _family(cfg.backbone_config), cfg.backbone_config

    def apply(params, x, *, train: bool = False, rng=None, features: bool = False):
        """Per-pixel logits (B, H, W, num_classes) in ``logits_dtype`` (float32) at the
        input's size (any sides the total stride 32 divides); ``features=True``: the FPN's
        four 256-channel maps, strides 4 to 32, in the compute dtype. ``train=True`` (with
        ``rng``): the backbone's dropout and drop-path and the head's dropout."""
        k_backbone, k_head = (None, None) if not train or rng is None else jax.random.split(rng)
        x, rngs, rates, _ = common.apply_inputs(params, x, cfg=bcfg, specs=specs, name=name,
                                                train=train, rng=k_backbone if train else None,
                                                attention=None)
        maps = family.dense_features(params["backbone"], x, rngs, rates, cfg=bcfg)
        feats = fpn(params["neck"], maps, dtype=cfg.dtype)
        if features:
            return tuple(feats)
        logits = semantic_head(params["head"], feats, k_head, cfg=cfg)
        # From stride 4 to the input's size: the strides divide the sides, so a factor.
        stride = cfg.backbone_config.first_stride
        return upsample_bilinear(logits, stride, dtype=cfg.logits_dtype)

    return apply


# ----------------------------------------------------------- backbone checkpoints


def backbone_params(classifier_params: dict, cfg: SemanticFPNConfig) -> dict:
    """The backbone subtree from a classifier's params of the same backbone (any head,
    or none): its head dropped, and for v1 the class token and final norm."""
    out = {k: v for k, v in classifier_params.items() if k != "head"}
    if _family(cfg.backbone_config) is pvt:
        out.pop("norm", None)
        if isinstance(out.get("stage4"), dict):
            out["stage4"] = {k: v for k, v in out["stage4"].items() if k != "cls_token"}
    return out


def with_backbone(params: dict, classifier_params: dict, cfg: SemanticFPNConfig) -> dict:
    """``params`` with its backbone replaced by a classifier's (``backbone_params``)."""
    return {**params, "backbone": backbone_params(classifier_params, cfg)}


def load_backbone(source, cfg: SemanticFPNConfig) -> dict:
    """The backbone subtree from ``source``: True (the backbone's published weights,
    lucid_fn.pretrained) or a checkpoint file of the backbone classifier in any layout
    lucid_fn.weights reads (a training run's model.safetensors, .pth, .bin), or a
    pretrained weights folder; a segmentation run's model.safetensors gives its backbone."""
    import os

    from lucid_fn import weights
    from lucid_fn.pretrained import pretrained

    kw = {**dict(cfg.backbone_kwargs), "num_classes": 0}
    kw["img_size"] = kw.pop("backbone_img_size", BACKBONE_IMG_SIZE)
    if source is True or os.path.isdir(source):
        _, params = pretrained(cfg.backbone, weights=None if source is True else source, **kw)
    elif os.path.isfile(source) and weights.is_own_file(source) and \
            weights.load(source)[1].name == "semantic_fpn":
        return weights.load(source)[0]["backbone"]  # a segmentation run's: its backbone
    elif os.path.isfile(source):
        params = weights.load_torch_checkpoint(source, cfg.backbone, head="reset", **kw)
    else:
        raise ValueError(f"pretrained= takes True (the published weights of {cfg.backbone}) "
                         f"or the path of a checkpoint of {cfg.backbone}; got {source!r}"
                         + (" (no such file or folder)" if isinstance(source, str) else ""))
    return backbone_params(params, cfg)


# ------------------------------------------------------------------------- builder


def _build(img_size: int, num_classes: int, backbone: str, pretrained=None,
           **kwargs) -> Model:
    if pretrained is True and backbone in pvt.BUILDERS:
        kwargs.setdefault("flavor", "paper")  # the published v1 weights are the paper's
    cfg = make_config(backbone, img_size, num_classes, **kwargs)
    specs = param_specs(cfg)
    init = common.make_init(specs)
    if pretrained is not None and pretrained is not False:
        loaded = load_backbone(pretrained, cfg)
        common.check_params({"backbone": loaded}, {"backbone": specs["backbone"]},
                            f"semantic_fpn(backbone={backbone!r})")
        random_init = init

        def init(key) -> dict:  # noqa: F811 (the loaded backbone, a fresh neck and head)
            return {**random_init(key), "backbone": jax.tree_util.tree_map(jnp.asarray,
                                                                           loaded)}

    return Model(init, common.apply_where_it_runs(make_apply, cfg, "semantic_fpn", specs),
                 name="semantic_fpn", config=cfg)


@register_model
def semantic_fpn(img_size: int = 512, num_classes: int = 150, backbone: str = "pvt_v2_b2",
                 **kwargs) -> Model:
    """Semantic FPN on a PVT backbone (any of ``pvt_*`` and ``pvt_v2_*``): per-pixel
    logits at the input's size. Head keywords: fpn_channels (256), head_channels (128),
    head_dropout (0.1), norm_groups (32), logits_dtype ("float32"); every other keyword
    goes to the backbone's builder (embed_dims, depths, drop_path_rate, flavor, dtype,
    kernels, ...).
    ``pretrained=True`` (or a checkpoint of the backbone classifier) initialises the
    backbone from it; init's key draws the neck and head. 28,237,974 parameters on
    pvt_small (paper flavor), 29,116,502 on pvt_v2_b2, at 150 classes."""
    return _build(img_size, num_classes, backbone, **kwargs)
