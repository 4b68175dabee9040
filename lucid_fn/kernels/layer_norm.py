"""The pre-norm blocks' LayerNorms together with what comes before them, as kernels.

- :func:`add_layer_norm`: a residual add and the LayerNorm that reads its result in one
  pass (two reads, two writes; a stage's closing norm writes the norm alone). Through
  XLA each such LayerNorm was a fusion that recomputed the previous one's input, at about
  3x the memory floor. Its backward (:func:`pallas_add_layer_norm_grad`, in training)
  reads the kept sum and both cotangents once: XLA's LayerNorm backward and residual add
  ran at about 1.6 TB/s.
- :func:`norm_layer_norm`: a stage's opening, the patch embedding's LayerNorm (v1: plus
  the position embedding) and the first block's norm1 in one pass; through XLA the
  second fusion recomputed the first norm from its input.

Where they run is decided in one place, nn/block.py (the residual stream).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from lucid_fn.kernels.backend import plt

from lucid_fn.kernels import dispatch
from lucid_fn.kernels.settings import KernelSettings, NormSettings
from lucid_fn.nn import layers

# ------------------------------------------------------------------ references


def reference_add_layer_norm(p, x, y, *, eps: float, keep_sum: bool = True):
    """``s = x + y`` (in x's dtype) and ``layer_norm(p, s)`` (that alone if not
    ``keep_sum``), as XLA ops. ``y`` may be a ``layers.Biased``: its bias is added first,
    as the linear layer would have."""
    s = x + layers.add_bias(y).astype(x.dtype)
    n = layers.layer_norm(p, s, eps)
    return (s, n) if keep_sum else n


def norm_and_position(p, x, pos, eps: float):
    """``layer_norm(p, x)``, plus ``pos`` (a position embedding broadcast over the batch,
    in the norm's dtype) unless None, as XLA ops."""
    t = layers.layer_norm(p, x, eps)
    return t if pos is None else t + pos.astype(t.dtype)


def reference_norm_layer_norm(p_a, p, x, pos=None, *, eps_a: float, eps: float):
    """``t = norm_and_position(p_a, x, pos)`` (``pos`` (N, C) or (1, N, C), or None) and
    ``layer_norm(p, t)``, as XLA ops."""
    t = norm_and_position(p_a, x, pos, eps_a)
    return t, layers.layer_norm(p, t, eps)


# ------------------------------------------------------------------ tiles of rows


def _norm_rows(rows: int, width: int, settings: NormSettings) -> int:
    """Rows per program: a power of two dividing ``rows`` (0 if below ``min_rows``)."""
    bm = max(1, settings.elements // dispatch.next_pow2(width))
    while bm > 1 and rows % bm:
        bm //= 2
    return bm if bm >= settings.min_rows else 0


def _branch(y) -> tuple:
    """(values, bias or None) of a branch given as an array or a ``layers.Biased``."""
    return (y.value, y.bias) if isinstance(y, layers.Biased) else (y, None)


def _supported_rows(x, settings: NormSettings) -> bool:
    """bf16, and a width whose power-of-two tile fits (16..1024 wide: stage 3's 320 and
    160 run in 512 and 256 tiles, the columns past the width masked)."""
    width, rows = x.shape[-1], int(np.prod(x.shape[:-1]))
    return (x.dtype == jnp.bfloat16 and 16 <= dispatch.next_pow2(width) <= 1024
            and _norm_rows(rows, width, settings) > 0)


def supported_add_layer_norm(x, y, settings: NormSettings = NormSettings()) -> bool:
    """:func:`_supported_rows`, ``y`` (and its bias, if any) matching ``x``."""
    y, y_bias = _branch(y)
    if y_bias is not None and (y_bias.dtype != y.dtype or y_bias.shape != y.shape[-1:]):
        return False
    return y.dtype == jnp.bfloat16 and x.shape == y.shape and _supported_rows(x, settings)


def _tile_norm(s, scale, bias, *, eps, width, valid):
    """The LayerNorm of a tile's rows, rounded to ``s``'s dtype, as ``layers.layer_norm``
    computes it. ``valid`` (None: the tile is the width) marks the tile's columns inside
    the width (the rest load as zero): they alone enter the statistics, which divide by
    the true width."""
    if valid is None:
        return layers.layer_norm({"scale": scale, "bias": bias}, s, eps)
    x_hat, _ = _normalised(s.astype(jnp.float32), eps=eps, width=width, valid=valid)
    n = x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return n.astype(s.dtype)


def _normalised(s32, *, eps, width, valid):
    """``((s - mean) * rstd, rstd)`` of a float32 tile's rows; with ``valid`` (see
    :func:`_tile_norm`) the columns past ``width`` are zero and out of the statistics."""
    n = s32.shape[-1] if valid is None else width
    d = s32 - jnp.sum(s32, axis=-1, keepdims=True) / n
    if valid is not None:
        d = jnp.where(valid, d, 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(d * d, axis=-1, keepdims=True) / n + eps)
    return d * rstd, rstd


def _rounded_add(a, b):
    """``a + b`` in float32, rounded to ``a``'s dtype, as XLA's add of the two rounds it."""
    return (a.astype(jnp.float32) + b.astype(jnp.float32)).astype(a.dtype)


def _rows_kernel(*refs, body, tiles: int, periodic: int, outs: int, rows: int,
                 tile: int | None, sums: int = 0):
    """One program of a row-wise kernel: ``refs`` are ``tiles`` token arrays, ``periodic``
    (N, C) arrays whose rows repeat every N token rows (a position embedding over a batch),
    vectors (one value per column), then ``outs`` outputs shaped as the tokens and ``sums``
    (programs, C) float32 outputs, a row of per-column sums over each program's rows;
    ``body(*tiles, *periodic, *vectors, width=, valid=)`` gives the outputs' tiles, then
    the sums as (C,) vectors.
    ``tile`` None: the width is a power of two, and the token and periodic refs are this
    program's (rows, width) blocks. Otherwise the refs are the whole arrays (Triton's blocks
    must be powers of two) and the program reads ``rows`` rows in a ``tile``-wide block
    whose columns past the width are masked loads (zero) and masked stores."""
    n_out = outs + sums
    ins, out_refs = refs[:len(refs) - n_out], refs[len(refs) - n_out:]
    if tile is None:
        results = body(*(r[...] for r in ins), width=None, valid=None)
        for ref, value in zip(out_refs[:outs], results[:outs]):
            ref[...] = value
        for ref, value in zip(out_refs[outs:], results[outs:]):
            ref[...] = value[None, :]
        return
    width = ins[0].shape[-1]
    r = pl.program_id(0) * rows + jax.lax.iota(jnp.int32, rows)
    c = jax.lax.iota(jnp.int32, tile)
    inside = c < width
    valid = jnp.broadcast_to(inside[None, :], (rows, tile))

    def at(ref, row):
        return ref.at[row[:, None], c[None, :]]

    values = [plt.load(at(ref, r), mask=valid, other=0.0) for ref in ins[:tiles]]
    values += [plt.load(at(ref, r % ref.shape[0]), mask=valid, other=0.0)
               for ref in ins[tiles:tiles + periodic]]
    values += [plt.load(ref.at[c], mask=inside, other=0.0) for ref in ins[tiles + periodic:]]
    results = body(*values, width=width, valid=valid)
    for ref, value in zip(out_refs[:outs], results[:outs]):
        plt.store(at(ref, r), value, mask=valid)
    program = pl.program_id(0) + jax.lax.iota(jnp.int32, 1)
    for ref, value in zip(out_refs[outs:], results[outs:]):
        plt.store(at(ref, program), value[None, :], mask=inside[None, :])


def _rows_per_program(tokens: list, periodic: list, settings: NormSettings) -> int:
    """:func:`_norm_rows` over the tokens' rows, also dividing the periodic arrays' N where
    blocks are used (a power-of-two width), so that each block sits in one period."""
    width = tokens[0].shape[-1]
    rows = int(np.prod(tokens[0].shape[:-1]))
    if periodic and dispatch.next_pow2(width) == width:
        rows = math.gcd(rows, periodic[0].shape[0])
    return _norm_rows(rows, width, settings)


def _pallas_rows(body, tokens: list, vectors: list, outs: int, *, name: str,
                 settings: NormSettings, interpret: bool, periodic: tuple = (),
                 sums: int = 0) -> tuple:
    """Run a :func:`_rows_kernel` ``body`` over (..., C) ``tokens`` (all one shape), (N, C)
    ``periodic`` arrays repeating every N rows of the flattened tokens, and per-column
    ``vectors``; returns its ``outs`` outputs, shaped and typed as the first tokens, then
    its ``sums`` column sums as (C,) float32 (each program's partial sums, added by XLA).
    Rows per program: :func:`_rows_per_program`."""
    x = tokens[0]
    width = x.shape[-1]
    flat = [a.reshape(-1, width) for a in tokens]
    bm = _rows_per_program(tokens, list(periodic), settings)
    programs = flat[0].shape[0] // bm
    tile = dispatch.next_pow2(width)
    partials = jax.ShapeDtypeStruct((programs, width), jnp.float32)
    if tile == width:
        tile, block = None, pl.BlockSpec((bm, width), lambda i: (i, 0))
        blocks_per_period = [a.shape[0] // bm for a in periodic]
        periodic_specs = [pl.BlockSpec((bm, width), functools.partial(
            lambda i, n: (i % n, 0), n=n)) for n in blocks_per_period]
        partial_spec = pl.BlockSpec((1, width), lambda i: (i, 0))
    else:
        block = dispatch.whole(flat[0])
        periodic_specs = [dispatch.whole(a) for a in periodic]
        partial_spec = dispatch.whole(partials)
    out = pl.pallas_call(
        functools.partial(_rows_kernel, body=body, tiles=len(flat), periodic=len(periodic),
                          outs=outs, rows=bm, tile=tile, sums=sums),
        out_shape=(jax.ShapeDtypeStruct(flat[0].shape, x.dtype),) * outs + (partials,) * sums,
        grid=(programs,),
        in_specs=[block] * len(flat) + periodic_specs + [dispatch.whole(v) for v in vectors],
        out_specs=(block,) * outs + (partial_spec,) * sums,
        compiler_params=plt.CompilerParams(num_warps=settings.num_warps, num_stages=1),
        interpret=interpret, name=name,
    )(*flat, *periodic, *vectors)
    return (tuple(a.reshape(x.shape) for a in out[:outs])
            + tuple(jnp.sum(a, axis=0) for a in out[outs:]))


# ------------------------------------------------------------------ residual add + norm


def _sum_and_norm(x, y, *vectors, eps, biased, keep_sum, width, valid):
    """The sum of one tile rounded to the stream's dtype, as XLA's add rounds it (with
    ``biased``, the branch's bias, the first vector, first added to ``y`` and rounded, as
    its linear layer would), and the LayerNorm of that rounded sum; the norm alone if not
    ``keep_sum``."""
    y_bias, scale, bias = vectors if biased else (None, *vectors)
    if y_bias is not None:
        y = _rounded_add(y, y_bias)
    s = _rounded_add(x, y)
    n = _tile_norm(s, scale, bias, eps=eps, width=width, valid=valid)
    return (s, n) if keep_sum else (n,)


def pallas_add_layer_norm(p, x, y, *, eps: float, keep_sum: bool = True,
                          settings: NormSettings = NormSettings(), interpret: bool = False):
    """The kernel on (..., C) tokens: one read of ``x`` and ``y`` (a ``layers.Biased`` or
    an array), one write of the sum (unless not ``keep_sum``: then only the norm comes
    back) and of its norm. ``interpret=True`` runs it anywhere."""
    y, y_bias = _branch(y)
    vectors = ([] if y_bias is None else [y_bias]) + [p["scale"], p["bias"]]
    body = functools.partial(_sum_and_norm, eps=eps, biased=y_bias is not None,
                             keep_sum=keep_sum)
    out = _pallas_rows(body, [x, y], vectors, 2 if keep_sum else 1,
                       name="lucid_fn_fused_add_norm", settings=settings, interpret=interpret)
    return out if keep_sum else out[0]


def _add_norm_grad(*refs, eps, from_parts, width, valid):
    """The VJP of one tile's add+norm: the tiles ``(s, gs, gn)`` (the rounded sum and the
    cotangents of the sum and of the norm), or ``(x, y, gn)`` with ``from_parts`` (no sum
    was written: it is recomputed, rounded as the forward rounded it), then the scale.
    Returns the sum's whole cotangent, rounded once to its dtype (XLA rounds the norm's
    part, then the add), and the columns' sums of ``gn * x_hat`` and ``gn``."""
    if from_parts:
        x, y, gn, scale = refs
        s, gs = _rounded_add(x, y), None
    else:
        s, gs, gn, scale = refs
    x_hat, rstd = _normalised(s.astype(jnp.float32), eps=eps, width=width, valid=valid)
    n = s.shape[-1] if valid is None else width
    gn32 = gn.astype(jnp.float32)
    g_hat = gn32 * scale.astype(jnp.float32)
    ds = rstd * (g_hat - jnp.sum(g_hat, axis=-1, keepdims=True) / n
                 - x_hat * (jnp.sum(g_hat * x_hat, axis=-1, keepdims=True) / n))
    if gs is not None:
        ds = ds + gs.astype(jnp.float32)
    return ds.astype(s.dtype), jnp.sum(gn32 * x_hat, axis=0), jnp.sum(gn32, axis=0)


def pallas_add_layer_norm_grad(p, saved, g, *, eps: float, keep_sum: bool = True,
                               settings: NormSettings = NormSettings(),
                               interpret: bool = False):
    """The add+norm's VJP as one kernel: ``saved`` the forward's ``(s,)`` (``keep_sum``;
    ``g = (gs, gn)``) or its inputs ``(x, y)`` (``g = gn``). One read of each token array
    and one write of the sum's cotangent, which is x's and y's; the scale's and bias's
    column sums come from per-program partial sums. Returns ``(dp, dx, dy)``."""
    tokens = [saved[0], *g] if keep_sum else [*saved, g]
    body = functools.partial(_add_norm_grad, eps=eps, from_parts=not keep_sum)
    ds, d_scale, d_bias = _pallas_rows(body, tokens, [p["scale"]], 1, sums=2,
                                       name="lucid_fn_fused_add_norm_grad",
                                       settings=settings, interpret=interpret)
    dp = {"scale": d_scale.astype(p["scale"].dtype), "bias": d_bias.astype(p["bias"].dtype)}
    return dp, ds, ds


def xla_add_layer_norm_grad(p, saved, g, *, eps: float, keep_sum: bool = True):
    """:func:`pallas_add_layer_norm_grad` as XLA's VJP of the reference."""
    if not keep_sum:
        return jax.vjp(functools.partial(reference_add_layer_norm, eps=eps, keep_sum=False),
                       p, *saved)[1](g)
    gs, gn = g
    dp, ds = jax.vjp(lambda p, s: layers.layer_norm(p, s, eps), p, saved[0])[1](gn)
    ds = gs + ds
    return dp, ds, ds


def add_layer_norm(p, x, y, *, eps: float, keep_sum: bool = True, forward_kernel: bool = True,
                   kernels: KernelSettings = KernelSettings()):
    """``(x + y, layer_norm(p, x + y))``, the pre-norm block's residual add and the next
    LayerNorm (``y`` an array or a ``layers.Biased`` branch whose bias the kernel adds):
    one kernel where :func:`supported_add_layer_norm`, else XLA ops. Not ``keep_sum``:
    the norm alone (a stage's closing LayerNorm; the kernel then writes no sum).

    Its gradient (``y`` an array): the backward kernel (:func:`pallas_add_layer_norm_grad`)
    on CUDA, else XLA's. ``forward_kernel`` False (training, where the forward kernel
    gained nothing): the forward is XLA's."""
    kw = dict(eps=eps, keep_sum=keep_sum)
    settings, interpret = kernels.norm, kernels.interpret
    reference = functools.partial(reference_add_layer_norm, **kw)
    if not (settings.enabled and supported_add_layer_norm(x, y, settings)):
        return reference(p, x, y)
    forward = (functools.partial(pallas_add_layer_norm, settings=settings, **kw)
               if forward_kernel else reference)
    if isinstance(y, layers.Biased):  # at inference: the backward kernel takes arrays
        if not forward_kernel:
            return reference(p, x, y)
        return dispatch.on_cuda(forward, reference, p, x, y, interpret=interpret)
    # the backward keeps the sum the forward wrote, not x and y: a block's branch need
    # not live until the backward pass, and one read less
    return dispatch.on_cuda(
        forward, reference, p, x, y, interpret=interpret,
        keep=lambda a, out: (a[0], (out[0],) if keep_sum else a[1:]),
        grad_kernel=functools.partial(pallas_add_layer_norm_grad, settings=settings, **kw),
        xla_grad=functools.partial(xla_add_layer_norm_grad, **kw))


# ------------------------------------------------------------------ norm + norm


def _norm_and_norm(x, *vectors, eps_a, eps, positioned, width, valid):
    """``t = LN_a(x)`` (plus the position embedding's tile, the first of ``vectors``, if
    ``positioned``) and ``LN(t)`` of one tile, each rounded as the XLA path rounds it."""
    pos, scale_a, bias_a, scale, bias = vectors if positioned else (None, *vectors)
    t = _tile_norm(x, scale_a, bias_a, eps=eps_a, width=width, valid=valid)
    if pos is not None:
        t = _rounded_add(t, pos)
    return t, _tile_norm(t, scale, bias, eps=eps, width=width, valid=valid)


def pallas_norm_layer_norm(p_a, p, x, pos=None, *, eps_a: float, eps: float,
                           settings: NormSettings = NormSettings(), interpret: bool = False):
    """The kernel on (B, N, C) tokens (any (..., C) without ``pos``, which is (N, C) or
    (1, N, C)): one read of ``x`` and of each program's rows of ``pos``, one write of each
    norm."""
    body = functools.partial(_norm_and_norm, eps_a=eps_a, eps=eps, positioned=pos is not None)
    vectors = [p_a["scale"], p_a["bias"], p["scale"], p["bias"]]
    periodic = () if pos is None else (pos.astype(x.dtype).reshape(-1, x.shape[-1]),)
    return _pallas_rows(body, [x], vectors, 2, name="lucid_fn_fused_norm_norm",
                        settings=settings, interpret=interpret, periodic=periodic)


def supported_norm_layer_norm(x, pos=None, settings: NormSettings = NormSettings()) -> bool:
    """:func:`_supported_rows`; with ``pos``, (N, C) or (1, N, C) for (B, N, C) tokens,
    and a block of rows that fits in N."""
    if pos is None:
        return _supported_rows(x, settings)
    if x.ndim != 3 or pos.shape[-2:] != x.shape[1:] or pos.size != math.prod(x.shape[1:]):
        return False
    return (_supported_rows(x, settings)
            and _rows_per_program([x], [pos.reshape(x.shape[1:])], settings) > 0)


def norm_layer_norm(p_a, p, x, pos=None, *, eps_a: float, eps: float,
                    kernels: KernelSettings = KernelSettings()):
    """``(t, layer_norm(p, t))`` for ``t = layer_norm(p_a, x)`` (``+ pos``, a position
    embedding (N, C) over (B, N, C) tokens, if given): a stage's patch-embedding norm and
    its first block's norm1, one kernel where :func:`supported_norm_layer_norm`, else XLA
    ops."""
    kw = dict(eps_a=eps_a, eps=eps)
    settings = kernels.norm
    if settings.enabled and supported_norm_layer_norm(x, pos, settings):
        return dispatch.on_cuda(
            functools.partial(pallas_norm_layer_norm, settings=settings, **kw),
            functools.partial(reference_norm_layer_norm, **kw), p_a, p, x, pos,
            interpret=kernels.interpret)
    return reference_norm_layer_norm(p_a, p, x, pos, **kw)
