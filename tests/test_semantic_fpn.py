"""Semantic FPN on PVT backbones: parameter counts, shapes, backbone loading (gradients into
the backbone: tests/test_segmentation.py's training run)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn import count_params, registry, weights
from lucid_fn.models import pvt, pvt_v2, semantic_fpn

# A network small enough to compile in a second or two with every structural piece: four
# levels, several head convs per level, GroupNorm of several groups.
TINY = dict(num_classes=5, img_size=64, embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1],
            depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], fpn_channels=16,
            head_channels=8, norm_groups=4)


def n_params(tree) -> int:
    return count_params(tree)


def expected_neck_and_head(embed_dims, num_classes, c=256, h=128) -> int:
    """mmsegmentation's FPN(in_channels=embed_dims, out_channels=256, num_outs=4) and
    FPNHead(channels=128, feature_strides=[4, 8, 16, 32]), written out: laterals and fpn
    convs with biases; head convs without (a norm follows), 2 affine parameters per
    channel per norm; the 1x1 classifier."""
    neck = sum(d * c + c for d in embed_dims) + 4 * (9 * c * c + c)
    convs = [1, 1, 2, 3]
    head = sum(9 * c * h + (n - 1) * 9 * h * h + n * 2 * h for n in convs)
    return neck + head + h * num_classes + num_classes


@pytest.mark.parametrize("backbone", [*pvt.BUILDERS, *pvt_v2.BUILDERS])
def test_parameter_counts_and_shapes_for_every_backbone(backbone):
    kw = {"flavor": "paper"} if backbone in pvt.BUILDERS else {}
    model = registry["semantic_fpn"](backbone=backbone, num_classes=150, **kw)
    got = n_params(jax.eval_shape(model.init, jax.random.key(0)))
    classifier = registry[backbone](num_classes=0, **kw)
    shapes = jax.eval_shape(classifier.init, jax.random.key(0))
    backbone_n = n_params(shapes)
    if backbone in pvt.BUILDERS:  # the class token and the final norm are dropped
        backbone_n -= n_params(shapes["norm"]) + n_params(shapes["stage4"]["cls_token"])
    dims = classifier.config.embed_dims
    assert got == backbone_n + expected_neck_and_head(dims, 150)
    # Its output at a size other than 512, traced (nothing allocated or compiled).
    out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0)),
                         jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32))
    assert out.shape == (1, 64, 96, 150) and out.dtype == jnp.float32


def test_the_papers_counts():
    """PVT-Small + Semantic FPN 28.2M, PVT v2-B2 + Semantic FPN 29.1M (ADE20K, 150)."""
    def millions(**kw):
        model = registry["semantic_fpn"](num_classes=150, **kw)
        return round(n_params(jax.eval_shape(model.init, jax.random.key(0))) / 1e6, 1)

    assert millions(backbone="pvt_small", flavor="paper") == 28.2
    assert millions(backbone="pvt_v2_b2") == 29.1
    assert "semantic_fpn" in registry.list_models("semantic*")


@pytest.fixture(scope="module", params=["pvt_v2_b0", "pvt_tiny"])
def tiny(request):
    extra = {"sr_ratios": [2, 2, 1, 1]} if request.param == "pvt_tiny" else {}
    model = registry["semantic_fpn"](backbone=request.param, **TINY, **extra)
    params = model.init(jax.random.key(0))
    return model, params, jax.jit(model.apply)


def test_shapes_at_any_size_the_strides_divide(tiny):
    model, params, apply = tiny
    x = jax.random.uniform(jax.random.key(1), (2, 64, 96, 3))
    logits = apply(params, x)
    assert logits.shape == (2, 64, 96, 5) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # Traced only (the training tests run train=True): the shapes are static.
    feats = jax.eval_shape(lambda p, x: model.apply(p, x, features=True), params, x)
    assert [f.shape for f in feats] == [(2, 64 // s, 96 // s, 16) for s in (4, 8, 16, 32)]
    trained = jax.eval_shape(lambda p, x: model.apply(p, x, train=True,
                                                      rng=jax.random.key(2)), params, x)
    assert trained.shape == logits.shape
    with pytest.raises(ValueError, match="divisible by its total stride 32"):
        model.apply(params, jnp.zeros((1, 48, 64, 3)))
    with pytest.raises(ValueError, match="PRNG key"):
        model.apply(params, x, train=True)


def test_v1_backbone_has_no_class_token_or_final_norm(tiny):
    model, params, _ = tiny
    if model.config.backbone != "pvt_tiny":
        pytest.skip("v1 only")
    assert "norm" not in params["backbone"]
    assert "cls_token" not in params["backbone"]["stage4"]
    # Its position embedding keeps the class token's row, as the classifier's.
    assert params["backbone"]["stage4"]["pos_embed"].shape[1] == 7 * 7 + 1


def test_bf16_compute_gives_float32_logits_close_to_float32(tiny):
    model, params, apply = tiny
    if model.config.backbone != "pvt_v2_b0":
        pytest.skip("one backbone: the bf16 casts are the neck's and head's, and each "
                    "family's own tests cover its bf16 path")
    x = jax.random.uniform(jax.random.key(1), (1, 64, 64, 3))
    f32 = apply(params, x)
    bf16_model = registry["semantic_fpn"](**{**model.kwargs, "dtype": jnp.bfloat16})
    bf16 = jax.jit(bf16_model.apply)(params, x)
    assert bf16.dtype == jnp.float32
    scale = float(jnp.abs(f32).max())
    assert float(jnp.abs(bf16 - f32).max()) < 0.05 * scale


def test_bfloat16_logits_are_the_float32_ones_rounded(tiny):
    """logits_dtype="bfloat16" writes the full-size logits in half the bytes: the same
    values, rounded (once per upsampled axis); the name is what the config keeps."""
    model, params, apply = tiny
    if model.config.backbone != "pvt_v2_b0":
        pytest.skip("one backbone: the cast is the head's last step")
    x = jax.random.uniform(jax.random.key(1), (1, 64, 64, 3))
    half = registry["semantic_fpn"](**{**model.kwargs, "logits_dtype": jnp.bfloat16})
    assert half.config.logits_dtype == "bfloat16"
    assert half.config.builder_kwargs()["logits_dtype"] == "bfloat16"
    got = jax.jit(half.apply)(params, x)
    want = apply(params, x)
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2**-7, atol=2**-8 * scale)


def test_upsampling_is_pytorchs_bilinear_and_nearest():
    """Half-pixel centres, edges clamped: jax.image.resize's linear form (PyTorch's
    align_corners=False) for upsampling; nearest as PyTorch's floor(i / f)."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
    for f in (2, 4):
        want = jax.image.resize(x, (2, 5 * f, 7 * f, 3), "linear", antialias=False)
        np.testing.assert_allclose(semantic_fpn.upsample_bilinear(x, f), want, atol=1e-6)
        near = semantic_fpn.upsample_nearest(x, f)
        np.testing.assert_array_equal(near[:, 3 * f + f - 1, 2 * f], x[:, 3, 2])


@pytest.mark.parametrize("backbone", ["pvt_v2_b0", "pvt_tiny"])
def test_a_backbone_checkpoint_initialises_it_exactly(backbone, tmp_path):
    """A classifier's safetensors (what a training run writes) and its PyTorch state dict
    both give the segmentation model that classifier's backbone, bit for bit."""
    extra = {"sr_ratios": [2, 2, 1, 1]} if backbone == "pvt_tiny" else {}
    dims = {k: TINY[k] for k in ("embed_dims", "num_heads", "depths", "mlp_ratios")}
    classifier = registry[backbone](num_classes=7, img_size=224, **dims, **extra)
    cls_params = classifier.init(jax.random.key(3))
    path = tmp_path / "model.safetensors"
    weights.save(path, cls_params, backbone, num_classes=7, img_size=224, **dims, **extra)
    seg = registry["semantic_fpn"](backbone=backbone, pretrained=str(path), **TINY, **extra)
    got = seg.init(jax.random.key(0))
    want = {k: v for k, v in cls_params.items() if k not in ("head", "norm")}
    want["stage4"] = {k: v for k, v in want["stage4"].items() if k != "cls_token"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, got["backbone"], want)
    fresh = registry["semantic_fpn"](backbone=backbone, **TINY, **extra).init(jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got["head"], fresh["head"])
    # A state dict of the official layout, through weights.from_state_dict.
    sd = weights.to_state_dict(cls_params, backbone, num_classes=7, img_size=224, **dims,
                               **extra)
    loaded = weights.from_state_dict(sd, backbone, num_classes=7, img_size=224, **dims, **extra)
    params = semantic_fpn.with_backbone(fresh, loaded, seg.config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["backbone"], want)
    # The layout apply checks (traced only: nothing runs).
    jax.eval_shape(seg.apply, params, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(backbone="resnet50"), "backbone must be a PVT model name"),
    (dict(backbone="pvt_v2_b0", head_channels=10), "head_channels=10 is not divisible by "
                                                   "norm_groups=32"),
    (dict(backbone="pvt_v2_b0", img_size=500), "img_size=500 is not divisible"),
    (dict(backbone="pvt_v2_b0", embed_dim=[1]), "unknown keyword argument 'embed_dim'"),
    (dict(backbone="pvt_v2_b0", head_dropout=1.5), "head_dropout must be a probability"),
    (dict(backbone="pvt_v2_b0", logits_dtype="int8"), "logits_dtype must be a "
                                                      "floating-point dtype"),
    (dict(backbone="pvt_v2_b0", logits_dtype="half-ish"), "logits_dtype must be a "
                                                          "floating-point dtype"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        registry["semantic_fpn"](**kwargs)
