"""The backward of PVT v2's conv MLP kernel (kernels/conv_mlp.py): the depthwise 3x3
conv's input and taps' gradients in one kernel, from g GELU'(z) (the training forward
keeps GELU'(z), so nothing recomputes the conv), and the edge table's gradient.

Through XLA the taps' gradient was cuDNN's ``wgrad`` kernel, the largest item of
pvt_v2_b2's training profile (benchmarks/NOTES.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from lucid_fn.kernels.backend import plt

from lucid_fn.kernels import dispatch


def program_ids() -> tuple:
    """(image band, strip, channel chunk) of this program. The grid lists them the other
    way round (:func:`grid`): programs that share pixels, one per channel chunk, start
    together and read whole token rows between them."""
    return pl.program_id(2), pl.program_id(1), pl.program_id(0)


def grid(batch: int, tiles: dict) -> tuple:
    return tiles["chunks"], tiles["strips"], batch * tiles["bands"]


def tap(dy: int, dx: int) -> int:
    """Index of the tap at offset (dy, dx) in the (9, hidden) HWIO-ordered taps."""
    return 3 * (dy + 1) + (dx + 1)


def edge_class(n: int, i=None):
    """Each row's (or column's) edge class 2 * first + last, as the edge table indexes it:
    of ``arange(n)``, or of the indices ``i`` (in a kernel too)."""
    i = np.arange(n) if i is None else i
    return 2 * (i == 0).astype(np.int32) + (i == n - 1).astype(np.int32)


def _edge_classes(n: int) -> np.ndarray:
    """(n, 4) one-hot of :func:`edge_class`."""
    return np.eye(4, dtype=np.float32)[edge_class(n)]


def edge_class_sums(g, *, batch: int, hw):
    """(16, hidden) float32: g summed over the positions of each edge class, the edge
    table's gradient."""
    hh, ww = hw
    s = g.reshape(batch, hh, ww, -1).astype(jnp.float32).sum(axis=0)
    return jnp.einsum("hwc,hr,wk->rkc", s, _edge_classes(hh), _edge_classes(ww)).reshape(16, -1)


def _conv_transpose_kernel(g_ref, h_ref, taps_ref, dh_ref, dtaps_ref, *, hw, tiles):
    """The depthwise conv's backward for ``by`` rows of ``bx`` columns and ``bc`` channels
    of one image, from g (the cotangent of the conv's output z) and h (its input):

    - ``dh``: the transposed conv, dh[q] = sum_k w[k] g[q - k] (zero outside the map),
      written for the program's tile (overlaps twice, with the same values);
    - ``dtaps``: this program's part of dw[k] = sum_q h[q] g[q - k], over the positions q
      it owns (its tile less the rows and columns a neighbour's tile also covers), so
      that the partial sums add up to each position once.

    The program walks down the map as the forward kernel does: each row of g is loaded
    once at three horizontal shifts and meets the rows of h above, at and below it
    (loaded once each, zero where not owned) and the three dh rows it touches."""
    hh, ww = hw
    bx, bc, by, bands = tiles["bx"], tiles["bc"], tiles["by"], tiles["bands"]
    band, strip, chunk = program_ids()
    img = band // bands
    image = img * (hh * ww)
    own_y = (band % bands) * by      # rows from here to y0 + by are this program's own
    y0 = jnp.minimum(own_y, hh - by)
    x0 = jnp.minimum(strip * bx, ww - bx)
    cols = pl.ds(pl.multiple_of(chunk * bc, bc), bc)
    channels = pl.multiple_of(chunk * bc, bc) + jax.lax.iota(jnp.int32, bc)
    xs = x0 + jax.lax.iota(jnp.int32, bx)
    own_x = xs >= strip * bx
    w = [taps_ref[k, cols].astype(jnp.float32)[None, :] for k in range(9)]

    def load(ref, yi, dx, mask):
        r = image + jnp.clip(yi, 0, hh - 1) * ww + jnp.clip(xs + dx, 0, ww - 1)
        return plt.load(ref.at[r[:, None], channels[None, :]], other=0.0,
                        mask=jnp.broadcast_to(mask[:, None], (bx, bc)))

    def load_g(yi):
        """Row ``yi`` of g at columns ``xs - 1``, ``xs``, ``xs + 1``; zero outside the map."""
        inside = (yi >= 0) & (yi < hh)
        return tuple(load(g_ref, yi, dx, inside & (xs + dx >= 0) & (xs + dx < ww))
                     for dx in (-1, 0, 1))

    def load_h(yq):
        """Row ``yq`` of h in float32 where this program owns it, else zero."""
        owned = own_x & (yq >= own_y) & (yq < y0 + by) & (yq >= 0)
        return load(h_ref, yq, 0, owned).astype(jnp.float32)

    def step(i, carry):
        above, here, h_up, h_mid, h_down, raw, *dw = carry
        yi = y0 - 1 + i            # this step's row of g; h rows yi - 1, yi, yi + 1
        raw, nxt = load_g(yi + 1), raw   # the next row's loads before this row's arithmetic
        h_next = load_h(yi + 2)
        below = jnp.zeros_like(above)
        for s, v in zip((-1, 0, 1), nxt):   # v = g[yi, x + s] pairs with h[yi + dy, x]
            v = v.astype(jnp.float32)
            above = above + v * w[tap(-1, -s)]
            here = here + v * w[tap(0, -s)]
            below = below + v * w[tap(1, -s)]
            for dy, hq in zip((-1, 0, 1), (h_up, h_mid, h_down)):
                dw[tap(dy, -s)] = dw[tap(dy, -s)] + hq * v

        @pl.when(i >= 2)  # dh rows y0 .. y0 + by - 1 are finished here
        def _():
            dh_ref[pl.ds(image + (yi - 1) * ww + x0, bx), cols] = above.astype(dh_ref.dtype)

        return (here, below, h_mid, h_down, h_next, raw, *dw)

    zeros = jnp.zeros((bx, bc), jnp.float32)
    carry = (zeros, zeros, load_h(y0 - 2), load_h(y0 - 1), load_h(y0), load_g(y0 - 1),
             *([zeros] * 9))
    dw = jax.lax.fori_loop(0, by + 2, step, carry)[6:]
    part = band * tiles["strips"] + strip
    for k in range(9):
        dtaps_ref[part, k, cols] = jnp.sum(dw[k], axis=0)


def conv_transpose(g, h, taps, *, batch: int, hw, tiles: dict, num_warps: int,
                   interpret: bool = False):
    """(dh, dtaps): the depthwise conv's input gradient (B * H * W, hidden) in g's dtype
    and its taps' gradient (9, hidden) in float32, from one kernel that reads g and h once
    (:func:`_conv_transpose_kernel`, over ``tiles``) and XLA's sum of its per-program
    parts."""
    hidden = taps.shape[1]
    parts = batch * tiles["bands"] * tiles["strips"]
    args = (g, h, taps)
    out = (jax.ShapeDtypeStruct(g.shape, g.dtype),
           jax.ShapeDtypeStruct((parts, 9, hidden), jnp.float32))
    dh, dtaps = pl.pallas_call(
        functools.partial(_conv_transpose_kernel, hw=tuple(hw), tiles=tiles),
        out_shape=out,
        grid=grid(batch, tiles),
        in_specs=[dispatch.whole(a) for a in args],
        out_specs=tuple(dispatch.whole(o) for o in out),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="lucid_fn_fused_conv_transpose",
    )(*args)
    return dh, dtaps.sum(axis=0)
