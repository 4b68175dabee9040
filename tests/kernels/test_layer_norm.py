"""lucid_fn.kernels.layer_norm: the residual add + LayerNorm kernel, the norm + norm
kernel and the add+norm's backward kernel (run here in interpret mode) against XLA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_xla_path_off_gpu

from lucid_fn.kernels import dispatch
from lucid_fn.kernels import layer_norm as ln
from lucid_fn.kernels.settings import KernelSettings
from lucid_fn.nn import layers


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
    s, n = ln.pallas_add_layer_norm(p, x, y, eps=1e-6, interpret=True)
    s_ref, n_ref = ln.reference_add_layer_norm(p, x, y, eps=1e-6)
    assert s.dtype == n.dtype == jnp.bfloat16 and s.shape == n.shape == x.shape
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
    # the norm of the same rounded sum, in float32: only the reductions' order differs
    exact = layers.layer_norm(p, s.astype(jnp.float32), 1e-6)
    err = float(jnp.abs(n.astype(jnp.float32) - exact).max())
    err_xla = float(jnp.abs(n_ref.astype(jnp.float32) - exact).max())
    assert err <= err_xla * 1.1, (err, err_xla)
    assert float((n != n_ref).mean()) < 1e-3
    # a stage's closing norm: the same norm, no sum written
    n_only = ln.pallas_add_layer_norm(p, x, y, eps=1e-6, keep_sum=False, interpret=True)
    np.testing.assert_array_equal(np.asarray(n_only, np.float32), np.asarray(n, np.float32))


@pytest.mark.parametrize("shape", [(2, 200, 64), (2, 196, 320), (4, 50, 512)])
def test_norm_norm_kernel_matches_xla(shape):
    """A patch embedding's norm and norm1 in one kernel (a 512-wide masked tile at 320):
    both norms as XLA's, but for the reductions' order."""
    p_a, x, _ = _norm_inputs(shape)
    p, _, _ = _norm_inputs(shape, seed=1)
    kw = dict(eps_a=1e-5, eps=1e-6)
    t, h = ln.pallas_norm_layer_norm(p_a, p, x, **kw, interpret=True)
    t_ref, h_ref = ln.reference_norm_layer_norm(p_a, p, x, **kw)
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
    assert ln.supported_norm_layer_norm(x, pos)
    kw = dict(eps_a=1e-5, eps=1e-6)
    t, h = ln.pallas_norm_layer_norm(p_a, p, x, pos, **kw, interpret=True)
    t_ref, h_ref = ln.reference_norm_layer_norm(p_a, p, x, pos, **kw)
    assert t.shape == h.shape == x.shape and t.dtype == jnp.bfloat16
    # the sum rounds as XLA's: t is XLA's but where the norm before it differs by an ulp
    assert float((t != t_ref).mean()) < 1e-3
    exact = layers.layer_norm(p, t.astype(jnp.float32), 1e-6)
    err = float(jnp.abs(h.astype(jnp.float32) - exact).max())
    err_xla = float(jnp.abs(h_ref.astype(jnp.float32) - exact).max())
    assert err <= err_xla * 1.1, (err, err_xla)
    # a position embedding of the wrong length: the XLA path, not a wrong broadcast
    assert not ln.supported_norm_layer_norm(x, pos[:, 1:])


def test_norm_norm_off_gpu_is_the_xla_path_with_its_gradient():
    p_a, x, _ = _norm_inputs((2, 200, 64))
    p, _, _ = _norm_inputs((2, 200, 64), seed=1)

    def loss(fn, p_a, p, x):
        t, h = fn(p_a, p, x, eps_a=1e-5, eps=1e-6)
        return (t.astype(jnp.float32) ** 2).sum() + (h.astype(jnp.float32) * x).sum()

    assert_xla_path_off_gpu(lambda *a: loss(ln.norm_layer_norm, *a),
                            lambda *a: loss(ln.reference_norm_layer_norm, *a), p_a, p, x)


def test_add_norm_supported_only_in_bf16_for_whole_tiles():
    p, x, y = _norm_inputs((2, 200, 64))
    assert ln.supported_add_layer_norm(x, y)
    assert not ln.supported_add_layer_norm(x.astype(jnp.float32), y.astype(jnp.float32))
    assert not ln.supported_add_layer_norm(x, y.astype(jnp.float32))
    _, x, y = _norm_inputs((2, 12, 320))          # masked 512-wide tiles, 8 rows each
    assert ln.supported_add_layer_norm(x, y)
    _, x, y = _norm_inputs((2, 8, 1100))          # its tile (2048) would not fit
    assert not ln.supported_add_layer_norm(x, y)
    _, x, y = _norm_inputs((2, 10, 320))          # 20 rows: no tile of 8 rows divides it
    assert not ln.supported_add_layer_norm(x, y)
    _, x, y = _norm_inputs((3, 49, 128))          # 147 rows: no tile of 8 rows divides it
    assert not ln.supported_add_layer_norm(x, y)


def _add_norm_loss(fn, p, x, y):
    s, n = fn(p, x, y)
    return (s.astype(jnp.float32) ** 2).sum() + (n.astype(jnp.float32) * x).sum()


def test_add_norm_off_gpu_is_the_xla_path_with_its_gradient():
    p, x, y = _norm_inputs((2, 200, 64))
    fn = functools.partial(ln.add_layer_norm, eps=1e-6)
    ref = functools.partial(ln.reference_add_layer_norm, eps=1e-6)
    assert_xla_path_off_gpu(lambda *a: _add_norm_loss(fn, *a),
                            lambda *a: _add_norm_loss(ref, *a), p, x, y)


def test_a_kernel_without_a_backward_kernel_has_the_xla_gradient():
    """dispatch.on_cuda with no backward kernel: the forward is the kernel's (here
    interpreted) and the gradient XLA's VJP of the reference at the same inputs, bit for
    bit, at a masked width too."""
    p, x, y = _norm_inputs((2, 196, 320))
    w = jax.random.normal(jax.random.key(4), (2, *x.shape))
    kernel = functools.partial(ln.pallas_add_layer_norm, eps=1e-6)
    ref = functools.partial(ln.reference_add_layer_norm, eps=1e-6)

    def loss(fn, p, x, y):  # linear in the outputs: the gradient reads no forward value
        s, n = fn(p, x, y)
        return (s.astype(jnp.float32) * w[0]).sum() + (n.astype(jnp.float32) * w[1]).sum()

    argnums = (0, 1, 2)
    fused = lambda *b: dispatch.on_cuda(kernel, ref, *b, interpret=True)  # noqa: E731
    assert "pallas_call" in str(jax.make_jaxpr(fused)(p, x, y))  # the kernel does run
    g = jax.jit(jax.grad(lambda *a: loss(fused, *a), argnums))(p, x, y)
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
    s, _ = ln.reference_add_layer_norm(p, x, y, eps=1e-6)
    saved = (s,) if keep_sum else (x, y)
    got = ln.pallas_add_layer_norm_grad(p, saved, g, eps=1e-6, keep_sum=keep_sum,
                                        interpret=True)
    want16 = ln.xla_add_layer_norm_grad(p, saved, g, eps=1e-6, keep_sum=keep_sum)
    f32 = functools.partial(jax.tree.map, lambda a: a.astype(jnp.float32))
    ref = functools.partial(ln.reference_add_layer_norm, eps=1e-6, keep_sum=keep_sum)
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
def test_add_norm_grad_kernel_wired_into_the_vjp(keep_sum):
    """The custom VJP hands the backward kernel what the forward kept and the cotangents in
    order: with the kernels interpreted, jax.grad through add_layer_norm is the
    reference's gradient up to the kernel's rounding, with the forward kernel (inference)
    or XLA's forward (training)."""
    p, x, y = _norm_inputs((2, 196, 320))
    w = jax.random.normal(jax.random.key(4), x.shape)

    def loss(fn, p, x, y):
        out = fn(p, x, y, eps=1e-6, keep_sum=keep_sum)
        s, n = out if keep_sum else (None, out)
        extra = 0.0 if s is None else (s.astype(jnp.float32) ** 2).sum()
        return extra + (n.astype(jnp.float32) * w).sum()

    argnums = (0, 1, 2)
    g_ref = jax.grad(lambda *a: loss(ln.reference_add_layer_norm, *a), argnums)(p, x, y)
    for forward_kernel in (True, False):
        fn = functools.partial(ln.add_layer_norm, forward_kernel=forward_kernel,
                               kernels=KernelSettings(interpret=True))
        g = jax.grad(lambda *a: loss(fn, *a), argnums)(p, x, y)
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

    fn = functools.partial(ln.add_layer_norm, forward_kernel=False)
    assert_xla_path_off_gpu(lambda *a: loss(fn, *a),
                            lambda *a: loss(ln.reference_add_layer_norm, *a), p, x, y)
