"""GELU, x * Phi(x), every form lucid_fn computes, in one place.

- XLA's path (``gelu``, ``gelu_exact``): erf as XLA's own float32 rational approximation
  (xla/hlo/builder/lib/math.cc, ErfImpl32: x P(x^2) / Q(x^2), |error| < 4e-7 against the
  true erf, as lax.erf) written in plain multiply-adds and one divide. ``jax.nn.gelu``'s
  exact form goes through erfc, two polynomial branches, exp and selects, which XLA on
  GPU does not fuse as well (pvt_small's bf16 inference 25% slower with it,
  benchmarks/NOTES.md). Computed in float32 whatever the input dtype, rounded once.
- Inside the kernels (``gelu_kernel``, ``phi_kernel``, ``gelu_and_slope_kernel``):
  Abramowitz & Stegun 7.1.26, one reciprocal and one exp2 on the GPU's MUFU units, the
  kernels' largest instruction cost otherwise.
- For exporters (``gelu(..., portable=True)``, what a portable model traces): erf as the
  one primitive ``lax.erf``, which ONNX converters map to their own ``Erf`` op; the
  multiply-adds above become some twenty elementwise ops that onnxruntime runs one by one.
- The tanh approximation (``approximate=True``): Lucid's, and PVT v1's lucid flavor.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from lucid_fn.kernels.backend import plt

# ------------------------------------------------------------------ XLA's exact GELU

_ERF_P = (0.00022905065861350646, 0.0034082910107109506, 0.050955695062380861,
          0.18520832239976145, 1.128379143519084)
_ERF_Q = (-1.1791602954361697e-7, 0.000023547966471313185, 0.0010179625278914885,
          0.014070470171167667, 0.11098505178285362, 0.49746925110067538, 1.0)
_ERF_CLAMP = 3.7439211627767994  # erfinv(1 - 2^-23): beyond it erf is +-1 in float32
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _polynomial(x, coeffs):
    r = jnp.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        r = r * x + c
    return r


def erf_f32(x):
    """erf in float32 from multiply-adds and one divide; within float32 rounding of
    ``lax.erf`` (the same approximation XLA uses for it)."""
    z = jnp.clip(x.astype(jnp.float32), -_ERF_CLAMP, _ERF_CLAMP)
    z2 = z * z
    return z * _polynomial(z2, _ERF_P) / _polynomial(z2, _ERF_Q)


def gelu_cdf_f32(x32, erf=erf_f32):
    """Phi(x) for float32 ``x32``, the GELU gate (``erf``: its form, e.g. ``lax.erf``)."""
    # Clamped, the approximation would hold Phi at its value at the clamp (about 6e-8)
    # however far below -clamp * sqrt(2) x goes; the select makes that tail exact zeros.
    z = x32 * _SQRT_HALF
    return jnp.where(z < -_ERF_CLAMP, 0.0, 0.5 + 0.5 * erf(z))


@jax.custom_jvp
def gelu_exact(x):
    """``x * Phi(x)`` (PyTorch's ``nn.GELU()``), computed in float32, returned in x's dtype."""
    x = jnp.asarray(x)
    x32 = x.astype(jnp.float32)
    return (x32 * gelu_cdf_f32(x32)).astype(x.dtype)


@jax.checkpoint
def _gelu_exact_tangent(x, t):
    # d/dx x Phi(x) = Phi(x) + x phi(x). Checkpointed: reverse mode keeps x (which the
    # forward pass has written anyway) and recomputes the slope inside the backward
    # fusion, rather than writing a slope tensor the size of the MLP's hidden layer.
    x, t = jnp.asarray(x), jnp.asarray(t)
    x32 = x.astype(jnp.float32)
    slope = gelu_cdf_f32(x32) + x32 * jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
    return (t.astype(jnp.float32) * slope).astype(t.dtype)


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return gelu_exact(x), _gelu_exact_tangent(x, t)


def gelu_exact_portable(x):
    """:func:`gelu_exact` with erf as ``lax.erf`` (the same approximation in XLA)."""
    x = jnp.asarray(x)
    x32 = x.astype(jnp.float32)
    return (x32 * gelu_cdf_f32(x32, erf=jax.lax.erf)).astype(x.dtype)


def gelu(x, approximate: bool, *, portable: bool = False):
    """GELU: the tanh approximation (``approximate=True``, Lucid's) or exact erf
    (``portable``: erf as one primitive, for exporters)."""
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    return gelu_exact_portable(x) if portable else gelu_exact(x)


# ------------------------------------------------------------------ inside the kernels


def _approx(op: str, v):
    """``op`` (``rcp`` or ``ex2``) as the GPU's approximate instruction (a couple of ulp,
    one MUFU op) instead of an IEEE divide or libdevice's exp2."""
    return plt.elementwise_inline_asm(
        f"{op}.approx.ftz.f32 $0, $1;", args=[v], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)])[0]


# Abramowitz & Stegun 7.1.26: erfc(z) = t P(t) exp(-z^2) with t = 1 / (1 + p z), z >= 0,
# |error| <= 1.5e-7.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_HALF_LOG2E = 0.5 * math.log2(math.e)


def _phi_of_minus(a, fast: bool):
    """Phi(-a) for ``a = |h|`` in float32 by A&S 7.1.26 (erfc(a / sqrt 2) / 2), as two
    factors ``(t P(t), exp(-a^2 / 2))``: one reciprocal and one exp2 (the GPU's
    approximate instructions when ``fast``; exact forms in interpret mode) and six
    multiply-adds."""
    rcp = functools.partial(_approx, "rcp") if fast else (lambda v: 1.0 / v)
    ex2 = functools.partial(_approx, "ex2") if fast else jnp.exp2
    t = rcp(1.0 + (_AS_P * math.sqrt(0.5)) * a)
    poly = 0.5 * _AS_A[4]
    for c in reversed(_AS_A[:4]):
        poly = poly * t + 0.5 * c
    return poly * t, ex2(a * (a * -_HALF_LOG2E))


def phi_kernel(h, fast: bool):
    """Phi(h) in float32 as the kernels compute it: 1 - Phi(-|h|) for h >= 0. Against
    float64, over [-12, 12]: Phi within 3.0e-7 (the rational erf of XLA's path: 1.8e-7),
    x Phi(x) within 4.2e-7 (the rational 1.1e-6), and Phi's far negative tail within 3%
    relative, where the rational's 1 + erf cancels. The kernels write bf16 (relative step
    3.9e-3)."""
    tp, e = _phi_of_minus(jnp.abs(h), fast)
    q = tp * e
    return jnp.where(h >= 0, 1.0 - q, q)


def _gelu_as(h, fast: bool):
    """h Phi(h) as max(h, 0) - |h| Phi(-|h|), the same value for either sign of h: a max
    and a multiply-add where h Phi(h) takes a compare, a select, 1 - q and a multiply."""
    a = jnp.abs(h)
    tp, e = _phi_of_minus(a, fast)
    return jnp.maximum(h, 0.0) - (a * tp) * e


def gelu_kernel(h, approximate: bool, fast: bool = False):
    """GELU of a float32 tile inside a kernel: tanh form, or exact by A&S."""
    if approximate:
        return jax.nn.gelu(h, approximate=True)
    return _gelu_as(h, fast)


def gelu_and_slope_kernel(h, fast: bool = False):
    """(GELU(h), GELU'(h)) of a float32 tile, exact GELU, both from one reciprocal and one
    exp2: GELU'(h) = Phi(h) + h phi(h), phi from the exp2 Phi(-|h|) already takes (the
    training forward keeps the slope for the backward)."""
    a = jnp.abs(h)
    tp, e = _phi_of_minus(a, fast)
    q = tp * e
    return (jnp.maximum(h, 0.0) - (a * tp) * e,  # as _gelu_as rounds it
            jnp.where(h >= 0, 1.0 - q, q) + h * (e * _INV_SQRT_2PI))
