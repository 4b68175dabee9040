"""lucid_fn.attention_maps: the probabilities it returns are the ones the model uses.

The main test rebuilds every stage of a model from the returned probabilities, block by
block (attention output = probs @ values, then the model's own MLP and residuals), and
compares the result with ``apply(..., features=True)``. Weights are the reference fixtures'
(perturbed far from init), so attention is far from uniform and a wrong softmax, wrong
keys or a wrong block input cannot hide inside the tolerance.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn import nn, registry, weights
from lucid_fn.attention_maps import StageAttention, attention_maps, key_map, resolve_blocks
from lucid_fn.models import pvt, pvt_v2
from lucid_fn.nn import attention as sra_lib


def load_fixture(fixtures_dir, name):
    d = np.load(fixtures_dir / f"{name}.npz")
    sd = {k[len("sd/"):]: d[k] for k in d.files if k.startswith("sd/")}
    return json.loads(str(d["config"])), sd, jnp.asarray(d["x_nchw"].transpose(0, 2, 3, 1))


def v1_case(fixtures_dir, flavor):
    """HF-layout PVT v1 weights (with output projections); the lucid flavor is the same
    network minus the projections (and with tanh GELU)."""
    config, sd, x = load_fixture(fixtures_dir, "hf_pvt_v1_paper")
    kw = dict(img_size=64, num_classes=10, embed_dims=config["hidden_sizes"],
              depths=config["depths"], num_heads=config["num_attention_heads"])
    params = weights.from_state_dict(sd, "pvt_tiny", flavor="paper", **kw)
    if flavor == "lucid":
        for i in range(4):
            del params[f"stage{i + 1}"]["blocks"]["attn"]["proj"]
    return registry["pvt_tiny"](flavor=flavor, **kw), params, x


def v2_case(fixtures_dir, fixture):
    config, sd, x = load_fixture(fixtures_dir, fixture)
    kw = dict(config, norm_eps=1e-6)
    return registry["pvt_v2_b0"](**kw), weights.from_state_dict(sd, "pvt_v2_b0", **kw), x


CASES = {"v1_lucid": lambda d: v1_case(d, "lucid"),
         "v1_paper": lambda d: v1_case(d, "paper"),
         "v2": lambda d: v2_case(d, "timm_pvt_v2_b0like"),
         "v2_linear": lambda d: v2_case(d, "timm_pvt_v2_li")}
_built = {}


def get_case(fixtures_dir, name):
    """One (model, params, images) per case for the whole module: the same Model object
    reuses attention_maps' compiled function across tests."""
    if name not in _built:
        _built[name] = CASES[name](fixtures_dir)
    return _built[name]


@pytest.fixture(params=list(CASES))
def case(request, fixtures_dir):
    return get_case(fixtures_dir, request.param)


# ------------------------------------------------------------ the reference rebuild


def embed(model, p, x, stage):
    """Tokens entering a stage's first block: the patch embedding, written out here for
    v2 (the test's own statement) and taken from the model's stage_forward for v1."""
    cfg = model.config
    if isinstance(cfg, pvt.PVTConfig):
        no_blocks = jax.tree_util.tree_map(lambda a: a[:0], p["blocks"])
        t, hw, _ = pvt.stage_forward({**p, "blocks": no_blocks}, x, None, [], cfg=cfg,
                                     stage=stage)
        return t, hw
    k = (7, 3, 3, 3)[stage]
    m = jax.lax.conv_general_dilated(x, p["patch_embed"]["proj"]["kernel"], ((4, 2, 2, 2)[stage],) * 2,
                                     [(k // 2, k // 2)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    m = m + p["patch_embed"]["proj"]["bias"]
    b, h, w, c = m.shape
    return nn.layer_norm(p["patch_embed"]["norm"], m.reshape(b, h * w, c), 1e-5), (h, w)


def block_from_probs(model, bp, t, hw, probs, stage):
    """One block's output, its attention computed as probs @ values (no softmax here)."""
    cfg = model.config
    linear = getattr(cfg, "linear", False)
    b, n, c = t.shape
    heads = cfg.num_heads[stage]
    normed = nn.layer_norm(bp["norm1"], t, cfg.norm_eps)
    kv_in = sra_lib.reduce_tokens(bp["attn"], normed, hw, linear=linear, dtype=jnp.float32)
    values = nn.linear(bp["attn"]["kv"], kv_in)[..., c:].reshape(b, -1, heads, c // heads)
    out = jnp.einsum("bhnm,bmhd->bnhd", probs, values).reshape(b, n, c)
    if "proj" in bp["attn"]:
        out = nn.linear(bp["attn"]["proj"], out)
    t = t + out
    normed = nn.layer_norm(bp["norm2"], t, cfg.norm_eps)
    if isinstance(cfg, pvt.PVTConfig):
        return t + pvt.mlp(bp["mlp"], normed, [None, None], cfg=cfg)
    return t + pvt_v2.mlp(bp["mlp"], normed, [None, None], hw=hw, cfg=cfg)


def every_blocks_probs(model, params, x) -> dict:
    """{(stage, block): probs} for every block of every stage, from attention_maps."""
    depths = model.config.depths
    out = {}
    for j in range(max(depths)):
        for i, stage in enumerate(attention_maps(model, params, x,
                                                 block=tuple(min(j, d - 1) for d in depths))):
            out[f"{i}.{stage.block}"] = stage.probs
    return out


def rebuild_features(model, params, x, probs: dict):
    """The four stage maps, block ``j`` of stage ``i`` attending with ``probs["i.j"]``."""
    cfg = model.config
    maps, stage_input = [], x
    for i in range(4):
        p = params[f"stage{i + 1}"]
        t, hw = embed(model, p, stage_input, i)
        for j in range(cfg.depths[i]):
            bp = jax.tree_util.tree_map(lambda a, j=j: a[j], p["blocks"])
            t = block_from_probs(model, bp, t, hw, probs[f"{i}.{j}"], i)
        if isinstance(cfg, pvt.PVTConfig):
            stage_input = (t[:, 1:] if i == 3 else t).reshape(t.shape[0], *hw, -1)
        else:
            stage_input = nn.layer_norm(p["norm"], t, cfg.norm_eps).reshape(t.shape[0], *hw, -1)
        maps.append(stage_input)
    return maps


# ----------------------------------------------------------------------------- tests


def test_probabilities_reproduce_the_models_features(case):
    model, params, x = case
    probs = every_blocks_probs(model, params, x)
    assert len(probs) == sum(model.config.depths)
    uniform = {k: jnp.full_like(v, 1 / v.shape[-1]) for k, v in probs.items()}

    expected = jax.jit(model.apply, static_argnames="features")(params, x, features=True)
    # jitted: eager, the rebuild's hundreds of small ops take many seconds
    rebuild = jax.jit(functools.partial(rebuild_features, model))
    ours, wrong = rebuild(params, x, probs), rebuild(params, x, uniform)
    for i, (a, ref) in enumerate(zip(ours, expected)):
        np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-4, err_msg=f"stage {i + 1}")
    # The comparison can fail: uniform attention (what a wrong softmax would give) instead
    # of these probabilities moves every stage's output far beyond the tolerance.
    for i, (a, ref) in enumerate(zip(wrong, expected)):
        assert float(jnp.abs(a - ref).max()) > 1e-2, f"stage {i + 1}"


def test_shapes_rows_and_key_maps(case):
    model, params, x = case
    cfg = model.config
    linear = getattr(cfg, "linear", False)
    v1 = isinstance(cfg, pvt.PVTConfig)
    stages = attention_maps(model, params, x)
    assert len(stages) == 4 and all(isinstance(s, StageAttention) for s in stages)
    for i, s in enumerate(stages):
        side = 64 // 4 // 2**i
        kv_side = 7 if linear else side // cfg.sr_ratios[i]
        cls = int(v1 and i == 3)
        assert s.q_hw == (side, side) and s.kv_hw == (kv_side, kv_side)
        assert s.cls_token == bool(cls) and s.block == cfg.depths[i] - 1
        assert s.probs.shape == (x.shape[0], cfg.num_heads[i], cls + side**2, cls + kv_side**2)
        assert s.probs.dtype == jnp.float32
        np.testing.assert_allclose(s.probs.sum(-1), 1.0, atol=1e-5)
        assert float(s.probs.min()) >= 0.0
        # The perturbed weights attend far from uniformly: the rebuild test can tell.
        assert float(s.probs.max()) > 2.0 / s.probs.shape[-1]


def test_key_map_picks_the_query_under_a_pixel_and_leaves_out_the_class_key(case):
    model, params, x = case
    stages = attention_maps(model, params, x)
    for s in stages:
        q_h, q_w = s.q_hw
        # pixel (63, 0): last row of patches, first column
        m = key_map(s, (63, 0), (64, 64))
        assert m.shape == (x.shape[0], s.probs.shape[1], *s.kv_hw)
        n = int(s.cls_token) + (q_h - 1) * q_w
        row = s.probs[:, :, n]
        np.testing.assert_array_equal(m.reshape(*m.shape[:2], -1), row[..., int(s.cls_token):])
        cls_weight = row[..., 0] if s.cls_token else 0.0
        np.testing.assert_allclose(m.sum((-1, -2)) + cls_weight, 1.0, atol=1e-5)


def test_composes_with_jit(fixtures_dir):
    model, params, x = get_case(fixtures_dir, "v2")
    jitted = jax.jit(lambda p, im: attention_maps(model, p, im))(params, x)
    direct = attention_maps(model, params, x)
    for a, b in zip(jitted, direct):
        assert (a.q_hw, a.kv_hw, a.block) == (b.q_hw, b.kv_hw, b.block)
        np.testing.assert_allclose(a.probs, b.probs, rtol=1e-6, atol=1e-7)


def test_scanned_and_unrolled_blocks_give_the_same_maps(fixtures_dir):
    model, params, x = get_case(fixtures_dir, "v1_paper")
    scanned = registry["pvt_tiny"](**{
        k: getattr(model.config, k) for k in ("img_size", "num_classes", "embed_dims",
                                              "depths", "num_heads", "flavor")},
        scan_blocks=True)
    assert scanned.config.scan_blocks and not model.config.scan_blocks
    for a, b in zip(attention_maps(model, params, x, block=-1),
                    attention_maps(scanned, params, x, block=-1)):
        np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5, atol=1e-6)


def test_block_index_resolution_and_errors():
    model = registry["pvt_small"](img_size=64, num_classes=0)  # depths 3, 4, 6, 3
    assert resolve_blocks(model, -1) == (2, 3, 5, 2)
    assert resolve_blocks(model, 0) == (0, 0, 0, 0)
    assert resolve_blocks(model, (0, -1, 5, -3)) == (0, 3, 5, 0)
    with pytest.raises(ValueError, match=r"out of range for stage 1 of pvt_small, which has 3 "
                                         r"blocks; valid indices there are -3\.\.2"):
        resolve_blocks(model, 3)
    with pytest.raises(ValueError, match="stage 3 .* -6..5"):
        resolve_blocks(model, (0, 0, -7, 0))
    with pytest.raises(ValueError, match="4 ints, one per stage"):
        resolve_blocks(model, (0, 0))
    with pytest.raises(ValueError, match="4 ints, one per stage"):
        resolve_blocks(model, "last")


def test_bad_model_and_bad_query_are_named():
    with pytest.raises(TypeError, match="PVT v1 or v2 model"):
        attention_maps((lambda k: {}, lambda p, x: x), {}, jnp.zeros((1, 64, 64, 3)))
    s = StageAttention(jnp.ones((1, 1, 4, 4)) / 4, block=0, q_hw=(2, 2), kv_hw=(2, 2),
                       cls_token=False)
    with pytest.raises(ValueError, match=r"outside the 64x64 image.*0 <= row < 64"):
        key_map(s, (64, 3), (64, 64))


def test_images_get_the_models_own_checks_and_bf16_gives_float32_probs():
    model = registry["pvt_v2_b0"](img_size=64, num_classes=0, dtype=jnp.bfloat16)
    params = jax.eval_shape(model.init, jax.random.key(0))
    with pytest.raises(ValueError, match="looks like NCHW"):
        jax.eval_shape(lambda p, x: attention_maps(model, p, x), params,
                       jax.ShapeDtypeStruct((1, 3, 64, 64), jnp.float32))
    with pytest.raises(ValueError, match="floating-point images"):
        attention_maps(model, jax.tree_util.tree_map(jnp.zeros_like, params),
                       np.zeros((1, 64, 64, 3), np.uint8))
    # Shapes only (no compilation): probabilities stay float32 under a bf16 model.
    out = jax.eval_shape(lambda p, x: attention_maps(model, p, x), params,
                         jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32))
    assert [s.probs.dtype for s in out] == [jnp.float32] * 4
    assert [s.kv_hw for s in out] == [(2, 3)] * 4 and out[0].q_hw == (16, 24)
