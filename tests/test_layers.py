"""lucid_fn.nn.layers: linear with its bias deferred; strided convs over space-to-depth
blocks against lax.conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn.nn import layers


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_with_deferred_bias_is_the_same_value_once_added(dtype):
    k = jax.random.split(jax.random.key(0), 3)
    p = {"kernel": jax.random.normal(k[0], (48, 32)), "bias": jax.random.normal(k[1], (32,))}
    x = jax.random.normal(k[2], (4, 7, 48))
    deferred = layers.linear(p, x, dtype, defer_bias=True)
    assert isinstance(deferred, layers.Biased) and deferred.value.dtype == dtype
    np.testing.assert_array_equal(np.asarray(layers.add_bias(deferred), np.float32),
                                  np.asarray(layers.linear(p, x, dtype), np.float32))
    assert not np.array_equal(np.asarray(deferred.value, np.float32),
                              np.asarray(layers.linear(p, x, dtype), np.float32))
    # no bias to defer: the plain array
    plain = layers.linear({"kernel": p["kernel"]}, x, dtype, defer_bias=True)
    assert not isinstance(plain, layers.Biased)


# (size, channels in, out, kernel, stride, padding): v2's stem and its 3x3/2 embeddings,
# then sizes the stride does not divide, a kernel narrower than the stride's blocks
# need, no padding, and an even kernel.
S2D_CASES = [(224, 3, 8, 7, 4, 3), (56, 8, 16, 3, 2, 1), (29, 3, 5, 7, 4, 3),
             (30, 4, 6, 5, 3, 2), (17, 2, 3, 3, 2, 0), (16, 2, 3, 4, 2, 1)]


@pytest.mark.parametrize("size,c_in,c_out,k,stride,padding", S2D_CASES)
def test_space_to_depth_conv_is_the_strided_conv(size, c_in, c_out, k, stride, padding):
    keys = jax.random.split(jax.random.key(1), 3)
    p = {"kernel": jax.random.normal(keys[0], (k, k, c_in, c_out)),
         "bias": jax.random.normal(keys[1], (c_out,))}
    x = jax.random.normal(keys[2], (2, size, size + 1, c_in))
    kw = dict(stride=stride, padding=padding)
    with jax.default_matmul_precision("highest"):
        want, want_vjp = jax.vjp(lambda p: layers.conv(p, x, **kw), p)
        got, got_vjp = jax.vjp(lambda p: layers.space_to_depth_conv(p, x, **kw), p)
        assert got.shape == want.shape
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale)
        g = jax.random.normal(keys[0], want.shape)
        for a, b in zip(jax.tree.leaves(got_vjp(g)), jax.tree.leaves(want_vjp(g))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                       atol=1e-5 * float(jnp.max(jnp.abs(b))))
