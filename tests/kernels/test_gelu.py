"""lucid_fn.kernels.gelu: the exact GELU of XLA's path (multiply-adds, the one the paper
flavor and PVT v2 use) against jax.nn.gelu and float64 erf, values and gradients; the
kernels' GELU (A&S 7.1.26) no further off float64 than that rational form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn.kernels import gelu
from lucid_fn.nn import layers

XK = np.linspace(-12, 12, 48_001, dtype=np.float32)
PHI = 0.5 * np.vectorize(math.erfc)(-XK.astype(np.float64) / math.sqrt(2))


def _gelu64(x):
    return np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.ravel()]
                    ).reshape(x.shape)


X = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0]]
                   ).astype(np.float32)


def test_exact_gelu_matches_float64_erf_and_jax():
    ours = np.asarray(layers.gelu(jnp.asarray(X), approximate=False))
    assert ours.dtype == np.float32
    truth = _gelu64(X.astype(np.float64))
    assert np.abs(ours - truth).max() < 2e-6 * np.maximum(1, np.abs(truth)).max()
    ref = np.asarray(jax.nn.gelu(jnp.asarray(X), approximate=False))
    # 1 + erf cancels in the negative tail for both; there they differ by < 6e-7
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=6e-7)
    # the far negative tail is exactly zero, as in PyTorch's float32 nn.GELU()
    assert np.all(ours[X < -6] <= 0) and np.all(ours[X < -7.5] == 0)


def test_exact_gelu_gradient_matches_jax():
    x = jnp.asarray(X)
    ours = jax.vmap(jax.grad(lambda v: layers.gelu(v, approximate=False)))(x)
    ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)
    # second order goes through the custom JVP too
    h = jax.grad(jax.grad(lambda v: layers.gelu(v, approximate=False)))(0.3)
    h_ref = jax.grad(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(0.3)
    assert float(h) == pytest.approx(float(h_ref), rel=1e-5)


def test_exact_gelu_keeps_bf16_and_rounds_once():
    x = jnp.asarray(X[::7], jnp.bfloat16)
    out = layers.gelu(x, approximate=False)
    assert out.dtype == jnp.bfloat16
    # computed in float32 and rounded at the end: equals rounding the float32 result
    expect = layers.gelu(x.astype(jnp.float32), approximate=False).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expect, np.float32))
    g = jax.grad(lambda v: layers.gelu(v, approximate=False).astype(jnp.float32).sum())(x)
    assert g.dtype == jnp.bfloat16


def test_portable_gelu_is_the_same_function_as_one_erf():
    """Exporters' form: lax.erf, the approximation the multiply-adds copy, as close to
    float64 as they are (1 + erf cancels in the negative tail for both: there they differ
    by < 1e-6); bf16 in, bf16 out."""
    x = jnp.asarray(X)
    ours = layers.gelu(x, approximate=False)
    portable = np.asarray(layers.gelu(x, approximate=False, portable=True))
    truth = _gelu64(X.astype(np.float64))
    assert np.abs(portable - truth).max() < 2e-6 * np.maximum(1, np.abs(truth)).max()
    np.testing.assert_allclose(portable, np.asarray(ours), rtol=1e-6, atol=1e-6)
    assert np.all(portable[X < -7.5] == 0)
    jaxpr = str(jax.make_jaxpr(lambda v: layers.gelu(v, approximate=False, portable=True))(x))
    assert "erf" in jaxpr and "erf" not in str(jax.make_jaxpr(
        lambda v: layers.gelu(v, approximate=False))(x))
    assert layers.gelu(x.astype(jnp.bfloat16), approximate=False, portable=True).dtype == \
        jnp.bfloat16


def test_tanh_gelu_is_jax_approximation():
    x = jnp.asarray(X)
    np.testing.assert_array_equal(np.asarray(layers.gelu(x, approximate=True)),
                                  np.asarray(jax.nn.gelu(x, approximate=True)))



def test_kernel_gelu_gate_is_as_close_to_erf_as_the_rational_form():
    """The kernels' Phi (exact reciprocal and exp2 off the GPU) against float64 erf: no
    further than the rational form XLA's path uses, for GELU itself."""
    phi = np.asarray(gelu.phi_kernel(jnp.asarray(XK), fast=False), np.float64)
    rational = np.asarray(gelu.gelu_cdf_f32(jnp.asarray(XK)), np.float64)
    assert np.abs(phi - PHI).max() < 3.5e-7
    assert np.abs(XK * (phi - PHI)).max() <= np.abs(XK * (rational - PHI)).max()
    tail = (XK < -3) & (PHI > 1e-30)  # where 1 + erf cancels; before ex2 flushes to 0
    assert np.abs(phi / PHI - 1)[tail].max() < 0.05


def test_kernel_gelu_is_x_phi_x_in_float32():
    """GELU as max(x, 0) - |x| Phi(-|x|) (no select): x Phi(x) to float32 accuracy against
    float64, on both sides and in the tails; the slope beside it is Phi + x phi."""
    want = XK.astype(np.float64) * PHI
    got = np.asarray(gelu.gelu_kernel(jnp.asarray(XK), approximate=False), np.float64)
    assert np.abs(got - want).max() < 4.5e-7
    tail = (XK < -3) & (np.abs(want) > 1e-30)  # x Phi(x) is tiny here, relative error
    assert np.abs(got[tail] / want[tail] - 1).max() < 0.05
    act, slope = gelu.gelu_and_slope_kernel(jnp.asarray(XK))
    np.testing.assert_array_equal(act, got.astype(np.float32))
    pdf = np.exp(-0.5 * XK.astype(np.float64) ** 2) / math.sqrt(2 * math.pi)
    assert np.abs(np.asarray(slope, np.float64) - (PHI + XK * pdf)).max() < 1e-6
