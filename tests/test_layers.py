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


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_shifted_depthwise_conv_is_the_grouped_conv(dtype, rtol):
    """The CPU's form of PVT v2's depthwise 3x3 conv: the same values and gradients (odd
    sizes, so that every edge is a different row from its opposite)."""
    keys = jax.random.split(jax.random.key(2), 3)
    c = 6
    p = {"kernel": jax.random.normal(keys[0], (3, 3, 1, c)),
         "bias": jax.random.normal(keys[1], (c,))}
    x = jax.random.normal(keys[2], (2, 5, 7, c))
    grouped = lambda p, x: layers.conv(p, x, stride=1, padding=1, groups=c, dtype=dtype)
    shifted = lambda p, x: layers.shifted_depthwise_conv3x3(p, x, dtype=dtype)
    want, want_vjp = jax.vjp(grouped, p, x)
    got, got_vjp = jax.vjp(shifted, p, x)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=rtol * scale)
    g = jax.random.normal(keys[0], want.shape, dtype)
    for a, b in zip(jax.tree.leaves(got_vjp(g)), jax.tree.leaves(want_vjp(g))):
        b = np.asarray(b, np.float32)
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=rtol * np.abs(b).max())


def test_depthwise_conv_is_shifted_on_cpu_and_grouped_when_portable():
    """The per-platform choice lowers as chosen: no grouped convolution on the CPU, and a
    portable model's single form for every platform."""
    c = 4
    p = {"kernel": jnp.ones((3, 3, 1, c)), "bias": jnp.zeros((c,))}
    x = jnp.ones((1, 12, c))

    def hlo(portable):
        f = lambda p, x: layers.depthwise_conv3x3(p, x, (3, 4), portable=portable)
        return jax.jit(f).lower(p, x).as_text()

    assert "convolution" not in hlo(False)
    assert "feature_group_count = 4" in hlo(True)
    np.testing.assert_allclose(
        np.asarray(layers.depthwise_conv3x3(p, x, (3, 4))),
        np.asarray(layers.depthwise_conv3x3(p, x, (3, 4), portable=True)), atol=1e-6)
