"""A fused two-layer MLP (fc1, GELU, fc2) for GPUs: one Pallas (Triton) kernel per call.

Why: in PVT's first two stages the MLP is 8x wider than the tokens (64 -> 512 -> 64 on
3136 tokens per image) and its matmuls are tiny in K and N, so the time goes to memory,
not math. Through XLA, fc1 writes the hidden activations, a separate fusion reads them,
applies GELU and writes them again, and fc2 reads them once more: on an H100, at bf16 and
batch 256, those three passes were ~1.4 ms per stage-1 block of pvt_small's 19.4 ms
forward (benchmarks/NOTES.md). Here each program takes a tile of rows, walks the hidden
axis in chunks (fc1 chunk -> GELU in float32 -> accumulate fc2) and writes only the
output: the hidden activations never leave the chip.

It is used only where it pays and is exact to the XLA path up to rounding: on CUDA, in
bfloat16, for widths the Triton tiles take (input/output 16..128, hidden a multiple of the
chunk). Everywhere else, and for gradients (a custom VJP recomputes the XLA form), the
plain ``fc2(gelu(fc1(x)))`` runs. ``LUCID_FN_FUSED_MLP=off`` turns it off.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from lucid_fn.nn import layers

# Rows per program, hidden units per chunk, warps: measured on an H100 (NOTES.md).
BLOCKS = {"block_m": 128, "block_h": 128, "num_warps": 8, "approx_recip": True}
MAX_WIDTH = 128  # the float32 accumulator (block_m x width) lives in registers


def enabled() -> bool:
    return os.environ.get("LUCID_FN_FUSED_MLP", "on").lower() not in ("off", "0", "false")


def reference(fc1, fc2, x, *, approximate: bool, dtype):
    """What the kernel computes, as XLA ops (also its gradient and its CPU/TPU path)."""
    h = layers.gelu(layers.linear(fc1, x, dtype), approximate=approximate)
    return layers.linear(fc2, h, dtype)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(fc1, fc2, x, dtype) -> bool:
    c_in, hidden = fc1["kernel"].shape
    c_out = fc2["kernel"].shape[1]
    return (jnp.dtype(dtype) == jnp.bfloat16 and "bias" in fc1 and "bias" in fc2
            and all(_is_pow2(c) and 16 <= c <= MAX_WIDTH for c in (c_in, c_out))
            and hidden % BLOCKS["block_h"] == 0)


def _rcp_approx(v):
    """1 / v as the hardware's rcp.approx (about 1 ulp) instead of an IEEE division."""
    return plt.elementwise_inline_asm(
        "rcp.approx.ftz.f32 $0, $1;", args=[v], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)])[0]


def _gelu_f32(h, approximate: bool, fast_recip: bool = False):
    if approximate:
        return jax.nn.gelu(h, approximate=True)
    return h * layers.gelu_cdf_f32(h, _rcp_approx if fast_recip else None)


def _kernel(x_ref, w1_ref, b1_ref, w2_ref, b2_ref, o_ref, *, block_h, approximate,
            fast_recip):
    x = x_ref[...]
    hidden = w1_ref.shape[1]

    def chunk(i, acc):
        cols = pl.ds(pl.multiple_of(i * block_h, block_h), block_h)
        h = jnp.dot(x, w1_ref[:, cols], preferred_element_type=jnp.float32)
        h = _gelu_f32(h + b1_ref[cols].astype(jnp.float32), approximate, fast_recip)
        return acc + jnp.dot(h.astype(x.dtype), w2_ref[cols, :],
                             preferred_element_type=jnp.float32)

    acc = jnp.zeros((x.shape[0], o_ref.shape[1]), jnp.float32)
    acc = jax.lax.fori_loop(0, hidden // block_h, chunk, acc)
    o_ref[...] = (acc + b2_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def pallas_mlp(fc1, fc2, x, *, approximate: bool, dtype, interpret: bool = False):
    """The kernel on (..., C) tokens. ``interpret=True`` runs it anywhere (tests)."""
    bm, bh = BLOCKS["block_m"], BLOCKS["block_h"]
    lead, c_in = x.shape[:-1], x.shape[-1]
    hidden, c_out = fc1["kernel"].shape[1], fc2["kernel"].shape[1]
    rows = x.reshape(-1, c_in).astype(dtype)
    n = rows.shape[0]
    padded = -(-n // bm) * bm
    if padded != n:
        rows = jnp.pad(rows, ((0, padded - n), (0, 0)))
    full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        functools.partial(_kernel, block_h=bh, approximate=approximate,
                          fast_recip=bool(BLOCKS.get("approx_recip")) and not interpret),
        out_shape=jax.ShapeDtypeStruct((padded, c_out), dtype),
        grid=(padded // bm,),
        in_specs=[pl.BlockSpec((bm, c_in), lambda i: (i, 0)), full((c_in, hidden)),
                  full((hidden,)), full((hidden, c_out)), full((c_out,))],
        out_specs=pl.BlockSpec((bm, c_out), lambda i: (i, 0)),
        compiler_params=plt.CompilerParams(num_warps=BLOCKS["num_warps"], num_stages=2),
        interpret=interpret,
        name="lucid_fn_fused_mlp",
    )(rows, fc1["kernel"].astype(dtype), fc1["bias"].astype(dtype),
      fc2["kernel"].astype(dtype), fc2["bias"].astype(dtype))
    return out[:n].reshape(*lead, c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(fc1, fc2, x, approximate, dtype):
    return jax.lax.platform_dependent(
        fc1, fc2, x,
        cuda=functools.partial(pallas_mlp, approximate=approximate, dtype=dtype),
        default=functools.partial(reference, approximate=approximate, dtype=dtype))


def _fused_fwd(fc1, fc2, x, approximate, dtype):
    return _fused(fc1, fc2, x, approximate, dtype), (fc1, fc2, x)


def _fused_bwd(approximate, dtype, res, g):
    _, vjp = jax.vjp(functools.partial(reference, approximate=approximate, dtype=dtype),
                     *res)
    return vjp(g)


_fused.defvjp(_fused_fwd, _fused_bwd)


def mlp_gelu(fc1, fc2, x, *, approximate: bool, dtype=None):
    """``fc2(gelu(fc1(x)))``: the fused kernel where :func:`supported`, else XLA ops."""
    dtype = dtype or x.dtype
    if enabled() and supported(fc1, fc2, x, dtype):
        return _fused(fc1, fc2, x, approximate, jnp.dtype(dtype))
    return reference(fc1, fc2, x, approximate=approximate, dtype=dtype)
