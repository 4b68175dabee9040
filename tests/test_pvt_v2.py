"""PVT v2: parameter counts equal to timm's, any size the strides divide, the v1 contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jitted

from lucid_fn import count_params, registry

COUNTS = {  # timm's pvt_v2_* at num_classes=1000
    "pvt_v2_b0": 3_666_760,
    "pvt_v2_b1": 14_009_000,
    "pvt_v2_b2": 25_362_856,
    "pvt_v2_b2_li": 22_553_512,
    "pvt_v2_b3": 45_238_696,
    "pvt_v2_b4": 62_556_072,
    "pvt_v2_b5": 81_956_008,
}

SMALL = dict(num_classes=10, embed_dims=[16, 32, 40, 64], depths=[1, 2, 1, 1])


@pytest.mark.parametrize("name", COUNTS)
def test_parameter_counts_match_timm(name, key):
    assert count_params(jax.eval_shape(registry[name]().init, key)) == COUNTS[name]


def small(linear=False, **kw):
    return jitted(registry["pvt_v2_b0"](**{**SMALL, "linear": linear, **kw}))


def images(h, w, n=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, h, w, 3))


def value_and_grad(apply, params, x):
    """The logits and the gradient of their sum, from one compiled program."""
    return jax.jit(lambda p: (apply(p, x), jax.grad(lambda q: apply(q, x).sum())(p)))(params)


@pytest.mark.parametrize("linear", [False, True])
def test_any_size_the_strides_divide_runs_with_the_same_params(linear):
    init, apply = small(linear)
    params = init(jax.random.key(0))
    for h, w in [(64, 64), (96, 64), (32, 128)]:
        logits = apply(params, images(h, w))
        assert logits.shape == (2, 10) and bool(jnp.isfinite(logits).all())
        # the maps' shapes: traced, not compiled (the logits above ran the same stages)
        feats = jax.eval_shape(lambda p, x: apply(p, x, features=True), params, images(h, w))
        assert [f.shape[1:3] for f in feats] == [(h // s, w // s) for s in (4, 8, 16, 32)]
        assert [f.shape[-1] for f in feats] == [16, 32, 40, 64]


def test_sizes_the_strides_do_not_divide_are_a_clear_error():
    init, apply = small()
    params = init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"divisible by its total stride 32; got 70x64.*96x64"):
        apply(params, images(70, 64))
    with pytest.raises(ValueError, match="img_size=100 is not divisible by the total stride 32"):
        registry["pvt_v2_b0"](img_size=100)


def test_headless_returns_pooled_features_and_head_maps_them_to_logits():
    init, apply = small()
    params = init(jax.random.key(0))
    _, headless = small(num_classes=0)
    body = {k: v for k, v in params.items() if k != "head"}
    x = images(64, 64)
    pooled = headless(body, x)
    assert pooled.shape == (2, 64)
    np.testing.assert_allclose(pooled, apply(params, x, features=True)[3].mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled @ params["head"]["kernel"] + params["head"]["bias"],
                               apply(params, x), rtol=1e-5, atol=1e-5)


def test_scan_remat_and_unrolled_agree_with_gradients():
    init, ref_apply = small(scan_blocks=False)
    params = init(jax.random.key(0))
    x = images(64, 64)
    _, apply = small(scan_blocks=True, remat=True)
    out_ref, g_ref = value_and_grad(ref_apply, params, x)
    out, g = value_and_grad(apply, params, x)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    for path, a in jax.tree_util.tree_flatten_with_path(g)[0]:
        assert float(jnp.abs(a).max()) > 0, jax.tree_util.keystr(path)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_mode_needs_rng_and_applies_drop_path():
    init, still = small()
    params = init(jax.random.key(0))
    x = images(64, 64)
    with pytest.raises(ValueError, match="train=True.*rng"):
        still(params, x, train=True)
    np.testing.assert_allclose(still(params, x, train=True, rng=jax.random.key(1)),
                               still(params, x), rtol=1e-6, atol=1e-6)
    _, apply = small(drop_path_rate=0.5, drop_rate=0.1)
    a = apply(params, x, train=True, rng=jax.random.key(1))
    assert not np.allclose(a, apply(params, x), atol=1e-4)
    np.testing.assert_array_equal(a, apply(params, x, train=True, rng=jax.random.key(1)))


def test_bfloat16_compute_is_close_to_float32():
    init, f32 = small(linear=True)
    params = init(jax.random.key(0))
    _, bf16 = small(linear=True, dtype=jnp.bfloat16)
    x = images(64, 64)
    ref, out = f32(params, x), bf16(params, x)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.05


@pytest.mark.parametrize("kwargs,message", [
    (dict(flavor="paper"), r"'flavor'.*PVT v2 has one flavor"),
    (dict(patch_size=4), r"patch_size=4.*odd and larger than its stride 4"),
    (dict(embed_dims=[32, 64, 160, 250]), r"embed_dims\[3\]=250 is not divisible"),
    (dict(img_size=32, sr_ratios=[8, 8, 2, 1]), r"sr_ratios\[1\]=8 is larger than stage 2"),
    (dict(linear="yes"), r"linear must be one of True, False"),
])
def test_builder_rejects_bad_arguments_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        registry["pvt_v2_b0"](**kwargs)


def test_apply_rejects_nchw_images():
    init, apply = small()
    with pytest.raises(ValueError, match=r"looks like NCHW.*transpose\(0, 2, 3, 1\)"):
        apply(init(jax.random.key(0)), jnp.zeros((2, 3, 64, 64)))
