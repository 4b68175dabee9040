"""lucid_fn.kernels.conv_mlp and conv_mlp_grad: PVT v2's conv MLP kernel and its backward
kernel (run here in interpret mode) against the XLA ops they replace; their tiles; where
they are used."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_xla_path_off_gpu, model_cuda_hlo

from lucid_fn import registry
from lucid_fn.kernels import conv_mlp, conv_mlp_grad
from lucid_fn.kernels.gelu import gelu
from lucid_fn.kernels.settings import ConvMlpSettings
from lucid_fn.nn import layers


def _conv_params(c, hidden, seed=0):
    """Biases far from zero, so a misplaced fc1 bias at the map's edges shows."""
    k = jax.random.split(jax.random.key(seed), 6)
    fc1 = {"kernel": jax.random.normal(k[0], (c, hidden)) * c**-0.5,
           "bias": jax.random.normal(k[1], (hidden,)) * 0.5}
    dwconv = {"kernel": jax.random.normal(k[2], (3, 3, 1, hidden)) / 3,
              "bias": jax.random.normal(k[3], (hidden,)) * 0.2}
    fc2 = {"kernel": jax.random.normal(k[4], (hidden, c)) * hidden**-0.5,
           "bias": jax.random.normal(k[5], (c,)) * 0.1}
    return fc1, dwconv, fc2


@pytest.mark.parametrize("relu,b,hw,c,hidden,tiling", [
    # not square; 9 columns in two overlapping 8-wide strips, one row per band
    (False, 2, (7, 9), 32, 128, {}),
    (True, 2, (7, 9), 32, 128, {}),
    (False, 1, (4, 4), 16, 64, {}),   # every token is at an edge
    (True, 1, (4, 4), 16, 64, {}),
    # one band walking all 5 rows; 20 columns in five 4-wide strips; 4 channel chunks
    (False, 2, (5, 20), 32, 128, {"block_x": 4, "block_h": 32, "min_programs": 1}),
    # strips that divide the width (20 = 5 x 4) with channels capped at 64
    (True, 2, (5, 20), 32, 128, {"exact_min": 4, "max_h": 64, "min_programs": 1}),
    (False, 1, (7, 9), 16, 64, {"exact_min": 2}),  # 9 = one 8-wide strip + overlap
])
def test_conv_kernel_matches_xla(relu, b, hw, c, hidden, tiling):
    """fc1's bias through the edge table (no ReLU) or per tap (with one), at edges,
    overlapping strips and bands, and every tiling the settings allow: the tiling is the
    same code for both."""
    fc1, dwconv, fc2 = _conv_params(c, hidden)
    x = jax.random.normal(jax.random.key(5), (b, hw[0] * hw[1], c))
    kw = dict(hw=hw, relu=relu)
    ref32 = conv_mlp.reference(fc1, dwconv, fc2, x, dtype=jnp.float32, **kw)
    ref16 = conv_mlp.reference(fc1, dwconv, fc2, x, dtype=jnp.bfloat16, **kw)
    out = conv_mlp.pallas_conv_mlp(fc1, dwconv, fc2, x, dtype=jnp.bfloat16, interpret=True,
                                   settings=ConvMlpSettings(**tiling), **kw)
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    err = float(jnp.abs(out.astype(jnp.float32) - ref32).max())
    err16 = float(jnp.abs(ref16.astype(jnp.float32) - ref32).max())
    # conv and GELU in float32 on chip: no worse than XLA's bf16 path
    assert err <= err16 * 1.1, (err, err16)


def _bf16_exact(a):
    """``a`` rounded to bf16 and back: inputs the kernels read without rounding."""
    return a.astype(jnp.bfloat16).astype(jnp.float32)


def _conv_preactivation(h, taps, table, hw):
    """z = the zero-padded depthwise conv of h + the edge table, float32."""
    hidden = h.shape[-1]
    z = layers.conv({"kernel": taps.reshape(3, 3, 1, hidden), "bias": jnp.zeros(hidden)},
                    h.reshape(-1, *hw, hidden), stride=1, padding=1, groups=hidden)
    cls = [[4 * (2 * (y == 0) + (y == hw[0] - 1)) + 2 * (x == 0) + (x == hw[1] - 1)
            for x in range(hw[1])] for y in range(hw[0])]
    return (z + table[np.array(cls)]).reshape(h.shape)


@pytest.mark.parametrize("b,hw,hidden,tiling", [
    (2, (7, 9), 128, {}),    # 9 columns: two 8-wide strips that overlap by 7
    (1, (4, 4), 64, {}),     # every position at an edge
    # 20 columns in five 4-wide strips, 5 rows in 3 bands of 2 (the last overlaps one row)
    (2, (5, 20), 128, {"block_x": 4, "block_h": 32, "min_programs": 30}),
    (2, (6, 6), 64, {"min_programs": 1}),
    (2, (1, 5), 64, {}),     # one row: every position in the edge table's row class 3
])
def test_conv_backward_kernels_match_the_float32_gradient(b, hw, hidden, tiling):
    """The training forward's slope GELU'(z), then the transposed-conv kernel, on bf16
    inputs against the float32 VJP of the conv + GELU on the same values: the taps'
    gradient is a float32 sum (no bf16 step), g GELU'(z) and the input gradient are one
    bf16 rounding away. Overlapping strips and bands must count each position once in the
    taps' sums."""
    settings = ConvMlpSettings(**tiling)
    k = jax.random.split(jax.random.key(2), 4)
    n = b * hw[0] * hw[1]
    h = _bf16_exact(jax.random.normal(k[0], (n, hidden)))
    taps = _bf16_exact(jax.random.normal(k[1], (9, hidden)) / 3)
    table = jax.random.normal(k[2], (16, hidden)) * 0.3
    g = _bf16_exact(jax.random.normal(k[3], (n, hidden)))
    ref = functools.partial(conv_mlp.reference_conv_gelu, hw=hw)
    dh, dtaps, dtable = jax.vjp(ref, h, taps, table)[1](g)
    # the training forward's slope: GELU'(z) beside the same activations, one rounding off
    z = _conv_preactivation(h, taps, table, hw)
    zero = jnp.zeros((hidden,), jnp.bfloat16)
    args = (h.astype(jnp.bfloat16), zero, taps.astype(jnp.bfloat16), table)
    kw = dict(batch=b, hw=hw, relu=False, settings=settings, interpret=True)
    act, slope = conv_mlp.conv_gelu(*args, slope=True, **kw)
    plain = conv_mlp.conv_gelu(*args, **kw)
    # the same arithmetic; two programs may contract a multiply-add differently (one bf16
    # step in a few elements, as the test suite compiles without LLVM's optimisations)
    np.testing.assert_allclose(act.astype(jnp.float32), plain.astype(jnp.float32),
                               rtol=2**-7, atol=0)
    assert float((act != plain).mean()) < 1e-3
    want_slope = jax.vmap(jax.vmap(jax.grad(lambda v: gelu(v, approximate=False))))(z)
    np.testing.assert_allclose(slope.astype(jnp.float32), want_slope, rtol=2**-8, atol=1e-5)
    # g GELU'(z) as the backward forms it, from the kept slope
    gz = (g * slope.astype(jnp.float32)).astype(jnp.bfloat16)
    want_gz = jax.vjp(lambda v: gelu(v, approximate=False), z)[1](g)[0]
    np.testing.assert_allclose(gz.astype(jnp.float32), want_gz, rtol=2**-7, atol=1e-5)
    # the transposed conv: from that bf16 g GELU'(z), the input and taps' gradients
    gz32 = gz.astype(jnp.float32)
    conv = lambda hh, t: _conv_preactivation(hh, t, jnp.zeros_like(table), hw)  # noqa: E731
    want_dh, want_dtaps = jax.vjp(conv, h, taps)[1](gz32)
    tiles = conv_mlp.conv_tiles(b, hw, hidden, settings, settings.grad_size)
    got_dh, got_dtaps = conv_mlp_grad.conv_transpose(
        gz, h.astype(jnp.bfloat16), taps.astype(jnp.bfloat16), batch=b, hw=hw, tiles=tiles,
        num_warps=settings.grad_warps, interpret=True)
    np.testing.assert_allclose(got_dtaps, want_dtaps, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_dh.astype(jnp.float32), want_dh, rtol=2**-8, atol=1e-5)
    want_dtable = jax.vjp(lambda t: _conv_preactivation(h, taps, t, hw), table)[1](gz32)[0]
    np.testing.assert_allclose(conv_mlp_grad.edge_class_sums(gz, batch=b, hw=hw), want_dtable,
                               rtol=1e-5, atol=1e-4)
    # and the custom VJP puts them together as the float32 VJP, up to those roundings
    got = jax.vjp(lambda *a: conv_mlp.conv_gelu_table(*a, (b, hw, settings, True)),
                  h.astype(jnp.bfloat16), taps.astype(jnp.bfloat16),
                  table)[1](g.astype(jnp.bfloat16))
    for a, w in zip(got, (dh, dtaps, dtable)):
        err = float(jnp.abs(a.astype(jnp.float32) - w).max() / jnp.abs(w).max())
        assert err < 2e-2, err


@pytest.mark.parametrize("b,hw,c,hidden", [(2, (7, 9), 32, 128), (1, (4, 4), 16, 64)])
def test_conv_mlp_gradient_through_the_kernels_is_as_close_as_xlas(b, hw, c, hidden):
    """The whole v2 MLP's gradient (fc1, the conv, fc2, the tokens) with the conv kernel
    and its backward kernel, against float32: no worse than XLA's bf16 path; the
    training forward is the inference one."""
    fc1, dwconv, fc2 = _conv_params(c, hidden)
    x = jax.random.normal(jax.random.key(5), (b, hw[0] * hw[1], c))
    cot = jax.random.normal(jax.random.key(7), x.shape)

    def grads(fn, dtype, **kw):
        loss = lambda *a: (fn(*a, hw=hw, relu=False, dtype=dtype, **kw)  # noqa: E731
                           .astype(jnp.float32) * cot).sum()
        return jax.tree.leaves(jax.grad(loss, argnums=(0, 1, 2, 3))(fc1, dwconv, fc2, x))

    want = grads(conv_mlp.reference, jnp.float32)
    xla16 = grads(conv_mlp.reference, jnp.bfloat16)
    got = grads(conv_mlp.pallas_conv_mlp, jnp.bfloat16, interpret=True)
    forward = functools.partial(conv_mlp.pallas_conv_mlp, hw=hw, relu=False,
                                dtype=jnp.bfloat16, interpret=True)
    training = jax.vjp(forward, fc1, dwconv, fc2, x)[0]  # the forward that keeps the slope
    np.testing.assert_array_equal(training, forward(fc1, dwconv, fc2, x))
    for a, r, w in zip(got, xla16, want):
        scale = float(jnp.abs(w).max())
        err = float(jnp.abs(a.astype(jnp.float32) - w).max()) / scale
        err16 = float(jnp.abs(r.astype(jnp.float32) - w).max()) / scale
        assert err <= 1.5 * err16 + 2e-3, (a.shape, err, err16)


@pytest.mark.parametrize("exact_min", [1, 4, 32])
@pytest.mark.parametrize("b", [1, 3, 256])
@pytest.mark.parametrize("hw,hidden", [((56, 56), 512), ((28, 28), 1024), ((14, 14), 1280),
                                       ((7, 7), 2048), ((5, 20), 64), ((1, 3), 64)])
def test_conv_tiles_cover_the_map_and_never_leave_it(exact_min, b, hw, hidden):
    """The kernel's stores carry no mask: every program's rows and columns must lie inside
    the map (the last strip and band start early instead), and together cover it."""
    settings = ConvMlpSettings(exact_min=exact_min)
    hh, ww = hw
    t = conv_mlp.conv_tiles(b, hw, hidden, settings)
    assert hidden % t["bc"] == 0 and t["chunks"] * t["bc"] == hidden
    assert t["bc"] <= settings.max_h
    assert t["bx"] <= ww and t["by"] <= hh and t["bx"] & (t["bx"] - 1) == 0
    covered = np.zeros(hw, bool)
    for band in range(t["bands"]):
        y0 = min(band * t["by"], hh - t["by"])
        for strip in range(t["strips"]):
            x0 = min(strip * t["bx"], ww - t["bx"])
            assert 0 <= y0 and y0 + t["by"] <= hh and 0 <= x0 and x0 + t["bx"] <= ww
            covered[y0:y0 + t["by"], x0:x0 + t["bx"]] = True
    assert covered.all()


@pytest.mark.parametrize("b,hw,hidden", [(16, (128, 128), 512), (16, (64, 64), 1024),
                                         (16, (32, 32), 1280), (128, (56, 56), 512),
                                         (2, (5, 20), 64)])
def test_backward_tiles_hold_at_most_grad_size_elements_a_row(b, hw, hidden):
    """The transposed-conv kernel keeps its rows in registers: a wide map must not widen
    its strips past ``grad_size`` elements (Semantic FPN's 128-column maps did, and the
    kernel spilled), and the tiles still cover the map from inside."""
    settings = ConvMlpSettings()
    t = conv_mlp.conv_tiles(b, hw, hidden, settings, settings.grad_size)
    assert t["bx"] * t["bc"] <= settings.grad_size
    assert t["strips"] * t["bx"] >= hw[1] and t["bands"] * t["by"] >= hw[0]
    assert t["bx"] <= hw[1] and t["by"] <= hw[0]
    # the forward's strips are the widest ones block_x allows
    assert conv_mlp.conv_tiles(b, hw, hidden, settings)["bx"] >= t["bx"]


@pytest.mark.parametrize("hw,bx", [((56, 56), 8), ((28, 28), 4), ((14, 14), 8), ((7, 7), 4)])
def test_exact_strips_divide_the_width_where_a_power_of_two_does(hw, bx):
    """56 and 28 split into 7 strips with no overlap; 14 and 7 keep the least overlap
    without going below 4 columns. Channels per program stop at 256 (128 for strips under
    8 columns)."""
    t = conv_mlp.conv_tiles(256, hw, 1024, ConvMlpSettings(exact_min=4))
    assert t["bx"] == bx and t["bc"] == (256 if bx >= 8 else 128)


def test_edge_bias_table_is_the_bias_through_a_zero_padded_conv():
    fc1, dwconv, _ = _conv_params(8, 16)
    taps = dwconv["kernel"].reshape(9, 16)
    table = conv_mlp.edge_bias_table(fc1["bias"], taps, dwconv["bias"])
    # conv of a constant map (fc1's bias everywhere), zero-padded, plus the conv's bias
    const = jnp.broadcast_to(fc1["bias"], (1, 4, 4, 16))
    want = layers.conv(dwconv, const, stride=1, padding=1, groups=16)[0]
    for y, x in [(0, 0), (0, 1), (0, 3), (1, 0), (1, 1), (3, 3), (3, 1), (2, 3)]:
        edge = (2 * (y == 0) + (y == 3)) * 4 + 2 * (x == 0) + (x == 3)
        np.testing.assert_allclose(table[edge], want[y, x], rtol=1e-5, atol=1e-6)


def test_conv_mlp_supported_only_in_bf16_for_whole_channel_tiles():
    fc1, dwconv, fc2 = _conv_params(32, 256)
    x = jnp.zeros((1, 16, 32))
    assert conv_mlp.supported(fc1, dwconv, fc2, x, jnp.bfloat16)
    assert not conv_mlp.supported(fc1, dwconv, fc2, x, jnp.float32)
    fc1, dwconv, fc2 = _conv_params(32, 96)    # 96 channels: not a whole tile of 64
    assert not conv_mlp.supported(fc1, dwconv, fc2, x, jnp.bfloat16)


@pytest.mark.parametrize("relu", [False, True])
def test_conv_mlp_off_gpu_is_the_xla_path_with_its_gradient(relu):
    """Its output comes back with fc2's bias apart (a layers.Biased): once added, the XLA
    path's value and gradient, bit for bit."""
    fc1, dwconv, fc2 = _conv_params(32, 128)
    x = jax.random.normal(jax.random.key(3), (2, 20, 32))

    def loss(fn, *a):
        y = fn(*a, hw=(4, 5), relu=relu, dtype=jnp.bfloat16)
        return layers.add_bias(y).astype(jnp.float32).sum()

    assert isinstance(conv_mlp.conv_mlp(fc1, dwconv, fc2, x, hw=(4, 5), dtype=jnp.bfloat16),
                      layers.Biased)
    assert_xla_path_off_gpu(lambda *a: loss(conv_mlp.conv_mlp, *a),
                            lambda *a: loss(conv_mlp.reference, *a), fc1, dwconv, fc2, x)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_pvt_v2_inference_uses_the_conv_kernel_on_cuda_in_bf16_only(monkeypatch, name):
    arch = dict(img_size=64, num_classes=10, depths=(1, 1, 1, 1))
    hlo = model_cuda_hlo(registry[name](dtype=jnp.bfloat16, **arch))
    assert hlo.count("lucid_fn_fused_conv_gelu") >= 4  # one per stage
    assert "lucid_fn_fused_conv" not in model_cuda_hlo(registry[name](**arch))
    assert "lucid_fn_fused_conv" not in model_cuda_hlo(
        registry[name](dtype=jnp.bfloat16, kernels="conv_mlp=off", **arch))
    monkeypatch.setenv("LUCID_FN_FUSED", "off")  # read as the model is built
    assert "lucid_fn_fused_conv" not in model_cuda_hlo(
        registry[name](dtype=jnp.bfloat16, **arch))


def test_pvt_v2_training_runs_the_conv_kernels_where_dropout_is_off():
    """At the builders' default dropout of 0, v2 training takes the conv kernel (which
    keeps GELU'(z)) and the transposed-conv kernel at every stage, and no depthwise conv
    is left to XLA; a dropout between the conv and fc2 keeps the XLA ops; b2_li (ReLU
    before the conv) takes the forward kernel with XLA's recomputed gradient."""
    arch = dict(img_size=64, num_classes=10, depths=(1, 1, 1, 1), dtype=jnp.bfloat16)
    hlo = model_cuda_hlo(registry["pvt_v2_b0"](**arch), grad=True)
    counts = {k: len(re.findall(rf'"lucid_fn_fused_{k}"', hlo))
              for k in ("conv_gelu", "conv_transpose")}
    assert counts == {"conv_gelu": 4, "conv_transpose": 4}, counts
    assert set(re.findall(r"feature_group_count = (\d+)", hlo)) == {"1"}  # no depthwise
    hlo = model_cuda_hlo(registry["pvt_v2_b0"](drop_rate=0.1, **arch), grad=True)
    assert "lucid_fn_fused_conv" not in hlo
    hlo = model_cuda_hlo(registry["pvt_v2_b2_li"](**arch), grad=True)
    assert "lucid_fn_fused_conv_gelu" in hlo and "lucid_fn_fused_conv_transpose" not in hlo
