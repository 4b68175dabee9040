"""The pre-norm transformer block both PVT families use, and how a stage runs its blocks.

    x = x + DropPath(attn(LN1(x)));  x = x + DropPath(mlp(LN2(x)))

The families differ only in ``attn`` and ``mlp``, which come in as functions. Each
residual add is computed together with the LayerNorm that reads its result
(``fused.add_layer_norm``: one kernel at inference on GPUs), so a block hands its MLP
branch to the next block un-added and the stage adds the last one (in the same kernel
as its closing LayerNorm, where the stage has one).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lucid_fn.nn import fused, layers

ATTN_RNGS, MLP_RNGS = 3, 2


def _norm_kernels(inference: bool) -> tuple:
    """(add+norm, norm+norm): the kernels run at inference; in training the forwards only
    with NORM_BLOCKS["train"] (an option: there the add+norm's forward measured the same
    as XLA's fusions, benchmarks/NOTES.md), the add+norm's backward kernel with
    NORM_BLOCKS["grad"]."""
    if inference or fused.NORM_BLOCKS["train"]:
        return fused.add_layer_norm, fused.norm_layer_norm
    return (functools.partial(fused.add_layer_norm, forward_kernel=False),
            fused.reference_norm_layer_norm)


class PendingNorm(NamedTuple):
    """In a block's carry in place of a branch: the stream is not yet normalised by this
    LayerNorm (a stage's patch-embedding norm) nor given its position embedding ``pos``
    (PVT v1's, added after that norm), so that the first block computes it with its norm1
    in one kernel (``fused.norm_layer_norm``)."""
    params: dict
    eps: float
    pos: jax.Array | None = None


def init_block(dim: int, attn: dict, mlp: dict) -> dict:
    return {"norm1": layers.init_layer_norm(dim), "attn": attn,
            "norm2": layers.init_layer_norm(dim), "mlp": mlp}


def block(p, carry, rng, path_rate, *, attn, mlp, eps: float):
    """One block on ``carry = (x, y)``: the residual stream and the previous block's MLP
    branch not yet added to it (None before a stage's first block, or a
    :class:`PendingNorm` still to apply to ``x``; at inference it may be a
    ``layers.Biased``); returns its own ``(x, y)`` the same way.
    ``attn(p, x, rngs, defer_bias=...)`` and ``mlp(p, x, rngs, defer_bias=...)`` get
    ATTN_RNGS / MLP_RNGS keys, or Nones at inference (``rng`` None: no dropout, no
    drop-path), when they may return ``layers.Biased``."""
    n = ATTN_RNGS + MLP_RNGS + 2
    rngs = [None] * n if rng is None else list(jax.random.split(rng, n))
    a_rngs, m_rngs, path_rngs = rngs[:ATTN_RNGS], rngs[ATTN_RNGS:n - 2], rngs[n - 2:]
    inference = rng is None
    add_norm, norm_norm = _norm_kernels(inference)
    # At inference the branches come back with their output bias not added
    # (layers.Biased): the add+norm adds it, saving a pass over the tokens per branch.
    defer = inference and fused.NORM_BLOCKS["branch_bias"]
    x, y = carry
    if y is None:
        h = layers.layer_norm(p["norm1"], x, eps)
    elif isinstance(y, PendingNorm):
        x, h = norm_norm(y.params, p["norm1"], x, y.pos, eps_a=y.eps, eps=eps)
    else:
        x, h = add_norm(p["norm1"], x, y, eps=eps)
    a = attn(p["attn"], h, a_rngs, defer_bias=defer)
    x, h = add_norm(p["norm2"], x, layers.drop_path(a, path_rate, path_rngs[0]), eps=eps)
    y = mlp(p["mlp"], h, m_rngs, defer_bias=defer)
    return x, layers.drop_path(y, path_rate, path_rngs[1])


def run_blocks(fn, blocks, x, rng, path_rates, *, scan: bool, remat: bool, norm=None,
               embed_norm=None):
    """Run ``fn(p, (x, y), rng, path_rate) -> (x, y)`` (:func:`block`) over blocks stacked on
    a leading axis of ``blocks``; returns the stream with the last branch added, or with
    ``norm = (params, eps)`` the LayerNorm of that (a stage's closing norm: the last add
    and the norm in the add+norm kernel, which then writes the norm alone).
    ``embed_norm = (params, eps)`` or ``(params, eps, pos)``: ``x`` is first normalised by
    that and given the position embedding ``pos`` (unrolled and without remat, in the first
    block's kernel with its norm1).

    Scanned, compile time stays flat in depth; unrolled, XLA fuses across blocks, which
    trained faster on GPU (DESIGN.md). Both compute the same function. ``remat`` recomputes
    each block's activations in the backward pass instead of storing them.
    """
    depth = len(path_rates)
    if not any(path_rates):
        # No drop-path anywhere in the stage: a static 0 lets drop_path draw no masks,
        # scanned or not (a traced rate of 0 would still draw them).
        fn = functools.partial(lambda p, x, key, rate, f: f(p, x, key, 0.0), f=fn)
    if remat:
        # Under scan, CSE across iterations is impossible anyway; unrolled it must be
        # prevented or XLA may merge the recomputation back into the forward pass.
        fn = jax.checkpoint(fn, prevent_cse=not scan)
    keys = None if rng is None else jax.random.split(rng, depth)
    pending = None
    if embed_norm is not None:
        # a scan's carry keeps one structure, and remat would trace the eps
        pending = PendingNorm(*embed_norm)
        if scan or remat or not depth or not fused.NORM_BLOCKS["embed_norm"]:
            x, pending = fused.norm_and_position(pending.params, x, pending.pos,
                                                 pending.eps), None
    if scan:
        def body(carry, xs):
            p, key, r = xs
            x, y = fn(p, carry, key, r)
            return (x, layers.add_bias(y)), None  # a scan's carry keeps one structure

        # A scan's carry keeps one structure: the first block adds zeros (exact).
        (x, y), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)),
                                 (blocks, keys, jnp.asarray(path_rates, jnp.float32)))
    else:
        y = pending
        for j in range(depth):
            p = jax.tree_util.tree_map(functools.partial(lambda a, j: a[j], j=j), blocks)
            x, y = fn(p, (x, y), None if keys is None else keys[j], float(path_rates[j]))
    if norm is not None and y is not None and fused.NORM_BLOCKS["stage_norm"]:
        add_norm = _norm_kernels(inference=rng is None)[0]
        return add_norm(norm[0], x, y, eps=norm[1], keep_sum=False)
    # no blocks (a slice of a stage) leaves x as it was
    x = x if y is None else x + layers.add_bias(y)
    return x if norm is None else layers.layer_norm(norm[0], x, norm[1])
