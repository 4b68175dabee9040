"""PVT v1: parameter counts, transforms, train mode, features, dtype, scan vs unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, jitted

from lucid_fn import count_params, registry
from lucid_fn.models import common

COUNTS = {  # (lucid, paper), num_classes=1000; LUCID_PVT.md
    "pvt_tiny": (12_457_192, 13_229_288),
    "pvt_small": (23_003_048, 24_485_864),
    "pvt_medium": (41_492_648, 44_208_104),
    "pvt_large": (55_359_848, 58_999_784),
    "pvt_huge": (286_706_920, 304_945_512),
}


@pytest.mark.parametrize("name", COUNTS)
@pytest.mark.parametrize("flavor", ["lucid", "paper"])
def test_parameter_counts_match_seed_and_paper(name, flavor, key):
    shapes = jax.eval_shape(registry[name](flavor=flavor).init, key)  # allocates nothing
    assert count_params(shapes) == COUNTS[name][flavor == "paper"]


def test_flavors_differ_exactly_by_attention_projections(key):
    lucid = jax.eval_shape(registry["pvt_small"]().init, key)
    paper = jax.eval_shape(registry["pvt_small"](flavor="paper").init, key)
    assert "proj" not in lucid["stage1"]["blocks"]["attn"]
    proj = sum(count_params(paper[f"stage{i}"]["blocks"]["attn"]["proj"]) for i in range(1, 5))
    assert proj == 1_482_816 == count_params(paper) - count_params(lucid)


def tiny(**kw):
    """(init, apply), jitted, of a small pvt_tiny."""
    return jitted(registry["pvt_tiny"](**{**TINY, **kw}))


def images(n=2, size=64, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


@pytest.fixture(scope="module")
def tiny_model():
    init, apply = tiny()
    return (init, apply), init(jax.random.key(0))


def test_pvt_small_default_size_forward_under_jit(key):
    init, apply = registry["pvt_small"](num_classes=10)
    params = jax.jit(init)(key)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    logits = jax.jit(apply)(params, images(2, 224))
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


def test_init_is_deterministic_in_the_key():
    init, _ = tiny()
    a, b, c = init(jax.random.key(3)), init(jax.random.key(3)), init(jax.random.key(4))
    leaves = jax.tree_util.tree_leaves
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    assert not np.array_equal(a["stage1"]["pos_embed"], c["stage1"]["pos_embed"])


def test_grad_reaches_every_parameter(tiny_model):
    (_, apply), params = tiny_model
    y = jnp.array([1, 7])

    def loss(p):
        logits = apply(p, images())
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()

    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert bool(jnp.isfinite(g).all()), path
        assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_vmap_over_images_and_over_params(tiny_model):
    (init, apply), params = tiny_model
    x = images(3)
    batched = apply(params, x)
    per_image = jax.jit(jax.vmap(lambda im: apply(params, im[None])[0]))(x)
    np.testing.assert_allclose(per_image, batched, rtol=1e-5, atol=1e-5)

    ensemble = jax.vmap(init)(jax.random.split(jax.random.key(5), 2))
    out = jax.jit(jax.vmap(apply, in_axes=(0, None)))(ensemble, x)
    first = jax.tree_util.tree_map(lambda a: a[0], ensemble)
    assert out.shape == (2, 3, 10)
    np.testing.assert_allclose(out[0], apply(first, x), rtol=1e-5, atol=1e-5)


def test_scan_unrolled_and_remat_compute_the_same_function():
    init, ref_apply = tiny(scan_blocks=False)
    params = init(jax.random.key(0))
    x = images()

    def value_and_grad(apply):  # the logits and their sum's gradient, one program
        return jax.jit(lambda p: (apply(p, x), jax.grad(lambda q: apply(q, x).sum())(p)))(
            params)

    ref, g_ref = value_and_grad(ref_apply)
    for scan, remat in [(True, False), (True, True), (False, True)]:
        _, apply = tiny(scan_blocks=scan, remat=remat)
        out, g = value_and_grad(apply)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_mode_changes_outputs_only_through_its_rates():
    x = images()
    init, still = tiny()  # all rates 0: train=True must equal inference
    params = init(jax.random.key(0))
    np.testing.assert_allclose(
        still(params, x, train=True, rng=jax.random.key(1)), still(params, x),
        rtol=1e-6, atol=1e-6,
    )
    np.testing.assert_allclose(still(params, x, rng=jax.random.key(9)), still(params, x),
                               rtol=1e-6)  # an rng without train=True changes nothing
    # each rate on its own; drop-path also scanned, where its per-block rate is traced
    for rates, scan in [(dict(drop_rate=0.3), False), (dict(attn_drop_rate=0.3), False),
                        (dict(drop_path_rate=0.5), False), (dict(drop_path_rate=0.5), True)]:
        _, apply = tiny(scan_blocks=scan, **rates)
        ref = apply(params, x)
        a = apply(params, x, train=True, rng=jax.random.key(1))
        b = apply(params, x, train=True, rng=jax.random.key(1))
        c = apply(params, x, train=True, rng=jax.random.key(2))
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, ref, atol=1e-4), rates
        assert not np.allclose(a, c, atol=1e-4), rates


def test_drop_path_rates_rise_linearly_over_all_blocks():
    cfg = registry["pvt_huge"]().config
    per_stage = common.stage_path_rates(cfg.depths, cfg.drop_path_rate)
    assert [len(r) for r in per_stage] == [3, 10, 60, 3]
    rates = np.concatenate(per_stage)
    assert len(rates) == 76 and rates[0] == 0 and rates[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(rates), 0.02 / 75)


def test_train_without_rng_is_a_clear_error(tiny_model):
    (_, apply), params = tiny_model
    with pytest.raises(ValueError, match="train=True.*rng=jax.random.key"):
        apply(params, images(), train=True)


def test_features_are_nhwc_pyramid_maps(tiny_model):
    (_, apply), params = tiny_model
    feats = apply(params, images(), features=True)
    shapes = [f.shape for f in feats]
    assert shapes == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 40), (2, 2, 2, 64)]


def test_headless_model_returns_the_normalised_class_token(tiny_model):
    (_, apply), params = tiny_model
    headless_init, headless_apply = tiny(num_classes=0)
    body = {k: v for k, v in params.items() if k != "head"}
    assert jax.tree_util.tree_structure(headless_init(jax.random.key(0))) == \
        jax.tree_util.tree_structure(body)
    emb = headless_apply(body, images())
    assert emb.shape == (2, 64)
    logits = emb @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(logits, apply(params, images()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flavor", ["lucid", "paper"])
def test_bfloat16_compute_is_finite_and_close_to_float32(flavor):
    init, f32 = tiny(flavor=flavor)
    params = init(jax.random.key(0))
    bf16_init, bf16 = tiny(flavor=flavor, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf16_init(
        jax.random.key(0))))
    x = images()
    ref, out = f32(params, x), bf16(params, x)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel
    feats = bf16(params, x, features=True)
    assert all(f.dtype == jnp.bfloat16 for f in feats)


def test_blocks_unroll_by_default_up_to_pvt_small_depth_and_scan_beyond():
    assert registry["pvt_small"]().config.scan_blocks is False
    assert registry["pvt_medium"]().config.scan_blocks is True
    assert registry["pvt_huge"]().config.scan_blocks is True
    assert registry["pvt_huge"](scan_blocks=False).config.scan_blocks is False


@pytest.mark.parametrize("flavor", ["lucid", "paper"])
def test_init_follows_the_seeds_distributions(flavor):
    params = registry["pvt_tiny"](flavor=flavor).init(jax.random.key(0))
    fc1 = params["stage1"]["blocks"]["mlp"]["fc1"]["kernel"]  # (2, 64, 512)
    assert abs(float(fc1.std()) - 0.02) < 0.001 and abs(float(fc1.mean())) < 0.001
    assert float(jnp.abs(params["stage1"]["blocks"]["mlp"]["fc1"]["bias"]).max()) == 0
    norm = params["stage2"]["blocks"]["norm1"]
    assert bool((norm["scale"] == 1).all()) and bool((norm["bias"] == 0).all())
    conv = params["stage1"]["patch_embed"]["proj"]["kernel"]  # fan_in 4*4*3: U(+-1/sqrt(48))
    assert float(jnp.abs(conv).max()) <= 48**-0.5 and float(jnp.abs(conv).max()) > 0.9 * 48**-0.5
    assert abs(float(params["stage4"]["cls_token"].std()) - 0.02) < 0.01
    # the blocks of a stage are independent draws, not copies
    assert not np.allclose(fc1[0], fc1[1])
