"""PVT v1's MLP, ``fc2(GELU(fc1(x)))``, as one kernel.

In PVT's first two stages the MLP is 8x wider than the tokens (64 -> 512 -> 64 on 3136
tokens per image) and its matmuls are tiny in K and N, so the time goes to memory, not
math: through XLA, fc1 writes the hidden activations, a fusion reads them, applies GELU
and writes them again, and fc2 reads them once more. Here each program takes a tile of
rows and walks the hidden axis in chunks (fc1 chunk -> GELU in float32 -> accumulate
fc2): the hidden activations never leave the chip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from lucid_fn.kernels.backend import plt

from lucid_fn.kernels import dispatch
from lucid_fn.kernels.gelu import gelu, gelu_kernel
from lucid_fn.kernels.settings import KernelSettings, MlpSettings
from lucid_fn.nn import layers

MAX_WIDTH = 128  # the float32 accumulator (block_m x width) lives in registers


def reference(fc1, fc2, x, *, approximate: bool, dtype, portable: bool = False):
    """What the kernel computes, as XLA ops (also its gradient and its CPU/TPU path;
    ``portable``: GELU's erf as one primitive, for exporters)."""
    h = gelu(layers.linear(fc1, x, dtype), approximate=approximate, portable=portable)
    return layers.linear(fc2, h, dtype)


def supported(fc1, fc2, x, dtype, settings: MlpSettings = MlpSettings()) -> bool:
    c_in, hidden = fc1["kernel"].shape
    c_out = fc2["kernel"].shape[1]
    return (jnp.dtype(dtype) == jnp.bfloat16 and "bias" in fc1 and "bias" in fc2
            and all(dispatch.is_pow2(c) and 16 <= c <= MAX_WIDTH for c in (c_in, c_out))
            and hidden % settings.block_h == 0)


def _kernel(x_ref, w1_ref, b1_ref, w2_ref, b2_ref, o_ref, *, block_h, approximate, fast):
    x = x_ref[...]
    hidden = w1_ref.shape[1]

    def chunk(i, acc):
        cols = pl.ds(pl.multiple_of(i * block_h, block_h), block_h)
        h = jnp.dot(x, w1_ref[:, cols], preferred_element_type=jnp.float32)
        h = gelu_kernel(h + b1_ref[cols].astype(jnp.float32), approximate, fast)
        return acc + jnp.dot(h.astype(x.dtype), w2_ref[cols, :],
                             preferred_element_type=jnp.float32)

    acc = jnp.zeros((x.shape[0], o_ref.shape[1]), jnp.float32)
    acc = jax.lax.fori_loop(0, hidden // block_h, chunk, acc)
    o_ref[...] = (acc + b2_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def pallas_mlp(fc1, fc2, x, *, approximate: bool, dtype, settings: MlpSettings = MlpSettings(),
               interpret: bool = False):
    """The kernel on (..., C) tokens. ``interpret=True`` runs it anywhere (tests)."""
    bm, bh = settings.block_m, settings.block_h
    lead, c_in = x.shape[:-1], x.shape[-1]
    hidden, c_out = fc1["kernel"].shape[1], fc2["kernel"].shape[1]
    rows = x.reshape(-1, c_in).astype(dtype)
    n = rows.shape[0]
    padded = -(-n // bm) * bm
    if padded != n:
        rows = jnp.pad(rows, ((0, padded - n), (0, 0)))
    full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        functools.partial(_kernel, block_h=bh, approximate=approximate, fast=not interpret),
        out_shape=jax.ShapeDtypeStruct((padded, c_out), dtype),
        grid=(padded // bm,),
        in_specs=[pl.BlockSpec((bm, c_in), lambda i: (i, 0)), full((c_in, hidden)),
                  full((hidden,)), full((hidden, c_out)), full((c_out,))],
        out_specs=pl.BlockSpec((bm, c_out), lambda i: (i, 0)),
        compiler_params=plt.CompilerParams(num_warps=settings.num_warps, num_stages=2),
        interpret=interpret,
        name="lucid_fn_fused_mlp",
    )(rows, fc1["kernel"].astype(dtype), fc1["bias"].astype(dtype),
      fc2["kernel"].astype(dtype), fc2["bias"].astype(dtype))
    return out[:n].reshape(*lead, c_out)


def mlp_gelu(fc1, fc2, x, *, approximate: bool, dtype=None,
             kernels: KernelSettings = KernelSettings()):
    """``fc2(gelu(fc1(x)))``: the kernel where :func:`supported` (on CUDA; its gradient
    XLA's, recomputed), else XLA ops."""
    dtype = dtype or x.dtype
    settings = kernels.mlp
    kw = dict(approximate=approximate, dtype=dtype)
    if settings.enabled and supported(fc1, fc2, x, dtype, settings):
        return dispatch.on_cuda(functools.partial(pallas_mlp, settings=settings, **kw),
                                functools.partial(reference, **kw), fc1, fc2, x,
                                interpret=kernels.interpret)
    return reference(fc1, fc2, x, portable=kernels.portable, **kw)
