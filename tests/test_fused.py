"""lucid_fn.nn.fused: the fused MLP kernel (Pallas, run here in interpret mode) against
the XLA ops it replaces; when it is used, and its gradient."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn import registry
from lucid_fn.nn import attention, fused, layers


def _params(c_in, hidden, c_out, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return ({"kernel": jax.random.normal(k[0], (c_in, hidden)) * c_in**-0.5,
             "bias": jax.random.normal(k[1], (hidden,)) * 0.1},
            {"kernel": jax.random.normal(k[2], (hidden, c_out)) * hidden**-0.5,
             "bias": jax.random.normal(k[3], (c_out,)) * 0.1})


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("shape,c_in,hidden,c_out", [
    ((2, 200), 64, 512, 64),     # rows not a multiple of the tile: padded, then cut
    ((1, 128), 128, 256, 32),    # widths differ in and out
])
def test_kernel_matches_xla_in_float32_and_beats_bf16_rounding(approximate, shape, c_in,
                                                                hidden, c_out):
    fc1, fc2 = _params(c_in, hidden, c_out)
    x = jax.random.normal(jax.random.key(9), (*shape, c_in))
    ref32 = fused.reference(fc1, fc2, x, approximate=approximate, dtype=jnp.float32)
    out = fused.pallas_mlp(fc1, fc2, x, approximate=approximate, dtype=jnp.bfloat16,
                           interpret=True)
    assert out.shape == (*shape, c_out) and out.dtype == jnp.bfloat16
    ref16 = fused.reference(fc1, fc2, x, approximate=approximate, dtype=jnp.bfloat16)
    err = float(jnp.abs(out.astype(jnp.float32) - ref32).max())
    err16 = float(jnp.abs(ref16.astype(jnp.float32) - ref32).max())
    # the hidden layer stays in float32 on chip: no worse than XLA's bf16 path
    assert err <= err16 * 1.1, (err, err16)
    assert err < 0.02 * float(jnp.abs(ref32).max())


def test_kernel_gelu_gate_is_as_close_to_erf_as_the_rational_form():
    """The kernels' Phi (A&S 7.1.26, exact reciprocal and exp2 off the GPU) against float64
    erf: no further than the rational form XLA's path uses, for GELU itself."""
    x = np.linspace(-12, 12, 48_001, dtype=np.float32)
    want = 0.5 * np.vectorize(math.erfc)(-x.astype(np.float64) / math.sqrt(2))
    phi = np.asarray(fused._phi_kernel(jnp.asarray(x), fast=False), np.float64)
    rational = np.asarray(layers.gelu_cdf_f32(jnp.asarray(x)), np.float64)
    assert np.abs(phi - want).max() < 3.5e-7
    assert np.abs(x * (phi - want)).max() <= np.abs(x * (rational - want)).max()
    tail = (x < -3) & (want > 1e-30)  # where 1 + erf cancels; before ex2 flushes to 0
    assert np.abs(phi / want - 1)[tail].max() < 0.05


def test_kernel_gelu_is_x_phi_x_in_float32():
    """GELU as max(x, 0) - |x| Phi(-|x|) (no select): x Phi(x) to float32 accuracy against
    float64, on both sides and in the tails."""
    x = np.linspace(-12, 12, 48_001, dtype=np.float32)
    want = x.astype(np.float64) * 0.5 * np.vectorize(math.erfc)(-x.astype(np.float64)
                                                                 / math.sqrt(2))
    got = np.asarray(fused._gelu_as(jnp.asarray(x), fast=False), np.float64)
    assert np.abs(got - want).max() < 4.5e-7
    tail = (x < -3) & (np.abs(want) > 1e-30)  # x Phi(x) is tiny here, relative error
    assert np.abs(got[tail] / want[tail] - 1).max() < 0.05


def test_supported_widths_and_dtypes():
    bf16 = jnp.bfloat16
    x = jnp.zeros((4, 64))
    assert fused.supported(*_params(64, 512, 64), x, bf16)
    assert not fused.supported(*_params(64, 512, 64), x, jnp.float32)   # f32: XLA
    assert not fused.supported(*_params(320, 1280, 320), x, bf16)       # not a power of 2
    assert not fused.supported(*_params(256, 1024, 256), x, bf16)       # too wide
    assert not fused.supported(*_params(64, 96, 64), x, bf16)           # hidden % chunk


def _assert_xla_path_off_gpu(loss, loss_ref, *args):
    """Off GPU a fused entry point is its XLA form: the same ``loss`` bit for bit, and the
    same gradient with respect to every argument."""
    np.testing.assert_array_equal(np.asarray(jax.jit(loss)(*args)),
                                  np.asarray(jax.jit(loss_ref)(*args)))
    argnums = tuple(range(len(args)))
    g = jax.jit(jax.grad(loss, argnums=argnums))(*args)
    g_ref = jax.jit(jax.grad(loss_ref, argnums=argnums))(*args)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_off_gpu_it_is_the_xla_path_with_its_gradient(monkeypatch):
    fc1, fc2 = _params(64, 256, 64)
    x = jax.random.normal(jax.random.key(3), (3, 50, 64))
    f = jax.jit(lambda a, b, v: fused.mlp_gelu(a, b, v, approximate=False,
                                                dtype=jnp.bfloat16))
    ref = jax.jit(lambda a, b, v: fused.reference(a, b, v, approximate=False,
                                                   dtype=jnp.bfloat16))(fc1, fc2, x)
    np.testing.assert_array_equal(np.asarray(f(fc1, fc2, x), np.float32),
                                  np.asarray(ref, np.float32))

    def loss(fn, a, b, v):
        return fn(a, b, v, approximate=False, dtype=jnp.bfloat16).astype(jnp.float32).sum()

    _assert_xla_path_off_gpu(lambda *a: loss(fused.mlp_gelu, *a),
                             lambda *a: loss(fused.reference, *a), fc1, fc2, x)


def _cuda_hlo(model, **apply_kw):
    """The model's jitted apply lowered for CUDA (no GPU needed): the kernels it uses show
    by name."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    f = jax.jit(lambda p, v: model.apply(p, v, **apply_kw))
    return f.trace(params, x).lower(lowering_platforms=("cuda",)).as_text()


def test_pvt_v1_inference_uses_the_kernel_on_cuda_in_bf16_only(monkeypatch):
    arch = dict(img_size=64, num_classes=10, flavor="paper")
    hlo = _cuda_hlo(registry["pvt_small"](dtype=jnp.bfloat16, **arch))
    # stages 1 and 2 (64 and 128 wide); 320 and 512 stay with XLA
    assert hlo.count("lucid_fn_fused_mlp") >= 2 and "xla.gpu.triton" in hlo
    assert "xla.gpu.triton" not in _cuda_hlo(registry["pvt_small"](**arch))
    monkeypatch.setenv("LUCID_FN_FUSED", "off")
    assert "xla.gpu.triton" not in _cuda_hlo(registry["pvt_small"](dtype=jnp.bfloat16, **arch))


# ------------------------------------------------------------ PVT v2: conv MLP


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


@pytest.mark.parametrize("edge_bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("b,hw,c,hidden,tiling", [
    # not square; 9 columns in two overlapping 8-wide strips, one row per band
    (2, (7, 9), 32, 128, {}),
    (1, (4, 4), 16, 64, {}),   # every token is at an edge
    # one band walking all 5 rows; 20 columns in five 4-wide strips; 4 channel chunks;
    # each row loaded when used (not prefetched)
    (2, (5, 20), 32, 128, {"block_x": 4, "block_h": 32, "min_programs": 1, "prefetch": 0}),
    # fc1 of zero-ringed tokens (rows load as plain windows, no masks); strips that divide
    # the width (20 = 5 x 4) with channels capped at 64; two rows loaded ahead; programs
    # launched channel chunks first
    (2, (5, 20), 32, 128, {"pad": True, "exact_min": 4, "max_h": 64, "prefetch": 2,
                           "chunks_first": True, "min_programs": 1}),
    (1, (7, 9), 16, 64, {"pad": True, "exact_min": 2}),  # 9 = one 8-wide strip + overlap
    # taps outside the map as selects after the loads, not predicated loads
    (2, (5, 20), 32, 128, {"masked_loads": False, "min_programs": 1}),
])
def test_conv_kernel_matches_xla(monkeypatch, edge_bias, relu, b, hw, c, hidden, tiling):
    monkeypatch.setitem(fused.CONV_BLOCKS, "edge_bias", edge_bias)
    for key, value in tiling.items():
        monkeypatch.setitem(fused.CONV_BLOCKS, key, value)
    fc1, dwconv, fc2 = _conv_params(c, hidden)
    x = jax.random.normal(jax.random.key(5), (b, hw[0] * hw[1], c))
    kw = dict(hw=hw, relu=relu)
    ref32 = fused.reference_conv_mlp(fc1, dwconv, fc2, x, dtype=jnp.float32, **kw)
    ref16 = fused.reference_conv_mlp(fc1, dwconv, fc2, x, dtype=jnp.bfloat16, **kw)
    out = fused.pallas_conv_mlp(fc1, dwconv, fc2, x, dtype=jnp.bfloat16, interpret=True, **kw)
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    err = float(jnp.abs(out.astype(jnp.float32) - ref32).max())
    err16 = float(jnp.abs(ref16.astype(jnp.float32) - ref32).max())
    # conv and GELU in float32 on chip: no worse than XLA's bf16 path
    assert err <= err16 * 1.1, (err, err16)


def _bf16_exact(a):
    """``a`` rounded to bf16 and back: inputs the kernels read without rounding."""
    return a.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("b,hw,hidden,tiling", [
    (2, (7, 9), 128, {}),    # 9 columns: two 8-wide strips that overlap by 7
    (1, (4, 4), 64, {}),     # every position at an edge
    # 20 columns in five 4-wide strips, 5 rows in 3 bands of 2 (the last overlaps one row)
    (2, (5, 20), 128, {"block_x": 4, "block_h": 32, "min_programs": 30}),
    (2, (6, 6), 64, {"chunks_first": True, "min_programs": 1}),
    (2, (1, 5), 64, {}),     # one row: every position in the edge table's row class 3
])
def test_conv_backward_kernels_match_the_float32_gradient(monkeypatch, b, hw, hidden, tiling):
    """Both backward kernels on bf16 inputs against the float32 VJP of the conv + GELU on
    the same values: the taps' gradient is a float32 sum (no bf16 step), g GELU'(z) and
    the input gradient are one bf16 rounding away. Overlapping strips and bands must count
    each position once in the taps' sums."""
    for key, value in tiling.items():
        monkeypatch.setitem(fused.CONV_BLOCKS, key, value)
    k = jax.random.split(jax.random.key(2), 4)
    n = b * hw[0] * hw[1]
    h = _bf16_exact(jax.random.normal(k[0], (n, hidden)))
    taps = _bf16_exact(jax.random.normal(k[1], (9, hidden)) / 3)
    table = jax.random.normal(k[2], (16, hidden)) * 0.3
    g = _bf16_exact(jax.random.normal(k[3], (n, hidden)))
    ref = functools.partial(fused.reference_conv_gelu, hw=hw)
    _, vjp = jax.vjp(ref, h, taps, table)
    dh, dtaps, dtable = vjp(g)
    # the first kernel alone: g GELU'(z), z from the taps and table as the forward has it
    zero = jnp.zeros((hidden,), jnp.bfloat16)
    gz = fused.conv_gelu(h.astype(jnp.bfloat16), zero, taps.astype(jnp.bfloat16), table,
                         batch=b, hw=hw, relu=False, padded=False, interpret=True,
                         g=g.astype(jnp.bfloat16))
    want_gz = jax.vjp(lambda z: layers.gelu(z, approximate=False),
                      _conv_preactivation(h, taps, table, hw))[1](g)[0]
    np.testing.assert_allclose(gz.astype(jnp.float32), want_gz, rtol=2**-8, atol=1e-5)
    # the training forward's slope: GELU'(z) beside the same activations, one rounding off
    z = _conv_preactivation(h, taps, table, hw)
    args = (h.astype(jnp.bfloat16), zero, taps.astype(jnp.bfloat16), table)
    kw = dict(batch=b, hw=hw, relu=False, padded=False, interpret=True)
    act, slope = fused.conv_gelu(*args, slope=True, **kw)
    np.testing.assert_array_equal(act, fused.conv_gelu(*args, **kw))
    want_slope = jax.vmap(jax.vmap(jax.grad(lambda v: layers.gelu(v, approximate=False))))(z)
    np.testing.assert_allclose(slope.astype(jnp.float32), want_slope, rtol=2**-8, atol=1e-5)
    # the second: from that bf16 g GELU'(z), the input and taps' gradients
    gz32 = gz.astype(jnp.float32)
    conv = lambda hh, t: _conv_preactivation(hh, t, jnp.zeros_like(table), hw)  # noqa: E731
    want_dh, want_dtaps = jax.vjp(conv, h, taps)[1](gz32)
    got_dh, got_dtaps = fused.conv_transpose(gz, h.astype(jnp.bfloat16), taps.astype(
        jnp.bfloat16), batch=b, hw=hw, interpret=True)
    np.testing.assert_allclose(got_dtaps, want_dtaps, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_dh.astype(jnp.float32), want_dh, rtol=2**-8, atol=1e-5)
    want_dtable = jax.vjp(lambda t: _conv_preactivation(h, taps, t, hw), table)[1](gz32)[0]
    np.testing.assert_allclose(fused.edge_class_sums(gz, batch=b, hw=hw), want_dtable,
                               rtol=1e-5, atol=1e-4)
    # the same kernel summing the edge table's gradient too: the other outputs unchanged
    in_kernel = fused.conv_transpose(gz, h.astype(jnp.bfloat16), taps.astype(jnp.bfloat16),
                                     batch=b, hw=hw, edge_sums=True, interpret=True)
    np.testing.assert_array_equal(in_kernel[0], got_dh)
    np.testing.assert_array_equal(in_kernel[1], got_dtaps)
    np.testing.assert_allclose(in_kernel[2], want_dtable, rtol=1e-5, atol=1e-4)
    # and the custom VJP puts them together as the float32 VJP, up to those roundings,
    # whether the backward recomputes z (slope 0) or the forward kept GELU'(z) (slope 1)
    for slope_mode in (0, 1):
        monkeypatch.setitem(fused.CONV_GRAD_BLOCKS, "slope", slope_mode)
        got = jax.vjp(lambda *a: fused.conv_gelu_table(*a, (b, hw, True)),
                      h.astype(jnp.bfloat16), taps.astype(jnp.bfloat16),
                      table)[1](g.astype(jnp.bfloat16))
        for a, w in zip(got, (dh, dtaps, dtable)):
            err = float(jnp.abs(a.astype(jnp.float32) - w).max() / jnp.abs(w).max())
            assert err < 2e-2, (slope_mode, err)


def _conv_preactivation(h, taps, table, hw):
    """z = the zero-padded depthwise conv of h + the edge table, float32."""
    hidden = h.shape[-1]
    z = fused.layers.conv({"kernel": taps.reshape(3, 3, 1, hidden), "bias": jnp.zeros(hidden)},
                          h.reshape(-1, *hw, hidden), stride=1, padding=1, groups=hidden)
    cls = [[4 * (2 * (y == 0) + (y == hw[0] - 1)) + 2 * (x == 0) + (x == hw[1] - 1)
            for x in range(hw[1])] for y in range(hw[0])]
    return (z + table[np.array(cls)]).reshape(h.shape)


@pytest.mark.parametrize("slope", [0, 1, 2])
@pytest.mark.parametrize("b,hw,c,hidden", [(2, (7, 9), 32, 128), (1, (4, 4), 16, 64)])
def test_conv_mlp_gradient_through_the_kernels_is_as_close_as_xlas(monkeypatch, slope, b, hw,
                                                                   c, hidden):
    """The whole v2 MLP's gradient (fc1, the conv, fc2, the tokens) with the conv kernel
    and its backward kernels, against float32: no worse than XLA's bf16 path, however the
    backward gets g GELU'(z) (CONV_GRAD_BLOCKS["slope"]); the forward is the same."""
    monkeypatch.setitem(fused.CONV_GRAD_BLOCKS, "slope", slope)
    fc1, dwconv, fc2 = _conv_params(c, hidden)
    x = jax.random.normal(jax.random.key(5), (b, hw[0] * hw[1], c))
    cot = jax.random.normal(jax.random.key(7), x.shape)

    def grads(fn, dtype, **kw):
        loss = lambda *a: (fn(*a, hw=hw, relu=False, dtype=dtype, **kw)  # noqa: E731
                           .astype(jnp.float32) * cot).sum()
        return jax.tree.leaves(jax.grad(loss, argnums=(0, 1, 2, 3))(fc1, dwconv, fc2, x))

    want = grads(fused.reference_conv_mlp, jnp.float32)
    xla16 = grads(fused.reference_conv_mlp, jnp.bfloat16)
    got = grads(fused.pallas_conv_mlp, jnp.bfloat16, interpret=True)
    forward = functools.partial(fused.pallas_conv_mlp, hw=hw, relu=False, dtype=jnp.bfloat16,
                                interpret=True)
    training = jax.vjp(forward, fc1, dwconv, fc2, x)[0]  # with this slope's forward
    monkeypatch.setitem(fused.CONV_GRAD_BLOCKS, "slope", 0)
    np.testing.assert_array_equal(training, forward(fc1, dwconv, fc2, x))
    for a, r, w in zip(got, xla16, want):
        scale = float(jnp.abs(w).max())
        err = float(jnp.abs(a.astype(jnp.float32) - w).max()) / scale
        err16 = float(jnp.abs(r.astype(jnp.float32) - w).max()) / scale
        assert err <= 1.5 * err16 + 2e-3, (a.shape, err, err16)


@pytest.mark.parametrize("b,hw,hidden,c_out,tiling", [
    (2, (7, 9), 128, 48, {}),           # 126 rows: a partial last tile; K = 32 + 16
    # 3 steps of 16 rows a program (90 rows: the last program's last step past them all),
    # K = 128 + 32, 64 channels
    (3, (5, 6), 64, 160, {"slope_rows": 16, "slope_steps": 3, "slope_programs": 1}),
    (2, (1, 5), 128, 16, {"slope_rows": 16}),   # one row: every position in row class 3
])
def test_slope_matmul_kernel_matches_the_float32_product(monkeypatch, b, hw, hidden, c_out,
                                                         tiling):
    """slope=2's kernel: (dy w^T) * GELU'(z) rounded once, against float32 from the same
    bf16 inputs, and its edge-class sums equal to :func:`edge_class_sums` of what it wrote
    (each row counted once, whatever the tiling)."""
    for key, value in tiling.items():
        monkeypatch.setitem(fused.CONV_GRAD_BLOCKS, key, value)
    k = jax.random.split(jax.random.key(4), 3)
    n = b * hw[0] * hw[1]
    dy = jax.random.normal(k[0], (n, c_out)).astype(jnp.bfloat16)
    w2 = (jax.random.normal(k[1], (hidden, c_out)) * c_out**-0.5).astype(jnp.bfloat16)
    s = jax.random.uniform(k[2], (n, hidden), minval=-0.1, maxval=1.1).astype(jnp.bfloat16)
    gz, dtable = fused.slope_matmul(dy, w2, s, batch=b, hw=hw, interpret=True)
    want = (dy.astype(jnp.float32) @ w2.astype(jnp.float32).T) * s.astype(jnp.float32)
    np.testing.assert_allclose(gz.astype(jnp.float32), want, rtol=2**-8, atol=1e-5)
    np.testing.assert_allclose(dtable, fused.edge_class_sums(gz, batch=b, hw=hw),
                               rtol=1e-5, atol=1e-4)
    tiles = fused.slope_tiles(n, hidden)
    assert tiles["blocks"] * tiles["steps"] * tiles["br"] >= n
    assert tiles["steps"] == tiling.get("slope_steps", 1)


@pytest.mark.parametrize("exact_min", [0, 4])
@pytest.mark.parametrize("b", [1, 3, 256])
@pytest.mark.parametrize("hw,hidden", [((56, 56), 512), ((28, 28), 1024), ((14, 14), 1280),
                                       ((7, 7), 2048), ((5, 20), 64), ((1, 3), 64)])
def test_conv_tiles_cover_the_map_and_never_leave_it(monkeypatch, exact_min, b, hw, hidden):
    """The kernel's stores carry no mask: every program's rows and columns must lie inside
    the map (the last strip and band start early instead), and together cover it."""
    monkeypatch.setitem(fused.CONV_BLOCKS, "exact_min", exact_min)
    hh, ww = hw
    t = fused.conv_tiles(b, hw, hidden)
    assert hidden % t["bc"] == 0 and t["chunks"] * t["bc"] == hidden
    assert t["bc"] <= fused.CONV_BLOCKS["max_h"]
    assert t["bx"] <= ww and t["by"] <= hh and t["bx"] & (t["bx"] - 1) == 0
    covered = np.zeros(hw, bool)
    for band in range(t["bands"]):
        y0 = min(band * t["by"], hh - t["by"])
        for strip in range(t["strips"]):
            x0 = min(strip * t["bx"], ww - t["bx"])
            assert 0 <= y0 and y0 + t["by"] <= hh and 0 <= x0 and x0 + t["bx"] <= ww
            covered[y0:y0 + t["by"], x0:x0 + t["bx"]] = True
    assert covered.all()


@pytest.mark.parametrize("hw,bx", [((56, 56), 8), ((28, 28), 4), ((14, 14), 8), ((7, 7), 4)])
def test_exact_strips_divide_the_width_where_a_power_of_two_does(monkeypatch, hw, bx):
    """56 and 28 split into 7 strips with no overlap; 14 and 7 keep the least overlap
    without going below 4 columns. Channels per program stop at 256 (128 for strips under
    8 columns)."""
    monkeypatch.setitem(fused.CONV_BLOCKS, "exact_min", 4)
    t = fused.conv_tiles(256, hw, 1024)
    assert t["bx"] == bx and t["bc"] == (256 if bx >= 8 else 128)


def test_edge_bias_table_is_the_bias_through_a_zero_padded_conv():
    fc1, dwconv, _ = _conv_params(8, 16)
    taps = dwconv["kernel"].reshape(9, 16)
    table = fused.edge_bias_table(fc1["bias"], taps, dwconv["bias"])
    # conv of a constant map (fc1's bias everywhere), zero-padded, plus the conv's bias
    const = jnp.broadcast_to(fc1["bias"], (1, 4, 4, 16))
    want = fused.layers.conv(dwconv, const, stride=1, padding=1, groups=16)[0]
    for y, x in [(0, 0), (0, 1), (0, 3), (1, 0), (1, 1), (3, 3), (3, 1), (2, 3)]:
        edge = (2 * (y == 0) + (y == 3)) * 4 + 2 * (x == 0) + (x == 3)
        np.testing.assert_allclose(table[edge], want[y, x], rtol=1e-5, atol=1e-6)


def test_conv_mlp_supported_only_in_bf16_for_whole_channel_tiles():
    fc1, dwconv, fc2 = _conv_params(32, 256)
    x = jnp.zeros((1, 16, 32))
    assert fused.supported_conv_mlp(fc1, dwconv, fc2, x, jnp.bfloat16)
    assert not fused.supported_conv_mlp(fc1, dwconv, fc2, x, jnp.float32)
    fc1, dwconv, fc2 = _conv_params(32, 96)    # 96 channels: not a whole tile of 64
    assert not fused.supported_conv_mlp(fc1, dwconv, fc2, x, jnp.bfloat16)


def test_conv_mlp_off_gpu_is_the_xla_path_with_its_gradient():
    fc1, dwconv, fc2 = _conv_params(32, 128)
    x = jax.random.normal(jax.random.key(3), (2, 20, 32))

    def loss(fn, *a):
        return fn(*a, hw=(4, 5), relu=False, dtype=jnp.bfloat16).astype(jnp.float32).sum()

    _assert_xla_path_off_gpu(lambda *a: loss(fused.conv_mlp, *a),
                             lambda *a: loss(fused.reference_conv_mlp, *a), fc1, dwconv, fc2, x)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_pvt_v2_inference_uses_the_conv_kernel_on_cuda_in_bf16_only(monkeypatch, name):
    arch = dict(img_size=64, num_classes=10, depths=(1, 1, 1, 1))
    hlo = _cuda_hlo(registry[name](dtype=jnp.bfloat16, **arch))
    assert hlo.count("lucid_fn_fused_conv_gelu") >= 4  # one per stage
    assert "lucid_fn_fused_conv" not in _cuda_hlo(registry[name](**arch))
    monkeypatch.setenv("LUCID_FN_FUSED", "off")
    assert "lucid_fn_fused_conv" not in _cuda_hlo(
        registry[name](dtype=jnp.bfloat16, **arch))


def _cuda_grad_hlo(model, **kw):
    """The HLO of the model's training gradient, lowered for CUDA (no GPU needed)."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    loss = lambda p, v: model.apply(p, v, train=True, rng=jax.random.key(1)).sum()  # noqa
    return jax.jit(jax.grad(loss)).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()


def test_pvt_v2_training_runs_the_conv_kernels_where_dropout_is_off():
    """At the builders' default dropout of 0, v2 training takes the conv kernel and its
    backward kernels at every stage and no depthwise conv is left to XLA; a dropout
    between the conv and fc2 keeps the XLA ops; b2_li (ReLU before the conv) takes the
    forward kernel with XLA's recomputed gradient."""
    arch = dict(img_size=64, num_classes=10, depths=(1, 1, 1, 1), dtype=jnp.bfloat16)
    hlo = _cuda_grad_hlo(registry["pvt_v2_b0"](**arch))
    counts = {k: len(re.findall(rf'"lucid_fn_fused_{k}"', hlo))
              for k in ("conv_gelu", "conv_gelu_grad", "conv_transpose", "slope_matmul")}
    # slope 1 (default): the forward keeps GELU'(z), so no kernel recomputes it
    assert counts == {"conv_gelu": 4, "conv_gelu_grad": 0, "conv_transpose": 4,
                      "slope_matmul": 0}, counts
    assert set(re.findall(r"feature_group_count = (\d+)", hlo)) == {"1"}  # no depthwise
    for slope, kernel in ((0, "conv_gelu_grad"), (2, "slope_matmul")):
        with pytest.MonkeyPatch.context() as m:
            m.setitem(fused.CONV_GRAD_BLOCKS, "slope", slope)
            hlo_s = _cuda_grad_hlo(registry["pvt_v2_b0"](**arch))
        assert len(re.findall(rf'"lucid_fn_fused_{kernel}"', hlo_s)) == 4, (slope, kernel)
        assert len(re.findall(r'"lucid_fn_fused_conv_transpose"', hlo_s)) == 4, slope
    hlo = _cuda_grad_hlo(registry["pvt_v2_b0"](drop_rate=0.1, **arch))
    assert "lucid_fn_fused_conv" not in hlo
    hlo = _cuda_grad_hlo(registry["pvt_v2_b2_li"](**arch))
    assert "lucid_fn_fused_conv_gelu" in hlo and "lucid_fn_fused_conv_transpose" not in hlo


# ------------------------------------------------------------ SRA attention core


def _qkv(b, n, m, heads, d, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (b, n, heads, d)) * 2,   # peaked softmax rows too
            jax.random.normal(k[1], (b, m, heads, d)),
            jax.random.normal(k[2], (b, m, heads, d)))


def _bf16(*arrays):
    return tuple(a.astype(jnp.bfloat16) for a in arrays)


@pytest.mark.parametrize("b,n,m,heads,d,scale", [
    (2, 200, 49, 2, 32, None),  # 200 queries: the last tile of 128 is partial
    (1, 64, 7, 1, 64, 0.3),     # few keys (padded to 16 in the kernel), an explicit scale
    (2, 50, 50, 4, 16, None),   # PVT v1's last stage: class token, nothing reduced
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_kernel_matches_xla(b, n, m, heads, d, scale, with_bias):
    q, k, v = _bf16(*_qkv(b, n, m, heads, d))
    bias = jax.random.normal(jax.random.key(9), (heads, d)).astype(jnp.bfloat16)
    out = fused.pallas_attention(q, k, v, bias if with_bias else None, scale=scale,
                                 dtype=jnp.bfloat16, interpret=True)
    if with_bias:  # the kernel adds it as the linear layer would have
        q = layers.add_bias(layers.Biased(q, bias))
    assert out.shape == (b, n, heads, d) and out.dtype == jnp.bfloat16
    ref32 = attention.attend_xla(*(a.astype(jnp.float32) for a in (q, k, v)), scale=scale,
                                 dtype=jnp.float32)
    ref16 = attention.attend_xla(q, k, v, scale=scale, dtype=jnp.bfloat16)
    err = float(jnp.abs(out.astype(jnp.float32) - ref32).max())
    err16 = float(jnp.abs(ref16.astype(jnp.float32) - ref32).max())
    assert err <= err16 * 1.1, (err, err16)  # no worse than XLA's bf16 path
    # every head read from and written to its own slice: a wrong head is far off
    assert err < 0.05 * float(jnp.abs(ref32).max())


@pytest.mark.parametrize("b,n,m,heads,d,scale,min_programs", [
    (2, 200, 49, 2, 32, None, 8),  # 4 tiles of 64 queries, 2 per program, the last partial
    (1, 64, 7, 1, 64, 0.3, 1),     # few keys (padded to 16), one program, an explicit scale
    (2, 50, 50, 4, 16, None, 1),   # PVT v1's last stage
    (1, 300, 49, 1, 64, None, 2),  # 5 tiles over 2 programs: one walks past the queries
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_grad_kernel_no_worse_than_xla(monkeypatch, b, n, m, heads, d, scale,
                                                 min_programs, with_bias):
    """The backward kernel's dq, dk, dv (and the queries' bias's gradient) against the
    float32 VJP: no further off than XLA's bf16 gradient of the same attention, however
    the queries split over programs."""
    monkeypatch.setitem(fused.ATTN_GRAD_BLOCKS, "min_programs", min_programs)
    q, k, v = _bf16(*_qkv(b, n, m, heads, d))
    g, bias = _bf16(jax.random.normal(jax.random.key(8), q.shape),
                    jax.random.normal(jax.random.key(9), (heads, d)))
    args = (q, k, v, bias) if with_bias else (q, k, v)

    def ref(dtype):
        return lambda q, k, v, *qb: attention.attend_xla(
            layers.Biased(q, qb[0]) if qb else q, k, v, scale=scale, dtype=dtype)

    got = fused.pallas_attention_grad(q, k, v, g, bias if with_bias else None, scale=scale,
                                      dtype=jnp.bfloat16, interpret=True)
    want16 = jax.vjp(ref(jnp.bfloat16), *args)[1](g)
    want32 = jax.vjp(ref(jnp.float32), *(a.astype(jnp.float32) for a in args))[1](
        g.astype(jnp.float32))
    assert len(got) == len(args)
    for a, x, w in zip(got, want16, want32):
        assert a.shape == x.shape and a.dtype == x.dtype
        err = float(jnp.abs(a.astype(jnp.float32) - w).max())
        err16 = float(jnp.abs(x.astype(jnp.float32) - w).max())
        scale_w = float(jnp.abs(w).max())
        step = 2.0 ** (np.floor(np.log2(scale_w)) - 7)  # bf16's spacing at the largest
        assert err <= max(err16 * 1.1, step), (err, err16, step)  # no worse than XLA
        assert err < 0.02 * scale_w  # a wrong head or key is far off


def test_attention_grad_tiles_fill_the_gpu_and_cover_the_queries():
    for b, heads, n in [(128, 1, 3136), (128, 2, 784), (128, 5, 196), (128, 8, 49),
                        (1, 1, 3136), (2, 2, 200)]:
        parts, blocks = fused.attention_grad_tiles(b, heads, n)
        tiles = -(-n // fused.ATTN_GRAD_BLOCKS["block_q"])
        assert parts * blocks >= tiles and (parts - 1) * blocks < tiles  # none idle
        # no program walks more tiles than an even split over min_programs would give it
        assert blocks <= -(-tiles * b * heads // fused.ATTN_GRAD_BLOCKS["min_programs"])


@pytest.mark.parametrize("own", [True, False])
def test_attention_gradient_on_cuda_is_the_backward_kernel(monkeypatch, own):
    """Lowered for CUDA, the attention's gradient is the backward kernel's (XLA's
    recomputed form with ``own`` off); off GPU it stays XLA's (the test above)."""
    monkeypatch.setitem(fused.ATTN_GRAD_BLOCKS, "own", own)
    args = _bf16(*_qkv(2, 30, 9, 2, 32))

    def loss(*a):
        return attention.attend(*a, scale=None, dtype=jnp.bfloat16, attn_drop=0.0,
                                rng=None).astype(jnp.float32).sum()

    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "lucid_fn_fused_attention" in hlo.replace("lucid_fn_fused_attention_grad", "")
    assert ("lucid_fn_fused_attention_grad" in hlo) == own


def test_attention_supported_only_in_bf16_for_small_key_sets():
    bf16 = jnp.bfloat16
    qkv = _qkv(1, 8, 49, 2, 32)
    assert fused.supported_attention(*_bf16(*qkv), bf16)
    assert not fused.supported_attention(*_bf16(*qkv), jnp.float32)
    assert not fused.supported_attention(*qkv, bf16)                        # f32 inputs
    assert not fused.supported_attention(*_bf16(*_qkv(1, 8, 196, 2, 32)), bf16)  # keys
    assert not fused.supported_attention(*_bf16(*_qkv(1, 8, 49, 2, 40)), bf16)   # d


def test_attention_off_gpu_is_the_xla_path_with_its_gradient():
    args = _bf16(*_qkv(2, 30, 9, 2, 32))

    def loss(fn, *a):
        return fn(*a).astype(jnp.float32).sum()

    fused_fn = lambda *a: attention.attend(*a, scale=None, dtype=jnp.bfloat16,  # noqa: E731
                                           attn_drop=0.0, rng=None)
    xla_fn = lambda *a: attention.attend_xla(*a, scale=None, dtype=jnp.bfloat16)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jit(fused_fn)(*args), np.float32),
                                  np.asarray(jax.jit(xla_fn)(*args), np.float32))
    _assert_xla_path_off_gpu(lambda *a: loss(fused_fn, *a), lambda *a: loss(xla_fn, *a), *args)


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b0"])
def test_kernels_run_in_training_only_where_dropout_is_off(monkeypatch, name):
    """With dropout rates of 0 (the builders' default) the training forward uses the
    attention kernel (and v1's MLP kernel); a dropout between their ops keeps XLA."""
    arch = dict(img_size=64, num_classes=10, depths=(1, 1, 1, 1))
    if name == "pvt_small":
        arch["flavor"] = "paper"
    train = dict(train=True, rng=jax.random.key(1))
    hlo = _cuda_hlo(registry[name](dtype=jnp.bfloat16, **arch), **train)
    assert hlo.count("lucid_fn_fused_attention") >= 4
    assert ("lucid_fn_fused_mlp" in hlo) == (name == "pvt_small")
    hlo = _cuda_hlo(registry[name](dtype=jnp.bfloat16, attn_drop_rate=0.1, drop_rate=0.1,
                                   **arch), **train)
    assert "lucid_fn_fused" not in hlo
    hlo = _cuda_hlo(registry[name](dtype=jnp.bfloat16, attn_drop_rate=0.1, drop_rate=0.1,
                                   **arch))  # inference: no dropout
    assert "lucid_fn_fused_attention" in hlo
    monkeypatch.setenv("LUCID_FN_FUSED", "off")
    assert "lucid_fn_fused" not in _cuda_hlo(registry[name](dtype=jnp.bfloat16, **arch),
                                             **train)


# ------------------------------------------------------------ residual add + LayerNorm


def _norm_inputs(shape, seed=0):
    """A residual stream with an offset and a spread far from LayerNorm's output, so that
    a wrong mean or variance shows."""
    k = jax.random.split(jax.random.key(seed), 4)
    c = shape[-1]
    p = {"scale": 1 + 0.2 * jax.random.normal(k[0], (c,)),
         "bias": 0.2 * jax.random.normal(k[1], (c,))}
    x = (3 * jax.random.normal(k[2], shape) + 1).astype(jnp.bfloat16)
    y = jax.random.normal(k[3], shape).astype(jnp.bfloat16)
    return p, x, y


@pytest.mark.parametrize("shape", [
    (2, 200, 64),   # 400 rows: 16 per program
    (8, 49, 128),   # 392 rows: 8 per program
    (4, 50, 512),   # v1's last stage, class token included
    (2, 196, 320),  # stage 3 of pvt_small and b2: a 512-wide tile, columns past 320 masked
    (2, 196, 160),  # stage 3 of b0: 256 wide
    (2, 100, 48),   # not a power of 2 below 64: 8 rows of a 64-wide tile, a quarter masked
])
@pytest.mark.parametrize("biased", [False, True])
def test_add_norm_kernel_matches_xla(shape, biased):
    """With ``biased`` the branch comes as a ``layers.Biased`` (the linear layer's bias not
    yet added): the kernel adds it with the same rounding as the linear layer."""
    p, x, y = _norm_inputs(shape)
    if biased:
        y = layers.Biased(y, (0.5 * jax.random.normal(jax.random.key(9), shape[-1:])
                              ).astype(jnp.bfloat16))
    s, n = fused.pallas_add_layer_norm(p, x, y, eps=1e-6, interpret=True)
    s_ref, n_ref = fused.reference_add_layer_norm(p, x, y, eps=1e-6)
    assert s.dtype == n.dtype == jnp.bfloat16 and s.shape == n.shape == x.shape
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
    # the norm of the same rounded sum, in float32: only the reductions' order differs
    exact = layers.layer_norm(p, s.astype(jnp.float32), 1e-6)
    err = float(jnp.abs(n.astype(jnp.float32) - exact).max())
    err_xla = float(jnp.abs(n_ref.astype(jnp.float32) - exact).max())
    assert err <= err_xla * 1.1, (err, err_xla)
    assert float((n != n_ref).mean()) < 1e-3
    # a stage's closing norm: the same norm, no sum written
    n_only = fused.pallas_add_layer_norm(p, x, y, eps=1e-6, keep_sum=False, interpret=True)
    np.testing.assert_array_equal(np.asarray(n_only, np.float32), np.asarray(n, np.float32))


@pytest.mark.parametrize("shape", [(2, 200, 64), (2, 196, 320), (4, 50, 512)])
def test_norm_norm_kernel_matches_xla(shape):
    """A patch embedding's norm and norm1 in one kernel (a 512-wide masked tile at 320):
    both norms as XLA's, but for the reductions' order."""
    p_a, x, _ = _norm_inputs(shape)
    p, _, _ = _norm_inputs(shape, seed=1)
    kw = dict(eps_a=1e-5, eps=1e-6)
    t, h = fused.pallas_norm_layer_norm(p_a, p, x, **kw, interpret=True)
    t_ref, h_ref = fused.reference_norm_layer_norm(p_a, p, x, **kw)
    assert t.dtype == h.dtype == jnp.bfloat16 and t.shape == h.shape == x.shape
    for out, ref, exact in ((t, t_ref, layers.layer_norm(p_a, x.astype(jnp.float32), 1e-5)),
                            (h, h_ref, layers.layer_norm(p, t.astype(jnp.float32), 1e-6))):
        err = float(jnp.abs(out.astype(jnp.float32) - exact).max())
        err_xla = float(jnp.abs(ref.astype(jnp.float32) - exact).max())
        assert err <= err_xla * 1.1, (err, err_xla)
    assert float((t != t_ref).mean()) < 1e-3


@pytest.mark.parametrize("shape", [(3, 3136, 64), (2, 784, 128), (2, 196, 320)])
def test_norm_norm_kernel_with_a_position_embedding_matches_xla(shape):
    """PVT v1's opening: the patch embedding's norm plus the position embedding, then
    norm1. pos repeats every N rows: blocks of rows that divide N (64 and 128 wide), and
    rows taken modulo N in the masked 512-wide tile at 320."""
    p_a, x, _ = _norm_inputs(shape)
    p, _, _ = _norm_inputs(shape, seed=1)
    pos = jax.random.normal(jax.random.key(7), (1, *shape[1:]), jnp.float32)
    assert fused.supported_norm_layer_norm(x, pos)
    kw = dict(eps_a=1e-5, eps=1e-6)
    t, h = fused.pallas_norm_layer_norm(p_a, p, x, pos, **kw, interpret=True)
    t_ref, h_ref = fused.reference_norm_layer_norm(p_a, p, x, pos, **kw)
    assert t.shape == h.shape == x.shape and t.dtype == jnp.bfloat16
    # the sum rounds as XLA's: t is XLA's but where the norm before it differs by an ulp
    assert float((t != t_ref).mean()) < 1e-3
    exact = layers.layer_norm(p, t.astype(jnp.float32), 1e-6)
    err = float(jnp.abs(h.astype(jnp.float32) - exact).max())
    err_xla = float(jnp.abs(h_ref.astype(jnp.float32) - exact).max())
    assert err <= err_xla * 1.1, (err, err_xla)
    # a position embedding of the wrong length: the XLA path, not a wrong broadcast
    assert not fused.supported_norm_layer_norm(x, pos[:, 1:])


def test_norm_norm_off_gpu_is_the_xla_path_with_its_gradient():
    p_a, x, _ = _norm_inputs((2, 200, 64))
    p, _, _ = _norm_inputs((2, 200, 64), seed=1)

    def loss(fn, p_a, p, x):
        t, h = fn(p_a, p, x, eps_a=1e-5, eps=1e-6)
        return (t.astype(jnp.float32) ** 2).sum() + (h.astype(jnp.float32) * x).sum()

    _assert_xla_path_off_gpu(lambda *a: loss(fused.norm_layer_norm, *a),
                             lambda *a: loss(fused.reference_norm_layer_norm, *a), p_a, p, x)


def test_add_norm_supported_only_in_bf16_for_whole_tiles():
    p, x, y = _norm_inputs((2, 200, 64))
    assert fused.supported_add_layer_norm(x, y)
    assert not fused.supported_add_layer_norm(x.astype(jnp.float32), y.astype(jnp.float32))
    assert not fused.supported_add_layer_norm(x, y.astype(jnp.float32))
    _, x, y = _norm_inputs((2, 12, 320))          # masked 512-wide tiles, 8 rows each
    assert fused.supported_add_layer_norm(x, y)
    _, x, y = _norm_inputs((2, 8, 1100))          # its tile (2048) would not fit
    assert not fused.supported_add_layer_norm(x, y)
    _, x, y = _norm_inputs((2, 10, 320))          # 20 rows: no tile of 8 rows divides it
    assert not fused.supported_add_layer_norm(x, y)
    _, x, y = _norm_inputs((3, 49, 128))          # 147 rows: no tile of 8 rows divides it
    assert not fused.supported_add_layer_norm(x, y)


def test_add_norm_off_gpu_is_the_xla_path_with_its_gradient():
    p, x, y = _norm_inputs((2, 200, 64))

    def loss(fn, p, x, y):
        s, n = fn(p, x, y, eps=1e-6)
        return (s.astype(jnp.float32) ** 2).sum() + (n.astype(jnp.float32) * x).sum()

    _assert_xla_path_off_gpu(lambda *a: loss(fused.add_layer_norm, *a),
                             lambda *a: loss(fused.reference_add_layer_norm, *a), p, x, y)


def test_add_norm_kernel_in_training_has_the_xla_gradient():
    """With NORM_BLOCKS["train"] the training forward runs the kernel (here interpreted)
    and its backward is XLA's VJP at the same inputs: the gradients are XLA's, bit for
    bit, at a masked width too."""
    p, x, y = _norm_inputs((2, 196, 320))
    kernel = functools.partial(fused.pallas_add_layer_norm, eps=1e-6, interpret=True)
    ref = functools.partial(fused.reference_add_layer_norm, eps=1e-6)

    def loss(fn, p, x, y):
        s, n = fn(p, x, y)
        return (s.astype(jnp.float32) ** 2).sum() + (n.astype(jnp.float32) * x).sum()

    argnums = (0, 1, 2)
    g = jax.jit(jax.grad(lambda *a: loss(
        lambda *b: fused.kernel_with_xla_grad(kernel, ref, *b), *a), argnums))(p, x, y)
    g_ref = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums))(p, x, y)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _norm_cotangents(shape, keep_sum):
    k = jax.random.split(jax.random.key(5), 2)
    gs, gn = (jax.random.normal(a, shape).astype(jnp.bfloat16) for a in k)
    return (gs, gn) if keep_sum else gn


@pytest.mark.parametrize("shape", [
    (2, 200, 64),   # 16 rows per program, 25 programs' partial sums
    (4, 50, 512),   # v1's last stage
    (2, 196, 320),  # a 512-wide masked tile: the statistics and sums over 320 columns
    (2, 100, 48),   # a 64-wide tile, a quarter masked
])
@pytest.mark.parametrize("keep_sum", [True, False])
def test_add_norm_grad_kernel_no_worse_than_xla(shape, keep_sum):
    """The backward kernel's dx, dy, dscale and dbias against the float32 VJP of the same
    add+norm: no further off than XLA's bf16 gradient, from the sum the forward kept
    (``keep_sum``) or recomputed from x and y (a stage's closing norm)."""
    p, x, y = _norm_inputs(shape)
    g = _norm_cotangents(shape, keep_sum)
    s, _ = fused.reference_add_layer_norm(p, x, y, eps=1e-6)
    saved = (s,) if keep_sum else (x, y)
    got = fused.pallas_add_layer_norm_grad(p, saved, g, eps=1e-6, keep_sum=keep_sum,
                                           interpret=True)
    want16 = fused._xla_add_norm_grad(p, saved, g, eps=1e-6, keep_sum=keep_sum)
    f32 = functools.partial(jax.tree.map, lambda a: a.astype(jnp.float32))
    ref = functools.partial(fused.reference_add_layer_norm, eps=1e-6, keep_sum=keep_sum)
    want32 = jax.vjp(ref, *f32((p, x, y)))[1](f32(g))
    assert jax.tree.structure(got) == jax.tree.structure(want16)
    for a, b, w in zip(jax.tree.leaves(got), jax.tree.leaves(want16), jax.tree.leaves(want32)):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = float(jnp.abs(a.astype(jnp.float32) - w).max())
        err16 = float(jnp.abs(b.astype(jnp.float32) - w).max())
        scale_w = float(jnp.abs(w).max())
        step = 2.0 ** (np.floor(np.log2(scale_w)) - 7)  # bf16's spacing at the largest
        assert err <= max(err16 * 1.1, step), (err, err16, step)
        assert err < 0.01 * scale_w  # a wrong row's statistics or a lost column is far off


@pytest.mark.parametrize("keep_sum", [True, False])
def test_add_norm_grad_kernel_wired_into_the_vjp(monkeypatch, keep_sum):
    """The custom VJP hands the backward kernel what the forward kept and the cotangents in
    order: with the kernel (interpreted) in the XLA branch's place, jax.grad through
    add_layer_norm is the reference's gradient up to the kernel's rounding."""
    monkeypatch.setattr(fused, "_xla_add_norm_grad", functools.partial(
        fused.pallas_add_layer_norm_grad, interpret=True))
    p, x, y = _norm_inputs((2, 196, 320))
    w = jax.random.normal(jax.random.key(4), x.shape)

    def loss(fn, p, x, y):
        out = fn(p, x, y, eps=1e-6, keep_sum=keep_sum)
        s, n = out if keep_sum else (None, out)
        extra = 0.0 if s is None else (s.astype(jnp.float32) ** 2).sum()
        return extra + (n.astype(jnp.float32) * w).sum()

    argnums = (0, 1, 2)
    for forward_kernel in (True, False):
        fn = functools.partial(fused.add_layer_norm, forward_kernel=forward_kernel)
        g = jax.grad(lambda *a: loss(fn, *a), argnums)(p, x, y)
        g_ref = jax.grad(lambda *a: loss(fused.reference_add_layer_norm, *a), argnums)(p, x, y)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_allclose(a, b, rtol=0.02, atol=0.02 * np.abs(b).max())


@pytest.mark.parametrize("keep_sum", [True, False])
def test_add_norm_with_its_grad_kernel_off_gpu_is_the_xla_gradient(keep_sum):
    """Off GPU the custom VJP's XLA branch (the LayerNorm's VJP at the kept sum, or the
    reference's at x and y) is XLA's own gradient of the reference, bit for bit."""
    p, x, y = _norm_inputs((2, 200, 64))

    def loss(fn, p, x, y):
        out = fn(p, x, y, eps=1e-6, keep_sum=keep_sum)
        s, n = out if keep_sum else (x, out)
        return (s.astype(jnp.float32) ** 2).sum() + (n.astype(jnp.float32) * x).sum()

    fn = functools.partial(fused.add_layer_norm, forward_kernel=False)
    _assert_xla_path_off_gpu(lambda *a: loss(fn, *a),
                             lambda *a: loss(fused.reference_add_layer_norm, *a), p, x, y)


@pytest.mark.parametrize("grad", [True, False])
def test_training_on_cuda_uses_the_add_norm_grad_kernel(monkeypatch, grad):
    """Lowered for CUDA, v2's training step takes the add+norms' gradients from the
    backward kernel (its forward stays XLA's), every stage width included (b0: 32, 64, the
    masked 160 and 256); with NORM_BLOCKS["grad"] off, XLA's."""
    monkeypatch.setitem(fused.NORM_BLOCKS, "grad", grad)
    model = registry["pvt_v2_b0"](dtype=jnp.bfloat16, img_size=64, num_classes=10,
                                  depths=(1, 1, 1, 1))
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)

    def loss(p, v):
        return model.apply(p, v, train=True, rng=jax.random.key(1)).astype(jnp.float32).sum()

    hlo = jax.jit(jax.grad(loss)).trace(params, x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert set(re.findall(r"lucid_fn_fused_add_norm\w*", hlo)) <= {
        "lucid_fn_fused_add_norm_grad"}  # no forward kernel
    # per stage (one block each): norm2's and the closing norm's
    assert hlo.count('name = "lucid_fn_fused_add_norm_grad"') == (8 if grad else 0)


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b0"])
def test_branches_hand_their_output_bias_to_the_add_norm(monkeypatch, name):
    """At inference the attention's projection (both families) and v2's fc2 reach the
    add+norm with their bias not added, so the kernel adds it instead of a pass of its
    own; in training every branch arrives added. (The parity tests cover the values.)"""
    arch = dict(img_size=64, num_classes=10, depths=(2, 2, 1, 1))
    if name == "pvt_small":
        arch["flavor"] = "paper"
    model = registry[name](**arch)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    seen, reference = [], fused.reference_add_layer_norm

    def spy(p, x, y, forward_kernel=True, **kw):
        seen.append(isinstance(y, layers.Biased))
        return reference(p, x, y, **kw)

    monkeypatch.setattr(fused, "add_layer_norm", spy)
    monkeypatch.setattr(fused, "reference_add_layer_norm", spy)
    model.apply(params, x)
    # per stage of 2 blocks: norm2 (attention), norm1 (MLP), norm2 (attention), then v2's
    # stage norm (MLP); v1's MLP kernel adds its own bias, and its stages have no norm
    v2 = name != "pvt_small"
    two, one = [True, v2, True] + [True] * v2, [True] + [True] * v2
    assert seen == two * 2 + one * 2, seen
    seen.clear()
    model.apply(params, x, train=True, rng=jax.random.key(2))
    assert seen and not any(seen)


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b0"])
def test_queries_reach_the_attention_with_their_bias_at_inference(monkeypatch, name):
    """With ATTN_BLOCKS["q_bias"], at inference the query projection's bias goes to the
    attention kernel un-added (no pass of its own), the logits unchanged; in training, and
    with the option off, the queries arrive added."""
    arch = dict(img_size=64, num_classes=10, depths=(1, 1, 1, 1))
    if name == "pvt_small":
        arch["flavor"] = "paper"
    model = registry[name](dtype=jnp.bfloat16, **arch)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    seen, original = [], fused.attention

    def spy(q, k, v, **kw):
        seen.append(isinstance(q, layers.Biased))
        return original(q, k, v, **kw)

    monkeypatch.setattr(fused, "attention", spy)
    monkeypatch.setitem(fused.ATTN_BLOCKS, "q_bias", True)
    deferred = model.apply(params, x)
    assert seen == [True] * 4, seen
    seen.clear()
    model.apply(params, x, train=True, rng=jax.random.key(2))
    assert seen and not any(seen)
    seen.clear()
    monkeypatch.setitem(fused.ATTN_BLOCKS, "q_bias", False)
    added = model.apply(params, x)
    assert seen and not any(seen)
    # off the GPU both add the bias in bf16 before the XLA attention: the same logits
    np.testing.assert_array_equal(np.asarray(deferred), np.asarray(added))


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b0"])
def test_blocks_add_and_norm_in_one_kernel_at_inference_on_cuda(monkeypatch, name):
    """Every block's two LayerNorms after the first, and v2's stage norms, read the
    residual add through the kernel at inference in bf16, at every stage whose rows fill
    its tiles; training (unless NORM_BLOCKS["train"]) and float32 keep XLA."""
    arch = dict(img_size=64, num_classes=10, depths=(2, 2, 1, 1))
    if name == "pvt_small":
        arch["flavor"] = "paper"
    hlo = _cuda_hlo(registry[name](dtype=jnp.bfloat16, **arch))
    # stages 1 and 2 (2 blocks): norm2, norm1, norm2; stage 3 (1 block, 320 or 160 wide
    # in a masked tile): norm2; stage 4 (1 block) only for v2_b0 (8 rows of 256; v1's
    # 10 rows with the class token fill no tile); then each of v2's four stage norms
    expected = 7 if name == "pvt_small" else 8 + 4
    assert hlo.count('name = "lucid_fn_fused_add_norm"') == expected
    assert "lucid_fn_fused_add_norm" not in _cuda_hlo(registry[name](**arch))
    train = dict(train=True, rng=jax.random.key(1))
    assert "lucid_fn_fused_add_norm" not in _cuda_hlo(
        registry[name](dtype=jnp.bfloat16, **arch), **train)
    monkeypatch.setitem(fused.NORM_BLOCKS, "train", True)
    assert _cuda_hlo(registry[name](dtype=jnp.bfloat16, **arch), **train).count(
        'name = "lucid_fn_fused_add_norm"') == expected
    monkeypatch.setenv("LUCID_FN_FUSED", "off")
    assert "lucid_fn_fused_add_norm" not in _cuda_hlo(registry[name](dtype=jnp.bfloat16,
                                                                      **arch))


@pytest.mark.parametrize("embed_norm", [True, False])
@pytest.mark.parametrize("name, opened", [("pvt_v2_b0", 4), ("pvt_small", 3)])
def test_stages_open_with_the_norm_norm_kernel_at_inference_on_cuda(monkeypatch, embed_norm,
                                                                    name, opened):
    """Each stage's patch-embedding norm (v1: and its position embedding) and its first
    norm1 are one kernel at inference in bf16 (with NORM_BLOCKS["embed_norm"]); v1's last
    stage, whose class token comes between them, training, scanned blocks and remat
    normalise first, through XLA. The logits do not depend on the option."""
    monkeypatch.setitem(fused.NORM_BLOCKS, "embed_norm", embed_norm)
    arch = dict(img_size=64, num_classes=10, depths=(2, 2, 1, 1), dtype=jnp.bfloat16)
    if name == "pvt_small":
        arch["flavor"] = "paper"
    kernel = 'name = "lucid_fn_fused_norm_norm"'
    assert _cuda_hlo(registry[name](**arch)).count(kernel) == opened * embed_norm
    assert kernel not in _cuda_hlo(registry[name](**arch), train=True, rng=jax.random.key(1))
    for other in (dict(scan_blocks=True), dict(remat=True)):
        assert kernel not in _cuda_hlo(registry[name](**arch, **other))
    model = registry[name](**arch)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    monkeypatch.setitem(fused.NORM_BLOCKS, "embed_norm", not embed_norm)
    other = model.apply(params, x)
    monkeypatch.setitem(fused.NORM_BLOCKS, "embed_norm", embed_norm)
    np.testing.assert_array_equal(np.asarray(model.apply(params, x)), np.asarray(other))


def _convolutions(hlo: str) -> int:
    return hlo.count("stablehlo.convolution")


def test_spatial_reduction_is_cudnns_conv_on_cuda_at_inference_only(monkeypatch):
    """At inference on CUDA each reducing block's SR is a kernel = stride convolution (no
    transpose pass); elsewhere, in training (unless SR_CONV_IN_TRAINING) and with
    SR_CONV_ON_GPU off, reshape + matmul. Both compute the same function: at a map its
    windows do not divide, too."""
    arch = dict(img_size=64, num_classes=10, depths=(2, 2, 1, 1), dtype=jnp.bfloat16)
    model = registry["pvt_v2_b0"](**arch)
    params = jax.eval_shape(model.init, jax.random.key(0))
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    train = dict(train=True, rng=jax.random.key(1))

    def on_cpu():
        return _convolutions(jax.jit(model.apply).trace(params, images).lower().as_text())

    on_cuda, in_training, cpu = (_convolutions(_cuda_hlo(model)),
                                 _convolutions(_cuda_hlo(model, **train)), on_cpu())
    monkeypatch.setattr(attention, "SR_CONV_ON_GPU", False)
    # five blocks in stages 1-3 reduce (sr 8, 4, 2); stage 4's does not
    assert on_cuda - _convolutions(_cuda_hlo(model)) == 5
    assert _convolutions(_cuda_hlo(model, **train)) == in_training
    assert on_cpu() == cpu
    monkeypatch.setattr(attention, "SR_CONV_ON_GPU", True)
    monkeypatch.setattr(attention, "SR_CONV_IN_TRAINING", True)
    assert _convolutions(_cuda_hlo(model, **train)) - in_training == 5
    k = jax.random.split(jax.random.key(3), 3)
    p = {"kernel": jax.random.normal(k[0], (4, 4, 8, 8)), "bias": jax.random.normal(k[1], (8,))}
    m = jax.random.normal(k[2], (2, 13, 11, 8))
    conv = layers.conv(p, m, stride=4, padding=0)
    np.testing.assert_allclose(conv, layers.patchify_conv(p, m), rtol=1e-5, atol=1e-5)
    assert conv.shape == (2, 3, 2, 8)
