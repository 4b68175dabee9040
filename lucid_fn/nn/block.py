"""The residual stream of a stage, and how a stage runs its blocks.

Blocks are the paper's equations over the stream ``x`` (:func:`prenorm_block`)::

    x = x + drop_path(attn(layer_norm(norm1, x)))
    x = x + drop_path(mlp(layer_norm(norm2, x)))

and model files write a stage as patch embedding, norm, position embedding, blocks, norm
over the same stream. This module is
the one place where those adds and norms become kernels (kernels/layer_norm.py): ``x``
is a :class:`Stream`, which holds the stream's tokens with one step not yet taken, a
branch to add or a LayerNorm (and position embedding) to apply. The LayerNorm that reads
the stream next takes that step in the same kernel: a block's residual add with the
next block's norm1 (or its own norm2), a stage's opening norm with the first norm1, a
stage's last add with its closing norm. A branch may arrive with its output bias not yet
added (``layers.Biased``); at inference the kernel adds it too. With the kernels off,
or off GPU, each step is XLA's own op: the same function (tests/test_block.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lucid_fn.kernels import layer_norm as norm_kernels
from lucid_fn.kernels.settings import KernelSettings
from lucid_fn.nn import layers


@jax.tree_util.register_pytree_node_class
class Stream:
    """A stage's residual stream (B, N, C), as ``base`` and at most one step still to
    take: ``branch`` (the stream is ``base + branch``; an array or ``layers.Biased``), or
    ``norm = (params, eps)`` with an optional ``pos`` (the stream is
    ``layer_norm(params, base) + pos``). ``kernels`` and ``train`` say which kernels may
    take the steps (the norm kernels' forwards at inference only, their backward in
    training)."""

    def __init__(self, base, *, kernels: KernelSettings, train: bool, branch=None,
                 norm=None, pos=None):
        self.base, self.branch, self.norm, self.pos = base, branch, norm, pos
        self.kernels, self.train = kernels, train
        self._tokens = None if branch is not None or norm is not None else base

    # -------------------------------------------------------------- as a pytree

    def tree_flatten(self):
        eps = None if self.norm is None else self.norm[1]
        children = (self.base, self.branch, None if self.norm is None else self.norm[0],
                    self.pos)
        return children, (eps, self.kernels, self.train)

    @classmethod
    def tree_unflatten(cls, aux, children):
        eps, kernels, train = aux
        base, branch, norm_params, pos = children
        norm = None if norm_params is None else (norm_params, eps)
        return cls(base, kernels=kernels, train=train, branch=branch, norm=norm, pos=pos)

    # -------------------------------------------------------------- steps

    def _with(self, base, **step) -> Stream:
        return Stream(base, kernels=self.kernels, train=self.train, **step)

    def tokens(self):
        """The stream as an array: the step still pending taken by XLA ops."""
        if self._tokens is None:
            if self.norm is not None:
                self._tokens = norm_kernels.norm_and_position(self.norm[0], self.base,
                                                              self.pos, self.norm[1])
            else:
                self._tokens = self.base + layers.add_bias(self.branch).astype(self.base.dtype)
        return self._tokens

    @property
    def shape(self):
        return self.base.shape

    def __add__(self, y) -> Stream:
        """The stream plus ``y``: a block's branch, or a position embedding (which goes
        into a pending opening norm: the first norm1's kernel adds it)."""
        if self._tokens is None and self.norm is not None and self.pos is None:
            return self._with(self.base, norm=self.norm, pos=y)
        if self.train or not isinstance(y, layers.Biased):
            # in the stream's dtype (a position embedding is float32); in training as an
            # array, which the add+norm's backward kernel takes
            y = layers.add_bias(y).astype(self.base.dtype)
        return self._with(self.tokens(), branch=y)

    def layer_norm(self, p, eps: float) -> Stream:
        """The stream replaced by its LayerNorm: a stage's opening norm (taken with the
        first block's norm1) or closing norm (taken with the last residual add, writing
        the norm alone)."""
        if self._tokens is None and self.branch is not None:
            n = norm_kernels.add_layer_norm(p, self.base, self.branch, eps=eps, keep_sum=False,
                                            **self._norm_kernel())
            return self._with(n)
        return self._with(self.tokens(), norm=(p, eps))

    def dropout(self, rate: float, rng) -> Stream:
        if rng is None or rate == 0:
            return self
        return self._with(layers.dropout(self.tokens(), rate, rng))

    def prepend(self, token) -> Stream:
        """A (1, 1, C) token (PVT v1's class token) in front of every image's tokens."""
        x = self.tokens()
        token = jnp.broadcast_to(token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        return self._with(jnp.concatenate([token, x], axis=1))

    def read_norm(self, p, eps: float):
        """``layer_norm(p, stream)`` as a branch's input (the stream unchanged), taking the
        pending step in the same kernel where there is one."""
        if self._tokens is not None:
            return layers.layer_norm(p, self._tokens, eps)
        if self.norm is not None:
            # in training the opening's norms are XLA's: no backward kernel takes them
            pair = (norm_kernels.reference_norm_layer_norm if self.train
                    else functools.partial(norm_kernels.norm_layer_norm, kernels=self.kernels))
            self._tokens, h = pair(self.norm[0], p, self.base, self.pos, eps_a=self.norm[1],
                                   eps=eps)
            return h
        self._tokens, h = norm_kernels.add_layer_norm(p, self.base, self.branch, eps=eps,
                                                      **self._norm_kernel())
        return h

    def _norm_kernel(self) -> dict:
        """The add+norm's kernels: the forward's at inference, the backward's in training
        (where the forward kernel gained nothing, benchmarks/NOTES.md)."""
        return dict(kernels=self.kernels, forward_kernel=not self.train)


def layer_norm(p, x, eps: float):
    """LayerNorm of an array, or of a :class:`Stream` as a branch's input."""
    if isinstance(x, Stream):
        return x.read_norm(p, eps)
    return layers.layer_norm(p, x, eps)


class BlockKeys(NamedTuple):
    """A block's random keys: the attention's three (its dropouts), the MLP's two, and
    one drop-path key per branch. All None at inference."""
    attn: tuple
    mlp: tuple
    attn_path: jax.Array | None
    mlp_path: jax.Array | None


def block_keys(rng) -> BlockKeys:
    k = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
    return BlockKeys(tuple(k[:3]), tuple(k[3:5]), k[5], k[6])


def prenorm_block(p, x, rng, path_rate, *, attn, mlp, eps: float):
    """The pre-norm transformer block both PVT families use, over the stream ``x`` (a
    :class:`Stream`, or a plain array):

        x = x + drop_path(attn(norm1(x)))
        x = x + drop_path(mlp(norm2(x)))

    ``attn(p, h, keys)`` and ``mlp(p, h, keys)`` get the block's params and its keys (all
    None at inference, ``rng`` None)."""
    k = block_keys(rng)
    norm1 = functools.partial(layer_norm, p["norm1"], eps=eps)
    norm2 = functools.partial(layer_norm, p["norm2"], eps=eps)
    x = x + layers.drop_path(attn(p["attn"], norm1(x), k.attn), path_rate, k.attn_path)
    x = x + layers.drop_path(mlp(p["mlp"], norm2(x), k.mlp), path_rate, k.mlp_path)
    return x


def init_block(dim: int, attn: dict, mlp: dict) -> dict:
    return {"norm1": layers.init_layer_norm(dim), "attn": attn,
            "norm2": layers.init_layer_norm(dim), "mlp": mlp}


# ------------------------------------------------------------------ running blocks


def run_blocks(fn, blocks, x: Stream, rng, path_rates, *, scan: bool, remat: bool,
               probe=None):
    """Run ``fn(p, x, rng, path_rate) -> x`` (a block over a :class:`Stream`) over the
    blocks stacked on a leading axis of ``blocks``, with one key each from ``rng`` (None
    at inference) and their drop-path rates.

    Scanned, compile time stays flat in depth; unrolled, XLA fuses across blocks, which
    trained faster on GPU (docs/design.md). Both compute the same function. ``remat``
    recomputes each block's activations in the backward pass instead of storing them.
    ``probe = (j, f)``: also return ``f(p_j, x)``, block j's params and the stream that
    enters it (attention maps read it there)."""
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
    if scan or remat or not depth:
        # the pending step taken first: a scan's carry keeps one structure, and under remat
        # it would be recomputed in the backward
        x = x._with(x.tokens())
    run = functools.partial(_scan if scan else _unrolled, fn)
    if probe is None:
        return run(x, blocks, keys, path_rates)
    j, f = probe
    x = run(x, *_part(blocks, keys, path_rates, 0, j))
    seen = f(jax.tree_util.tree_map(lambda a: a[j], blocks), x)
    return run(x, *_part(blocks, keys, path_rates, j, depth)), seen


def _part(blocks, keys, rates, start: int, stop: int) -> tuple:
    """Blocks ``start:stop`` of a stage: their params, keys and drop-path rates."""
    cut = functools.partial(jax.tree_util.tree_map, lambda a: a[start:stop])
    return cut(blocks), None if keys is None else keys[start:stop], rates[start:stop]


def _unrolled(fn, x, blocks, keys, rates):
    for j in range(len(rates)):
        p = jax.tree_util.tree_map(functools.partial(lambda a, j: a[j], j=j), blocks)
        x = fn(p, x, None if keys is None else keys[j], float(rates[j]))
    return x


def _scan(fn, x, blocks, keys, rates):
    if not len(rates):
        return x

    def body(x, xs):
        p, key, r = xs
        x = fn(p, x, key, r)
        return x._with(x.base, branch=layers.add_bias(x.branch)), None

    # A scan's carry keeps one structure: the first block adds zeros (exact).
    start = x._with(x.tokens(), branch=jnp.zeros_like(x.tokens()))
    x, _ = jax.lax.scan(body, start, (blocks, keys, jnp.asarray(rates, jnp.float32)))
    return x
