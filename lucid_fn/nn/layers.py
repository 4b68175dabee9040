"""Functional layers: each is an ``init_*`` that returns a dict of float32 arrays and an
apply function over that dict.

Conventions, chosen so that checkpoints of other layouts map onto ours by a transpose:

- Linear: ``{"kernel": (in, out), "bias": (out,)}`` (PyTorch stores ``weight`` as (out, in)).
- Conv: ``{"kernel": (kh, kw, in, out), "bias": (out,)}`` (HWIO, XLA's natural layout for
  NHWC activations; PyTorch stores OIHW).
- LayerNorm: ``{"scale": (dim,), "bias": (dim,)}``.

Parameters are always float32; ``dtype`` arguments are the compute dtype. LayerNorm and
softmax statistics are taken in float32 whatever the compute dtype, because bf16 has too
few mantissa bits for a variance over hundreds of channels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Params = dict


# ----------------------------------------------------------------------------- init


def normal_init(key, shape, std=0.02):
    return std * jax.random.normal(key, shape, jnp.float32)


def trunc_normal_init(key, shape, std=0.02):
    # Truncated at two standard deviations, as timm's trunc_normal_(std=.02) does in effect.
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def torch_default_uniform(key, shape, fan_in):
    """PyTorch's default for Conv/Linear (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_linear(key, d_in, d_out, *, bias=True, weight_init=normal_init) -> Params:
    p = {"kernel": weight_init(key, (d_in, d_out))}
    if bias:
        p["bias"] = jnp.zeros((d_out,), jnp.float32)
    return p


def init_conv(key, kernel_size, d_in, d_out) -> Params:
    """A conv initialised as PyTorch's nn.Conv2d is (what the seed and the paper's code keep)."""
    kh, kw = kernel_size
    fan_in = kh * kw * d_in
    k_w, k_b = jax.random.split(key)
    return {
        "kernel": torch_default_uniform(k_w, (kh, kw, d_in, d_out), fan_in),
        "bias": torch_default_uniform(k_b, (d_out,), fan_in),
    }


def init_layer_norm(dim) -> Params:
    return {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}


# ---------------------------------------------------------------------------- apply


def linear(p: Params, x, dtype=None):
    dtype = dtype or x.dtype
    y = jnp.matmul(x.astype(dtype), p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def layer_norm(p: Params, x, eps: float):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def patchify_conv(p: Params, x, dtype=None):
    """Conv with kernel == stride and no padding on an NHWC map, as reshape + matmul.

    Rows and columns that do not fill a whole patch are dropped, exactly as a VALID
    convolution (PyTorch's ``Conv2d(k=s, padding=0)``) drops them. A reshape and one
    matmul beat XLA's general convolution for this case on every backend we tried, and
    the HWIO kernel flattens to (kh*kw*in, out) in the same order as the patch.
    """
    kh, kw, c_in, c_out = p["kernel"].shape
    b, h, w, c = x.shape
    ho, wo = h // kh, w // kw
    x = x[:, : ho * kh, : wo * kw, :]
    x = x.reshape(b, ho, kh, wo, kw, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, ho, wo, kh * kw * c)
    kernel = p["kernel"].reshape(kh * kw * c_in, c_out)
    return linear({"kernel": kernel, "bias": p["bias"]}, x, dtype)


def gelu(x, approximate: bool):
    return jax.nn.gelu(x, approximate=approximate)


def dropout(x, rate: float, rng):
    """Inverted dropout; a no-op (no RNG drawn) when ``rng`` is None or the rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def drop_path(x, rate, rng):
    """Stochastic depth: drop the whole residual branch per sample.

    ``rate`` may be a traced scalar (blocks run under ``lax.scan`` carry their own rate).
    """
    if rng is None:
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), 0).astype(x.dtype)
