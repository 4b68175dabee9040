"""PVT v2's MLP, ``fc2(GELU(dwconv3x3(fc1(x))))``, with its middle as one kernel.

XLA runs fc1 (a plain, compute-friendly matmul) and fc2; between them one kernel reads
the hidden map once (each program walks a strip of it row by row), adds fc1's bias,
applies the depthwise 3x3 conv, its bias and GELU in float32, and writes the activated
map. Through XLA that part was cuDNN's depthwise conv, a bias fusion and a GELU fusion,
each a full pass over the hidden map (pvt_v2_b2: 16% of the forward in the conv alone).

Where no ReLU sits between fc1 and the conv (every model but ``linear=True``), fc1's
bias and the conv's come in as one table indexed by a position's edge class: adding a
bias before a zero-padded conv is adding, after it, the bias times the sum of the taps
that fall inside the map. Then the kernel has a gradient of its own: in training the
forward also writes GELU'(z), and kernels/conv_mlp_grad.py takes the conv's backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from lucid_fn.kernels.backend import plt

from lucid_fn.kernels import dispatch
from lucid_fn.kernels.conv_mlp_grad import (conv_transpose, edge_class, edge_class_sums, grid,
                                            program_ids, tap)
from lucid_fn.kernels.gelu import gelu, gelu_and_slope_kernel, gelu_kernel
from lucid_fn.kernels.settings import ConvMlpSettings, KernelSettings
from lucid_fn.nn import layers

# Which of the offsets -1, 0, +1 stay inside the map, for a position's edge class
# 2 * (first row/column) + (last row/column).
_VALID_OFFSETS = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 1, 0]], np.float32)


def reference(fc1, dwconv, fc2, x, *, hw, relu: bool, dtype, portable: bool = False):
    """PVT v2's MLP as XLA ops: fc1, [ReLU], depthwise 3x3 conv (padding 1), exact GELU,
    fc2 on (B, N, C) tokens laid out on an ``hw`` map. ``portable``: the forms for
    exporters (the conv's one form for every platform, GELU's erf as one primitive)."""
    h = layers.linear(fc1, x, dtype)
    if relu:
        h = jax.nn.relu(h)
    h = layers.depthwise_conv3x3(dwconv, h, hw, dtype, portable=portable)
    return layers.linear(fc2, gelu(h, approximate=False, portable=portable), dtype)


def supported(fc1, dwconv, fc2, x, dtype, settings: ConvMlpSettings = ConvMlpSettings()) -> bool:
    hidden = fc1["kernel"].shape[1]
    return (jnp.dtype(dtype) == jnp.bfloat16 and dwconv["kernel"].shape == (3, 3, 1, hidden)
            and hidden % settings.block_h == 0)


def edge_bias_table(b1, taps, conv_bias):
    """(16, hidden) float32: conv_bias + b1 * (the sum of the taps inside the map), for
    each edge class 4 * row class + column class."""
    w = taps.astype(jnp.float32).reshape(3, 3, -1)
    inside = jnp.einsum("ya,xb,abc->yxc", _VALID_OFFSETS, _VALID_OFFSETS, w)
    return (conv_bias.astype(jnp.float32) + b1.astype(jnp.float32) * inside).reshape(16, -1)


# ------------------------------------------------------------------ tiles


def _strip_width(ww: int, settings: ConvMlpSettings, block_x: int) -> int:
    """Columns per program: of the powers of two from ``exact_min`` up to ``block_x`` (and
    the map's width), the one whose strips cover the width with the fewest columns, so
    that no strip overlaps its neighbour where a power of two divides the width
    (56 = 7 x 8, 28 = 7 x 4)."""
    widest = min(block_x, dispatch.largest_pow2_at_most(ww))
    widths = [1 << k for k in range(widest.bit_length())
              if 1 << k >= min(settings.exact_min, widest)]
    return min(widths, key=lambda bx: (-(-ww // bx) * bx, -bx))


def conv_tiles(b: int, hw, hidden: int, settings: ConvMlpSettings,
               size: int | None = None) -> dict:
    """The conv kernels' tiling of a (b, hw, hidden) map: a program takes ``by`` rows of
    ``bx`` columns of ``bc`` channels of one image, about ``size`` elements per row
    (default ``block_x * block_h``). Tiles never reach past the map: the last strip and
    band start early and overlap their neighbours (the overlap is computed twice and
    written with the same values), so no store needs a mask. A row of the tile never
    holds more than ``size`` elements: the backward keeps seventeen float32 tiles in
    registers, which strips of ``block_x`` columns at ``block_h`` channels spilled to the
    stack (``benchmarks/kernel_sass.py conv_training`` at Semantic FPN's 128x128 and 32x32
    maps; at 224x224 the strips were narrower)."""
    hh, ww = hw
    size = size or settings.block_x * settings.block_h
    bx = _strip_width(ww, settings, min(settings.block_x,
                                        max(1, size // settings.block_h)))
    bc = settings.block_h
    while (bx * bc * 2 <= size and hidden % (2 * bc) == 0
           and 2 * bc <= (settings.max_h if bx >= 8 else settings.max_h_narrow)):
        bc *= 2  # narrow maps: more channels per program, so tiles keep their size
    strips, chunks = -(-ww // bx), hidden // bc
    bands = max(1, min(hh, -(-settings.min_programs // (b * strips * chunks))))
    return dict(bx=bx, bc=bc, by=-(-hh // bands), strips=strips, bands=bands, chunks=chunks)


# ------------------------------------------------------------------ the forward kernel


def _conv_gelu_kernel(h_ref, b1_ref, taps_ref, bias_ref, o_ref, *slope_ref, hw, tiles, relu,
                      fast):
    """GELU(dwconv3x3(h + b1) + conv bias) for ``by`` rows of ``bx`` columns and ``bc``
    channels of one image, where ``h`` is fc1's matmul (its bias is added here, not in a
    pass of its own): through the 16-row edge table ``bias_ref``, or per tap with
    ``relu`` (the ReLU comes between fc1's bias and the conv). With ``slope_ref`` (the
    training forward) it also writes GELU'(z), z the conv's output.

    The program walks down the map. Each input row is loaded once, at three horizontal
    shifts, and added into the three output rows it touches; the program carries the two
    output rows still open and writes the finished one: 37 instructions per element in
    its loop (SASS, ``benchmarks/kernel_sass.py``) against 79 for nine shifted loads per
    output row. With the edge table, the taps that fall outside the map are predicated
    loads that give zero; with ``relu``, selects zero them after the bias and ReLU."""
    hh, ww = hw
    bx, bc, by, bands = tiles["bx"], tiles["bc"], tiles["by"], tiles["bands"]
    band, strip, chunk = program_ids()
    img = band // bands
    image = img * (hh * ww)
    y0 = jnp.minimum((band % bands) * by, hh - by)
    x0 = jnp.minimum(strip * bx, ww - bx)
    cols = pl.ds(pl.multiple_of(chunk * bc, bc), bc)
    channels = pl.multiple_of(chunk * bc, bc) + jax.lax.iota(jnp.int32, bc)
    xs = x0 + jax.lax.iota(jnp.int32, bx)
    w = [taps_ref[k, cols].astype(jnp.float32)[None, :] for k in range(9)]  # HWIO order
    if relu:
        conv_bias = bias_ref[cols].astype(jnp.float32)[None, :]
        b1 = b1_ref[cols].astype(jnp.float32)[None, :]
    else:
        col_class = 2 * (xs == 0) + (xs == ww - 1)

    def start(yo):
        """Output row ``yo`` before any tap: the biases."""
        if relu:
            return jnp.broadcast_to(conv_bias, (bx, bc))
        row_class = 2 * (yo == 0) + (yo == hh - 1)
        return bias_ref[4 * row_class + col_class, cols].astype(jnp.float32)

    def inside(yi, dx):
        xn = xs + dx
        return (xn >= 0) & (xn < ww) & (yi >= 0) & (yi < hh)

    def load_row(yi):
        """Input row ``yi`` at columns ``xs - 1``, ``xs``, ``xs + 1`` as stored (bf16), by
        indices clamped so that no address leaves the array; with the edge table, zero
        outside the map (predicated loads)."""
        row = image + jnp.clip(yi, 0, hh - 1) * ww
        rows = [row + jnp.clip(xs + dx, 0, ww - 1) for dx in (-1, 0, 1)]
        if relu:
            return tuple(h_ref[r, cols] for r in rows)
        # Both indices as arrays: interpret mode takes masked loads only as gathers;
        # Triton still sees the channels as contiguous (16-byte loads in the SASS).
        return tuple(plt.load(h_ref.at[r[:, None], channels[None, :]], other=0.0,
                              mask=jnp.broadcast_to(inside(yi, dx)[:, None], (bx, bc)))
                     for dx, r in zip((-1, 0, 1), rows))

    def shifted(raw, yi, dx):
        """One of ``load_row``'s tiles in float32, zero outside the map (the padding)."""
        v = raw[dx + 1].astype(jnp.float32)
        if not relu:
            return v
        v = jnp.maximum(v + b1, 0.0)
        return jnp.where(inside(yi, dx)[:, None], v, 0.0)

    def step(i, carry):
        above, here, raw = carry  # output rows yi - 1 and yi; input row yi's loads
        yi = y0 - 1 + i
        ahead = load_row(yi + 1)  # the next row's loads, issued before this row's math
        below = start(yi + 1)
        for dx in (-1, 0, 1):
            v = shifted(raw, yi, dx)
            above = above + v * w[tap(1, dx)]   # dy = +1 for output row yi - 1
            here = here + v * w[tap(0, dx)]
            below = below + v * w[tap(-1, dx)]  # dy = -1 for output row yi + 1

        @pl.when(i >= 2)  # output rows y0 .. y0 + by - 1 are finished here
        def _():
            row = pl.ds(image + (yi - 1) * ww + x0, bx)
            if slope_ref:
                out, d = gelu_and_slope_kernel(above, fast)
                slope_ref[0][row, cols] = d.astype(slope_ref[0].dtype)
            else:
                out = gelu_kernel(above, False, fast)
            o_ref[row, cols] = out.astype(o_ref.dtype)

        return here, below, ahead

    zeros = jnp.zeros((bx, bc), jnp.float32)
    jax.lax.fori_loop(0, by + 2, step, (zeros, zeros, load_row(y0 - 1)))


def conv_inputs(fc1, dwconv, x, *, relu: bool, dtype):
    """What the forward kernel reads: fc1's matmul ``h`` of the (B, N, C) tokens, fc1's
    bias, the nine taps and the biases (the edge table unless ``relu``)."""
    c_in, hidden = fc1["kernel"].shape
    h = jnp.matmul(x.astype(dtype).reshape(-1, c_in), fc1["kernel"].astype(dtype))
    b1 = (fc1["bias"] if "bias" in fc1 else jnp.zeros((hidden,))).astype(dtype)
    taps = dwconv["kernel"].reshape(9, hidden).astype(dtype)
    bias = (dwconv["bias"].astype(dtype) if relu
            else edge_bias_table(b1, taps, dwconv["bias"].astype(dtype)))
    return h, b1, taps, bias


def conv_gelu(h, b1, taps, bias, *, batch: int, hw, relu: bool, settings: ConvMlpSettings,
              slope: bool = False, interpret: bool = False):
    """The forward kernel's call on :func:`conv_inputs`: the activated (B * H * W, hidden)
    map; with ``slope``, that and GELU'(z). ``interpret=True`` runs it anywhere."""
    hidden = taps.shape[1]
    tiles = conv_tiles(batch, hw, hidden, settings)
    args = (h, b1, taps, bias)
    out = jax.ShapeDtypeStruct((batch * hw[0] * hw[1], hidden), h.dtype)  # rows anywhere
    out = (out, out) if slope else out
    return pl.pallas_call(
        functools.partial(_conv_gelu_kernel, hw=tuple(hw), tiles=tiles, relu=relu,
                          fast=not interpret),
        out_shape=out,
        grid=grid(batch, tiles),
        in_specs=[dispatch.whole(a) for a in args],
        out_specs=jax.tree.map(dispatch.whole, out),
        compiler_params=plt.CompilerParams(num_warps=settings.num_warps, num_stages=1),
        interpret=interpret, name="lucid_fn_fused_conv_gelu",
    )(*args)


# ------------------------------------------------------------------ its own gradient


def reference_conv_gelu(h, taps, table, *, hw):
    """What :func:`conv_gelu_table` computes, as XLA ops in h's dtype: GELU(the zero-padded
    depthwise conv of the (B * H * W, hidden) map h + the edge table's row for each
    position)."""
    hh, ww = hw
    hidden = h.shape[-1]
    kernel = {"kernel": taps.reshape(3, 3, 1, hidden), "bias": jnp.zeros((hidden,), taps.dtype)}
    z = layers.conv(kernel, h.reshape(-1, hh, ww, hidden), stride=1, padding=1, groups=hidden)
    z = z.astype(jnp.float32) + table[4 * edge_class(hh)[:, None] + edge_class(ww)]
    return gelu(z, approximate=False).astype(h.dtype).reshape(h.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_gelu_table(h, taps, table, static):
    """The forward kernel with its edge table, differentiated by kernels of its own:
    ``static = (batch, hw, settings, interpret)``. The training forward keeps GELU'(z),
    XLA multiplies the cotangent by it, and the transposed-conv kernel
    (kernels/conv_mlp_grad.py) gives the input's and taps' gradients; XLA sums the
    table's by edge class."""
    return _table_conv_gelu(h, taps, table, static)


def _table_conv_gelu(h, taps, table, static, slope: bool = False):
    """:func:`conv_gelu` with the edge table (fc1's bias is in it: the kernel's own b1
    input goes unread, zeros)."""
    batch, hw, settings, interpret = static
    return conv_gelu(h, jnp.zeros(taps.shape[1:], h.dtype), taps, table, batch=batch, hw=hw,
                     relu=False, settings=settings, slope=slope, interpret=interpret)


def _conv_gelu_table_fwd(h, taps, table, static):
    a, s = _table_conv_gelu(h, taps, table, static, slope=True)
    return a, (h, taps, table, s)


def _conv_gelu_table_bwd(static, res, g):
    h, taps, table, s = res
    batch, hw, settings, interpret = static
    gz = (g.astype(jnp.float32) * s.astype(jnp.float32)).astype(g.dtype)
    tiles = conv_tiles(batch, hw, taps.shape[1], settings, settings.grad_size)
    dh, dtaps = conv_transpose(gz, h, taps, batch=batch, hw=hw, tiles=tiles,
                               num_warps=settings.grad_warps, interpret=interpret)
    return dh, dtaps.astype(taps.dtype), edge_class_sums(gz, batch=batch, hw=hw)


conv_gelu_table.defvjp(_conv_gelu_table_fwd, _conv_gelu_table_bwd)


# ------------------------------------------------------------------ the MLP


def pallas_conv_mlp(fc1, dwconv, fc2, x, *, hw, relu: bool, dtype,
                    settings: ConvMlpSettings = ConvMlpSettings(), interpret: bool = False):
    """The v2 MLP with fc1's bias, the conv, its bias and GELU in one kernel between XLA's
    fc1 and fc2 matmuls, on (B, N, C) tokens of an ``hw`` map (fc2 without a bias: its
    matmul alone). (fc2 accumulated in the kernel, as v1's does, was slower:
    benchmarks/NOTES.md.) ``interpret=True`` runs it anywhere."""
    b, n, _ = x.shape
    c_out = fc2["kernel"].shape[1]
    h, b1, taps, bias = conv_inputs(fc1, dwconv, x, relu=relu, dtype=dtype)
    if relu:  # per-tap biases: the gradient is XLA's, recomputed (see conv_mlp)
        g = conv_gelu(h, b1, taps, bias, batch=b, hw=hw, relu=True, settings=settings,
                      interpret=interpret)
    else:
        g = conv_gelu_table(h, taps, bias, (b, tuple(hw), settings, interpret))
    return layers.linear(fc2, g, dtype).reshape(b, n, c_out)


def conv_mlp(fc1, dwconv, fc2, x, *, hw, relu: bool = False, dtype=None,
             kernels: KernelSettings = KernelSettings()):
    """PVT v2's ``fc2(gelu(dwconv(fc1(x))))`` (ReLU after fc1 when ``relu``): the kernel
    where :func:`supported` (on CUDA), else XLA ops. On the kernel's path fc2's bias comes
    back un-added, as a ``layers.Biased``, for the residual add + LayerNorm kernel to add
    (nn/block.py). Without ``relu`` the gradient is the backward kernels'
    (:func:`conv_gelu_table`), with it XLA's, recomputed from the inputs."""
    dtype = dtype or x.dtype
    settings, interpret = kernels.conv_mlp, kernels.interpret
    if not (settings.enabled and supported(fc1, dwconv, fc2, x, dtype, settings)):
        return reference(fc1, dwconv, fc2, x, hw=hw, relu=relu, dtype=dtype,
                         portable=kernels.portable)
    kw = dict(hw=tuple(hw), relu=relu, dtype=dtype)
    kernel = functools.partial(pallas_conv_mlp, settings=settings, **kw)
    matmul = {"kernel": fc2["kernel"]}
    if relu:
        y = dispatch.on_cuda(kernel, functools.partial(reference, **kw), fc1, dwconv, matmul,
                             x, interpret=interpret)
    elif interpret:
        y = kernel(fc1, dwconv, matmul, x, interpret=True)
    else:
        y = jax.lax.platform_dependent(fc1, dwconv, matmul, x, cuda=kernel,
                                       default=functools.partial(reference, **kw))
    return layers.Biased(y, fc2["bias"].astype(y.dtype)) if "bias" in fc2 else y
