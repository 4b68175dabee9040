"""The core of spatial-reduction attention, softmax(q k^T * scale) v, as one kernel, and
its backward as another.

PVT's queries are many and its keys few (3136 queries against 49 keys at stage 1): XLA
writes and re-reads float32 logits 49 wide. Here each program takes a tile of queries of
one (image, head) and all of that image's keys and values (at most ``MAX_KEYS``), and
writes only the output; heads are read in place from the token layout. The backward
recomputes the probabilities on chip (every key is in the tile, so no statistics come
from the forward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from lucid_fn.kernels.backend import plt

from lucid_fn.kernels import dispatch
from lucid_fn.kernels.settings import AttentionSettings, KernelSettings
from lucid_fn.nn import layers

MAX_KEYS = 128  # keys and values fit one tile: 49 in every PVT at 224x224


def supported(q, k, v, dtype) -> bool:
    """bf16 throughout (as the model's projections give them: then the XLA form's result
    is bf16 too), head widths the dots take, and keys that fit one tile. ``q`` may be a
    ``layers.Biased``."""
    q = q.value if isinstance(q, layers.Biased) else q
    d, m = q.shape[-1], k.shape[1]
    bf16 = jnp.dtype(jnp.bfloat16)
    return (all(a.dtype == bf16 for a in (q, k, v)) and jnp.dtype(dtype) == bf16
            and dispatch.is_pow2(d) and 16 <= d <= 128 and m <= MAX_KEYS)


def _key_tile(m: int) -> int:
    """Keys padded to a power of two (at least 16) for the dots."""
    return max(16, 1 << (m - 1).bit_length())


def _biased_queries(q_ref, qb_ref, rows):
    """The tile's query rows, with this head's bias added and rounded to the query's
    dtype (as the linear layer would have) when there is one."""
    q = q_ref[rows, :]
    if qb_ref:
        q = (q.astype(jnp.float32) + qb_ref[0][...].astype(jnp.float32)[None, :]
             ).astype(q.dtype)
    return q


def _probabilities(q, k, m, scale):
    """softmax(q k^T * scale) in float32 over the first ``m`` of the tile's keys."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
    s = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (1, k.shape[0]), 1) < m, s, -jnp.inf)
    e = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
    return e / jnp.sum(e, axis=1, keepdims=True)


def _attention_kernel(q_ref, *refs, n, m, scale, block_q):
    """softmax(q k^T * scale) v for one tile of query rows of one (image, head); logits
    and softmax in float32, probabilities cast to the compute dtype before the value
    product, as the XLA path does. With ``refs = (qb_ref, k_ref, v_ref, o_ref)`` the
    query's bias (this head's) is added and rounded to the query's dtype, as the linear
    layer would have."""
    *qb_ref, k_ref, v_ref, o_ref = refs
    rows = pl.program_id(2) * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    # Clamped indices: the last tile's extra rows re-read and re-write row n - 1 with the
    # same values, so nothing leaves the arrays and no padded copy is needed.
    rows = jnp.minimum(rows, n - 1)
    key_rows = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (_key_tile(m),), 0), m - 1)
    k = k_ref[key_rows, :]
    v = v_ref[key_rows, :]
    p = _probabilities(_biased_queries(q_ref, qb_ref, rows), k, m, scale).astype(v.dtype)
    o_ref[rows, :] = jnp.dot(p, v, preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _token_layout(arrays, q_bias, dtype):
    """Per-head arrays (B, rows, heads, d) as (B, rows, heads * d) in ``dtype`` (the
    kernels read each head in place), the queries' bias (heads, d) flattened if given,
    and its block spec (this head's)."""
    heads, d = arrays[0].shape[2:]
    flat = tuple(a.reshape(*a.shape[:2], heads * d).astype(dtype) for a in arrays)
    bias = () if q_bias is None else (q_bias.reshape(heads * d).astype(dtype),)
    return flat, bias, [pl.BlockSpec((d,), lambda i, h, j: (h,))] * len(bias)


def _head_spec(rows: int, *, d: int):
    """One (image, head)'s ``rows`` x ``d`` block of a (B, rows, heads * d) array."""
    return pl.BlockSpec((None, rows, d), lambda i, h, j: (i, 0, h))


def pallas_attention(q, k, v, q_bias=None, *, scale: float | None, dtype,
                     settings: AttentionSettings = AttentionSettings(), interpret: bool = False):
    """The attention core on per-head queries (B, N, heads, d) (plus their bias (heads, d),
    if given), keys and values (B, M, heads, d), heads read in place from the
    (B, N, heads * d) token layout (no transposes). ``interpret=True`` runs it anywhere."""
    b, n, heads, d = q.shape
    m = k.shape[1]
    bq = settings.block_q
    (q, k, v), bias, bias_spec = _token_layout((q, k, v), q_bias, dtype)
    head = functools.partial(_head_spec, d=d)
    out = pl.pallas_call(
        functools.partial(_attention_kernel, n=n, m=m, scale=scale or d ** -0.5, block_q=bq),
        out_shape=jax.ShapeDtypeStruct((b, n, heads * d), dtype),
        grid=(b, heads, -(-n // bq)),
        in_specs=[head(n), *bias_spec, head(m), head(m)],
        out_specs=head(n),
        compiler_params=plt.CompilerParams(num_warps=settings.num_warps, num_stages=1),
        interpret=interpret, name="lucid_fn_fused_attention",
    )(q, *bias, k, v)
    return out.reshape(b, n, heads, d)


# ------------------------------------------------------------------ the backward


def _split_dot(a, b, dims):
    """``a`` (float32) times ``b`` (bf16) as two bf16 dots, ``a``'s rounding and then its
    remainder: about 16 bits of ``a``, where XLA's gradient takes the product in float32
    (a bf16 dot alone would round the softmax gradient to 8)."""
    hi = a.astype(b.dtype)
    lo = (a - hi.astype(jnp.float32)).astype(b.dtype)
    dot = functools.partial(jax.lax.dot_general, dimension_numbers=(dims, ((), ())),
                            preferred_element_type=jnp.float32)
    return dot(hi, b) + dot(lo, b)


def _attention_grad_kernel(q_ref, *refs, n, m, scale, block_q, blocks):
    """The attention's gradient for ``blocks`` tiles of query rows of one (image, head),
    from its queries, keys, values and the output's cotangent ``do``: dq for each tile,
    and this program's part of dk and dv (float32, the tile's padded keys), carried down
    its tiles. Each tile recomputes the probabilities and takes the softmax's gradient as
    XLA's does: dp = do v^T rounded to bf16 (XLA's dot gives bf16), ds = p (dp - sum(p dp)),
    dq and dk from ds * scale at about float32 precision (:func:`_split_dot`), dv from the
    bf16 probabilities. Rows past ``n`` (the clamped tail) add nothing to dk and dv.
    ``refs = (qb_ref, ...)``: with the queries' bias, as the forward kernel."""
    *qb_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref = refs
    keys = _key_tile(m)
    key_rows = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (keys,), 0), m - 1)
    k = k_ref[key_rows, :]
    v = v_ref[key_rows, :]
    first = pl.program_id(2) * blocks

    def step(j, carry):
        dk, dv = carry
        idx = (first + j) * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        rows = jnp.minimum(idx, n - 1)
        q = _biased_queries(q_ref, qb_ref, rows)
        do = do_ref[rows, :]
        p = _probabilities(q, k, m, scale)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        dp = dp.astype(do.dtype).astype(jnp.float32)
        ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True)) * scale
        dq_ref[rows, :] = _split_dot(ds, k, ((1,), (0,))).astype(dq_ref.dtype)
        live = (idx < n)[:, None]
        p16 = jnp.where(live, p, 0.0).astype(v.dtype)
        dv = dv + jax.lax.dot_general(p16, do, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        dk = dk + _split_dot(jnp.where(live, ds, 0.0), q, ((0,), (0,)))
        return dk, dv

    zeros = jnp.zeros((keys, k.shape[1]), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, blocks, step, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def grad_tiles(b: int, heads: int, n: int,
               settings: AttentionSettings = AttentionSettings()) -> tuple[int, int]:
    """(programs per head, query tiles each walks): enough programs for the GPU
    (``grad_min_programs`` in all), as few tiles past the last query as that allows."""
    tiles = -(-n // settings.grad_block_q)
    parts = min(tiles, max(1, -(-settings.grad_min_programs // (b * heads))))
    blocks = -(-tiles // parts)
    return -(-tiles // blocks), blocks


def pallas_attention_grad(q, k, v, g, q_bias=None, *, scale: float | None, dtype,
                          settings: AttentionSettings = AttentionSettings(),
                          interpret: bool = False):
    """(dq, dk, dv[, dq_bias]) of :func:`pallas_attention` for the output cotangent ``g``
    (B, N, heads, d), in the inputs' dtypes, from :func:`_attention_grad_kernel`; XLA sums
    the programs' parts of dk and dv and the bias's gradient (dq summed over tokens)."""
    b, n, heads, d = q.shape
    m = k.shape[1]
    parts, blocks = grad_tiles(b, heads, n, settings)
    keys = _key_tile(m)
    (q2, k2, v2, g2), bias, bias_spec = _token_layout((q, k, v, g), q_bias, dtype)
    head = functools.partial(_head_spec, d=d)
    part = pl.BlockSpec((None, None, keys, d), lambda i, h, j: (i, j, 0, h))
    part_shape = jax.ShapeDtypeStruct((b, parts, keys, heads * d), jnp.float32)
    dq, dk, dv = pl.pallas_call(
        functools.partial(_attention_grad_kernel, n=n, m=m, scale=scale or d ** -0.5,
                          block_q=settings.grad_block_q, blocks=blocks),
        out_shape=(jax.ShapeDtypeStruct((b, n, heads * d), dtype), part_shape, part_shape),
        grid=(b, heads, parts),
        in_specs=[head(n), *bias_spec, head(m), head(m), head(n)],
        out_specs=(head(n), part, part),
        compiler_params=plt.CompilerParams(num_warps=settings.grad_num_warps, num_stages=1),
        interpret=interpret, name="lucid_fn_fused_attention_grad",
    )(q2, *bias, k2, v2, g2)
    dk, dv = (a[:, :, :m].sum(axis=1).reshape(k.shape).astype(k.dtype) for a in (dk, dv))
    dq = dq.reshape(q.shape).astype(q.dtype)
    if q_bias is None:
        return dq, dk, dv
    return dq, dk, dv, dq.astype(jnp.float32).sum(axis=(0, 1)).astype(q_bias.dtype)


def attention(q, k, v, *, scale: float | None, dtype, reference,
              kernels: KernelSettings = KernelSettings()):
    """``reference(q, k, v)`` (SRA's probabilities times values, no dropout) by the kernel
    where :func:`supported`, on CUDA, its gradient by the backward kernel; XLA elsewhere.
    ``q`` may be a ``layers.Biased``: the kernel adds its bias, the reference gets it
    added."""
    if not (kernels.attention.enabled and supported(q, k, v, dtype)):
        return reference(layers.add_bias(q), k, v)
    kw = dict(scale=scale, dtype=dtype, settings=kernels.attention)
    interpret = kernels.interpret
    kernel = functools.partial(pallas_attention, **kw)
    grad = functools.partial(pallas_attention_grad, **kw)
    if not isinstance(q, layers.Biased):
        return dispatch.on_cuda(kernel, reference, q, k, v, grad_kernel=grad,
                                interpret=interpret)
    return dispatch.on_cuda(
        kernel, lambda q, k, v, q_bias: reference(layers.add_bias(layers.Biased(q, q_bias)), k, v),
        q.value, k, v, q.bias.astype(q.value.dtype), grad_kernel=grad, interpret=interpret)
