"""Spatial-reduction attention (SRA), shared by PVT v1 and v2.

Queries come from every token; keys and values from a reduced map: a conv with kernel =
stride = ``sr_ratio`` then LayerNorm (v1, v2), or (v2's "linear" SRA) a 7x7 adaptive
average pool, a 1x1 conv, LayerNorm and GELU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lucid_fn.kernels import attention as attention_kernel
from lucid_fn.kernels.settings import KernelSettings
from lucid_fn.nn import layers

SR_NORM_EPS = 1e-5  # nn.LayerNorm's default: the official PVT code, Lucid, timm (HF: 1e-6)
LINEAR_POOL = 7


def init_sra(dim: int, *, sr_ratio: int, qkv_bias: bool, proj: bool, linear: bool = False,
             weight=layers.normal, conv=layers.init_conv) -> dict:
    p = {
        "q": layers.init_linear(dim, dim, bias=qkv_bias, weight=weight),
        "kv": layers.init_linear(dim, 2 * dim, bias=qkv_bias, weight=weight),
    }
    if linear:
        p["sr"] = conv((1, 1), dim, dim)
        p["norm"] = layers.init_layer_norm(dim)
    elif sr_ratio > 1:
        p["sr"] = conv((sr_ratio, sr_ratio), dim, dim)
        p["norm"] = layers.init_layer_norm(dim)
    if proj:
        p["proj"] = layers.init_linear(dim, dim, weight=weight)
    return p


def _reduce_map(p, m, dtype, *, inference: bool):
    """The kernel = stride conv over an NHWC map (partial windows dropped, both ways): at
    inference on GPUs through cuDNN, whose strided conv saves the transpose pass that
    reshape + matmul takes (layers.patchify_conv, elsewhere); in training its gradients
    were slower (benchmarks/NOTES.md)."""
    patchify = functools.partial(layers.patchify_conv, p, dtype=dtype)
    if not inference:
        return patchify(m)
    conv = functools.partial(layers.conv, p, stride=p["kernel"].shape[0], padding=0,
                             dtype=dtype)
    return jax.lax.platform_dependent(m, cuda=conv, default=patchify)


def reduce_tokens(p, x, hw, *, linear: bool, dtype, inference: bool = True,
                  portable: bool = False):
    """The tokens keys and values are computed from (``inference`` False: in training,
    where the reduction takes the path whose gradients are faster; ``portable``: the
    forms for exporters, one for every platform)."""
    if "sr" not in p:
        return x
    b, _, c = x.shape
    m = x.reshape(b, *hw, c)
    if linear:  # then the reduction is a 1x1 conv: a plain matmul
        m = layers.patchify_conv(p["sr"], layers.adaptive_avg_pool(m, (LINEAR_POOL,) * 2),
                                 dtype)
    else:
        # cuDNN's form at inference is a choice by platform, which a portable program
        # does not make: it reduces as the CPU does (and as training does).
        m = _reduce_map(p["sr"], m, dtype, inference=inference and not portable)
    t = layers.layer_norm(p["norm"], m.reshape(b, -1, c), SR_NORM_EPS)
    return layers.gelu(t, approximate=False, portable=portable) if linear else t


def queries_keys_values(p, x, hw, *, heads: int, dtype, linear: bool = False,
                        defer_q_bias: bool = False, inference: bool = True,
                        portable: bool = False):
    """Per-head queries (B, N, heads, d) from every token, keys and values (B, M, heads, d)
    from the reduced map. ``defer_q_bias``: the queries as a ``layers.Biased`` (bias
    (heads, d)) when their projection has a bias. ``inference``, ``portable``: as in
    :func:`reduce_tokens`."""
    b, n, c = x.shape
    d = c // heads
    q = layers.linear(p["q"], x, dtype, defer_bias=defer_q_bias)
    if isinstance(q, layers.Biased):
        q = layers.Biased(q.value.reshape(b, n, heads, d), q.bias.reshape(heads, d))
    else:
        q = q.reshape(b, n, heads, d)
    kv_in = reduce_tokens(p, x, hw, linear=linear, dtype=dtype, inference=inference,
                          portable=portable)
    # The 2C axis of kv is [k heads..., v heads...] in every reference layout.
    kv = layers.linear(p["kv"], kv_in, dtype).reshape(b, -1, 2, heads, d)
    return q, kv[:, :, 0], kv[:, :, 1]


def attention_probs(q, k, scale: float | None):
    """softmax(q k^T * scale) over the keys, (B, heads, N, M), logits and softmax in
    float32 whatever the compute dtype; ``scale`` None: d ** -0.5."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits * (scale or q.shape[-1] ** -0.5), axis=-1)


def attend_xla(q, k, v, *, scale: float | None, dtype, attn_drop: float = 0.0, rng=None):
    """The attention core as XLA ops: probabilities (cast to ``dtype``, dropped out) times
    values, (B, N, heads, d). ``q`` may be a ``layers.Biased``."""
    q = layers.add_bias(q)
    attn = layers.dropout(attention_probs(q, k, scale).astype(dtype), attn_drop, rng)
    return jnp.einsum("bhnm,bmhd->bnhd", attn, v)


def attend(q, k, v, *, scale: float | None, dtype, attn_drop: float, rng,
           kernels: KernelSettings = KernelSettings()):
    """:func:`attend_xla`; with no dropout to apply (``rng`` None or a rate of 0) one fused
    kernel where it pays (kernels/attention.py: the float32 logits never leave the chip,
    in its backward kernel either)."""
    if rng is None or attn_drop == 0:  # q may be a layers.Biased
        return attention_kernel.attention(
            q, k, v, scale=scale, dtype=dtype, kernels=kernels,
            reference=functools.partial(attend_xla, scale=scale, dtype=dtype))
    return attend_xla(q, k, v, scale=scale, dtype=dtype, attn_drop=attn_drop, rng=rng)


def sra(p, x, rngs, *, hw, heads: int, scale: float | None, dtype, attn_drop: float,
        drop: float, linear: bool = False, kernels: KernelSettings = KernelSettings()):
    """SRA over tokens ``x`` (B, N, C) laid out on an ``hw`` map (a class token, if any,
    only where nothing is reduced). ``rngs``: 3 keys (attention, output x2), or Nones at
    inference, where the queries' bias goes to the attention kernel un-added and the
    output comes back as a ``layers.Biased`` (its projection's bias not added) for the
    residual add + LayerNorm kernel to add (nn/block.py)."""
    b, n, c = x.shape
    inference = rngs[0] is None
    q, k, v = queries_keys_values(p, x, hw, heads=heads, dtype=dtype, linear=linear,
                                  defer_q_bias=inference, inference=inference,
                                  portable=kernels.portable)
    out = attend(q, k, v, scale=scale, dtype=dtype, attn_drop=attn_drop, rng=rngs[0],
                 kernels=kernels).reshape(b, n, c)
    if "proj" in p:
        if rngs[2] is None:
            return layers.linear(p["proj"], out, dtype, defer_bias=True)
        out = layers.linear(p["proj"], out, dtype)
    else:
        # Lucid's PVT v1 has no projection: its `proj` is nn.Dropout(attn_drop), a second
        # attention-rate dropout before the output dropout.
        out = layers.dropout(out, attn_drop, rngs[1])
    return layers.dropout(out, drop, rngs[2])


def sra_probs(p, x, *, hw, heads: int, scale: float | None, dtype, linear: bool = False):
    """Softmax(q k^T * scale) of SRA over normed tokens ``x`` (B, N, C): (B, heads, N, N_kv)
    float32, from the pieces :func:`sra` is made of (what attention maps show)."""
    q, k, _ = queries_keys_values(p, x, hw, heads=heads, dtype=dtype, linear=linear)
    return attention_probs(q, k, scale)
