"""Fused kernels for GPUs: one Pallas (Triton) kernel per call, for PVT's MLPs, its
attention core and its residual add + LayerNorm.

Why: in PVT's first two stages the MLP is 8x wider than the tokens (64 -> 512 -> 64 on
3136 tokens per image) and its matmuls are tiny in K and N, so the time goes to memory,
not math. Through XLA, fc1 writes the hidden activations, a separate fusion reads them,
applies GELU and writes them again, and fc2 reads them once more: on an H100, at bf16 and
batch 256, those three passes were ~1.4 ms per stage-1 block of pvt_small's 19.4 ms
forward (benchmarks/NOTES.md). The attention is the same story: 3136 queries against 49
keys write and re-read float32 logits 49 wide.

- :func:`mlp_gelu` (PVT v1, ``fc2(gelu(fc1(x)))``): each program takes a tile of rows,
  walks the hidden axis in chunks (fc1 chunk -> GELU in float32 -> accumulate fc2) and
  writes only the output: the hidden activations never leave the chip.
- :func:`conv_mlp` (PVT v2, ``fc2(gelu(dwconv3x3(fc1(x))))``): XLA runs fc1 (a plain,
  compute-friendly matmul) and fc2; between them one kernel reads the hidden map once
  (each program walks a strip of it row by row), adds fc1's bias, applies the depthwise
  3x3 conv, its bias and GELU in float32, and writes the activated map.
  Through XLA that part was cuDNN's depthwise conv, a bias fusion and a GELU fusion, each
  a full pass over the hidden map (pvt_v2_b2: 16% of the forward in the conv alone).
- :func:`attention` (SRA, both families): each program takes a tile of queries of one
  (image, head), all of that image's keys and values (at most 128), and writes only
  softmax(q k^T * scale) v; heads are read in place from the token layout.
- :func:`add_layer_norm` (both families' blocks): the residual add and the LayerNorm that
  reads it in one pass (two reads, two writes; a stage's closing norm writes the norm
  alone). Through XLA each such LayerNorm was a fusion that recomputed the previous
  one's input, at about 3x the memory floor. :func:`norm_layer_norm` (the stage
  openings) is its sibling: the patch embedding's norm (v1: plus the position embedding)
  and the first norm1 in one pass.

Backward kernels: the v2 conv's (the transposed conv; in training the forward kernel also
writes GELU'(z), so the backward need not recompute the conv), the attention's, and the
add+norm's in training (:func:`pallas_add_layer_norm_grad`: XLA's LayerNorm backward and
residual add were fusions at about 1.6 TB/s, benchmarks/NOTES.md).

They are used only where they pay and are exact to the XLA path up to rounding: on CUDA,
in bfloat16, for the widths the Triton tiles take, where no dropout sits between their
ops (the add+norm's forward kernel: at inference only; in training it gained nothing).
Everywhere else, and for the other gradients (a custom VJP recomputes the XLA form), the
plain XLA ops run. ``LUCID_FN_FUSED=off`` turns them all off.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from lucid_fn.nn import layers

# Rows per program, hidden units per chunk, warps: measured on an H100 (NOTES.md).
# approx_recip: the hardware's approximate reciprocal and exp2 in GELU on the GPU; erf:
# "as" (_phi_kernel) or "rational" (layers.gelu_cdf_f32, the XLA path's form).
BLOCKS = {"block_m": 128, "block_h": 128, "num_warps": 8, "approx_recip": True, "erf": "as"}
MAX_WIDTH = 128  # the float32 accumulator (block_m x width) lives in registers


def enabled() -> bool:
    return os.environ.get("LUCID_FN_FUSED", "on").lower() not in ("off", "0", "false")


def kernel_with_xla_grad(kernel, reference, *args, grad_kernel=None, keep=None,
                         xla_grad=None):
    """``kernel(*args)`` on CUDA, ``reference(*args)`` elsewhere, the gradient the
    reference's (recomputed from the inputs); with ``grad_kernel(*args, g)`` (a cotangent
    for each argument) that kernel's on CUDA instead. ``keep(args, out)``: what the
    backward gets in place of the inputs, then ``grad_kernel(*kept, g)`` on CUDA and
    ``xla_grad(*kept, g)`` elsewhere."""
    @jax.custom_vjp
    def f(*a):
        return jax.lax.platform_dependent(*a, cuda=kernel, default=reference)

    def f_fwd(*a):
        out = f(*a)
        return out, (a if keep is None else keep(a, out))

    def reference_grad(*a):
        return tuple(jax.vjp(reference, *a[:-1])[1](a[-1]))

    def f_bwd(res, g):
        if grad_kernel is None:
            return reference_grad(*res, g)
        return tuple(jax.lax.platform_dependent(*res, g, cuda=grad_kernel,
                                                default=xla_grad or reference_grad))

    f.defvjp(f_fwd, f_bwd)
    return f(*args)


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


def _approx(op: str, v):
    """``op`` (``rcp`` or ``ex2``) as the GPU's approximate instruction (a couple of ulp,
    one MUFU op) instead of an IEEE divide or libdevice's exp2."""
    return plt.elementwise_inline_asm(
        f"{op}.approx.ftz.f32 $0, $1;", args=[v], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)])[0]


def _rcp_approx(v):
    return _approx("rcp", v)


# Abramowitz & Stegun 7.1.26: erfc(z) = t P(t) exp(-z^2) with t = 1 / (1 + p z), z >= 0,
# |error| <= 1.5e-7.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_HALF_LOG2E = 0.5 * math.log2(math.e)


def _phi_of_minus(a, fast: bool):
    """Phi(-a) for ``a = |h|`` in float32 by A&S 7.1.26 (erfc(a / sqrt 2) / 2), as two
    factors ``(t P(t), exp(-a^2 / 2))``: one reciprocal and one exp2 (the GPU's MUFU units,
    ``fast``) and six multiply-adds."""
    rcp = _rcp_approx if fast else (lambda v: 1.0 / v)
    ex2 = functools.partial(_approx, "ex2") if fast else jnp.exp2
    t = rcp(1.0 + (_AS_P * math.sqrt(0.5)) * a)
    poly = 0.5 * _AS_A[4]
    for c in reversed(_AS_A[:4]):
        poly = poly * t + 0.5 * c
    return poly * t, ex2(a * (a * -_HALF_LOG2E))


def _phi_kernel(h, fast: bool):
    """Phi(h) in float32 as the kernels' exact GELU computes it: 1 - Phi(-|h|) for h >= 0.
    The GELU is the kernels' largest instruction cost (NOTES.md). Against float64, over
    [-12, 12]: Phi within 3.0e-7 (the rational erf of XLA's path: 1.8e-7), x Phi(x) within
    4.2e-7 (the rational 1.1e-6), and Phi's far negative tail within 3% relative, where
    the rational's 1 + erf cancels. The kernels write bf16 (relative step 3.9e-3)."""
    tp, e = _phi_of_minus(jnp.abs(h), fast)
    q = tp * e
    return jnp.where(h >= 0, 1.0 - q, q)


def _gelu_as(h, fast: bool):
    """h Phi(h) as max(h, 0) - |h| Phi(-|h|), the same value for either sign of h: a max
    and a multiply-add where h Phi(h) takes a compare, a select, 1 - q and a multiply."""
    a = jnp.abs(h)
    tp, e = _phi_of_minus(a, fast)
    return jnp.maximum(h, 0.0) - (a * tp) * e


def _gelu_f32(h, approximate: bool, fast_recip: bool = False):
    if approximate:
        return jax.nn.gelu(h, approximate=True)
    if BLOCKS.get("erf") == "as":
        return _gelu_as(h, fast_recip)
    return h * layers.gelu_cdf_f32(h, _rcp_approx if fast_recip else None)


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_grad_f32(h, fast_recip: bool = False):
    """d/dh of exact GELU, Phi(h) + h phi(h), in float32: the conv kernel's backward.
    With A&S, phi comes from the exp2 that Phi(-|h|) already takes."""
    if BLOCKS.get("erf") == "as":
        tp, e = _phi_of_minus(jnp.abs(h), fast_recip)
        q = tp * e
        return jnp.where(h >= 0, 1.0 - q, q) + h * (e * _INV_SQRT_2PI)
    return (layers.gelu_cdf_f32(h, _rcp_approx if fast_recip else None)
            + h * (jnp.exp(-0.5 * h * h) * _INV_SQRT_2PI))


def _gelu_and_grad_f32(h, fast_recip: bool = False):
    """(GELU(h), GELU'(h)) in float32, exact GELU: with A&S both from one reciprocal and
    one exp2 (the training forward keeps the slope for the backward)."""
    if BLOCKS.get("erf") != "as":
        return _gelu_f32(h, False, fast_recip), _gelu_grad_f32(h, fast_recip)
    a = jnp.abs(h)
    tp, e = _phi_of_minus(a, fast_recip)
    q = tp * e
    return (jnp.maximum(h, 0.0) - (a * tp) * e,  # as _gelu_as rounds it
            jnp.where(h >= 0, 1.0 - q, q) + h * (e * _INV_SQRT_2PI))


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


def mlp_gelu(fc1, fc2, x, *, approximate: bool, dtype=None):
    """``fc2(gelu(fc1(x)))``: the fused kernel where :func:`supported`, else XLA ops."""
    dtype = dtype or x.dtype
    kw = dict(approximate=approximate, dtype=dtype)
    if enabled() and supported(fc1, fc2, x, dtype):
        return kernel_with_xla_grad(functools.partial(pallas_mlp, **kw),
                                    functools.partial(reference, **kw), fc1, fc2, x)
    return reference(fc1, fc2, x, **kw)


# ------------------------------------------------------------ PVT v2: conv MLP

# Columns per program (at most; a power of two no wider than the map), hidden channels per
# program (more where the map is narrow, up to max_h, or max_h_narrow for strips under 8
# columns: a thread then holds at most 8 channels and the nine taps of each), warps, and
# the least number of programs a call should have (row bands split the map's height to
# reach it at small batches). edge_bias: fc1's and the conv's biases as one gathered
# (row class, channel) table. pad: fc1 runs on tokens with a zero ring, so the kernel's
# loads need no masks (edge table only; slower in the model: the ring costs fc1 7-65%
# more rows). masked_loads: with the table, the taps outside the map are predicated loads
# that give zero, instead of selects. exact_min: strips as narrow as this where that
# removes their overlap (_strip_width). prefetch: input rows loaded ahead. chunks_first:
# launch order (_conv_grid). NOTES.md has the measurements.
CONV_BLOCKS = {"block_x": 32, "block_h": 64, "num_warps": 4, "min_programs": 1024,
               "edge_bias": True, "pad": False, "masked_loads": True, "exact_min": 4,
               "max_h": 256, "max_h_narrow": 128, "prefetch": 1, "chunks_first": True}
# The conv kernel's backward (conv_gelu_table): elements per tile row and warps of its
# two kernels (the transposed conv carries nine weight-gradient accumulators per element,
# so its tiles are smaller); prefetch_g: the first loads the cotangent's row a step ahead;
# own: off, the conv kernel's gradient is XLA's, recomputed (NOTES.md); edge_sums: the
# edge table's gradient summed in the transposed conv's kernel (off: a pass of XLA's).
# slope: how the backward gets g GELU'(z): 0, the first kernel recomputes z from h; 1, the
# training forward writes GELU'(z) beside GELU(z) and XLA multiplies (pvt_v2_b2 training
# 28.61 -> 26.56 ms on the H200, NOTES.md); 2, that, with fc2 inside the custom VJP, so
# that one kernel takes fc2's input gradient, the multiply and the edge table's sums
# (_slope_matmul_kernel: slope_rows a step, up to slope_steps steps a program while
# slope_programs programs remain; slope_warps, or slope_warps_wide where fc2 is over 128
# wide: at 4 warps those spilled registers, kernel_sass.py slope). 2 was slower than 1 in
# the model (27.13-27.19 against 26.56-26.62 ms).
CONV_GRAD_BLOCKS = {"gelu_size": 2048, "gelu_warps": 4, "transpose_size": 512,
                    "transpose_warps": 4, "prefetch_g": False, "own": True,
                    "edge_sums": False, "slope": 1, "slope_rows": 64, "slope_warps": 4,
                    "slope_warps_wide": 8, "slope_steps": 8, "slope_programs": 1024}
# Which of the offsets -1, 0, +1 stay inside the map, for a position's edge class
# 2 * (first row/column) + (last row/column).
_VALID_OFFSETS = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 1, 0]], np.float32)


def reference_conv_mlp(fc1, dwconv, fc2, x, *, hw, relu: bool, dtype):
    """PVT v2's MLP as XLA ops: fc1, [ReLU], depthwise 3x3 conv (padding 1), exact GELU,
    fc2 on (B, N, C) tokens laid out on an ``hw`` map."""
    h = layers.linear(fc1, x, dtype)
    if relu:
        h = jax.nn.relu(h)
    h = layers.depthwise_conv3x3(dwconv, h, hw, dtype)
    return layers.linear(fc2, layers.gelu(h, approximate=False), dtype)


def supported_conv_mlp(fc1, dwconv, fc2, x, dtype) -> bool:
    hidden = fc1["kernel"].shape[1]
    return (jnp.dtype(dtype) == jnp.bfloat16 and dwconv["kernel"].shape == (3, 3, 1, hidden)
            and hidden % CONV_BLOCKS["block_h"] == 0)


def edge_bias_table(b1, taps, conv_bias):
    """(16, hidden) float32: conv_bias + b1 * (the sum of the taps inside the map), for
    each edge class 4 * row class + column class. Adding fc1's bias before a zero-padded
    conv is adding this after it; with no ReLU between them the kernel adds it once per
    element instead of once per tap."""
    w = taps.astype(jnp.float32).reshape(3, 3, -1)
    inside = jnp.einsum("ya,xb,abc->yxc", _VALID_OFFSETS, _VALID_OFFSETS, w)
    return (conv_bias.astype(jnp.float32) + b1.astype(jnp.float32) * inside).reshape(16, -1)


def _largest_pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _strip_width(ww: int) -> int:
    """Columns per program: the largest power of two up to ``block_x`` and the map's
    width; with ``exact_min`` > 0, the power of two (no narrower than that) whose strips
    cover the width with the fewest columns, so that no strip overlaps its neighbour where
    a power of two divides the width (56 = 7 x 8, 28 = 7 x 4)."""
    widest = min(CONV_BLOCKS["block_x"], _largest_pow2_at_most(ww))
    narrowest = CONV_BLOCKS["exact_min"]
    if not narrowest:
        return widest
    widths = [1 << k for k in range(widest.bit_length()) if 1 << k >= min(narrowest, widest)]
    return min(widths, key=lambda bx: (-(-ww // bx) * bx, -bx))


def conv_tiles(b: int, hw, hidden: int, size: int | None = None) -> dict:
    """The conv kernels' tiling of a (b, hw, hidden) map: a program takes ``by`` rows of
    ``bx`` columns of ``bc`` channels of one image, about ``size`` elements per row
    (default ``block_x * block_h``). Tiles never reach past the map: the last strip and
    band start early and overlap their neighbours (the overlap is computed twice and
    written with the same values), so no store needs a mask."""
    hh, ww = hw
    bx = _strip_width(ww)
    bc = CONV_BLOCKS["block_h"]
    size = size or CONV_BLOCKS["block_x"] * CONV_BLOCKS["block_h"]
    while (bx * bc * 2 <= size and hidden % (2 * bc) == 0
           and 2 * bc <= CONV_BLOCKS["max_h" if bx >= 8 else "max_h_narrow"]):
        bc *= 2  # narrow maps: more channels per program, so tiles keep their size
    strips, chunks = -(-ww // bx), hidden // bc
    bands = max(1, min(hh, -(-CONV_BLOCKS["min_programs"] // (b * strips * chunks))))
    return dict(bx=bx, bc=bc, by=-(-hh // bands), strips=strips, bands=bands, chunks=chunks)


def _conv_grid(batch: int, tiles: dict) -> tuple:
    """Launch order: with ``chunks_first`` the programs that share pixels (one per channel
    chunk) start together and read whole token rows between them."""
    grid = (batch * tiles["bands"], tiles["strips"], tiles["chunks"])
    return grid[::-1] if CONV_BLOCKS["chunks_first"] else grid


def _conv_program_ids() -> tuple:
    """(image band, strip, channel chunk) of this program, whatever the launch order."""
    ids = tuple(pl.program_id(i) for i in range(3))
    return ids[::-1] if CONV_BLOCKS["chunks_first"] else ids


def _tap(dy: int, dx: int) -> int:
    """Index of the tap at offset (dy, dx) in the (9, hidden) HWIO-ordered taps."""
    return 3 * (dy + 1) + (dx + 1)


def _conv_gelu_kernel(h_ref, b1_ref, taps_ref, bias_ref, *refs, hw, tiles, relu,
                      fast_recip, padded, slope=False):
    """GELU(dwconv3x3(h + b1) + conv bias) for ``by`` rows of ``bx`` columns and ``bc``
    channels of one image, where ``h`` is fc1's matmul (its bias is added here, not in a
    pass of its own): with a 16-row ``bias_ref`` (no ReLU) through the edge-class table,
    else per tap. With ``refs = (g_ref, o_ref)`` (the backward) it writes instead
    g GELU'(z), z the conv's output recomputed, g the cotangent of GELU's output. With
    ``slope`` (``refs = (o_ref, s_ref)``, the training forward) it also writes GELU'(z),
    so that the backward need not recompute the conv.

    The program walks down the map. Each input row is loaded once, at three horizontal
    shifts, and added into the three output rows it touches; the program carries the two
    output rows still open and writes the finished one: 37 instructions per element in
    its loop (SASS, ``benchmarks/kernel_sass.py``) against 79 for nine shifted loads per
    output row. Where the edge table carries fc1's bias, the taps that fall outside the
    map are predicated loads that give zero; otherwise selects zero them after the bias
    (and ReLU). About 1.8x the memory floor on an H200 (NOTES.md).

    ``padded``: ``h`` is fc1 of the tokens with a ring of zeros around each image, so it
    is zero there (fc1's bias comes in through the table): rows load as plain windows,
    with no clamped indices and no masks."""
    if slope:
        (o_ref, s_ref), g_ref = refs, ()
    else:
        *g_ref, o_ref = refs
    hh, ww = hw
    bx, bc, by, bands = tiles["bx"], tiles["bc"], tiles["by"], tiles["bands"]
    band, strip, chunk = _conv_program_ids()
    img = band // bands
    image = img * (hh * ww)
    y0 = jnp.minimum((band % bands) * by, hh - by)
    x0 = jnp.minimum(strip * bx, ww - bx)
    cols = pl.ds(pl.multiple_of(chunk * bc, bc), bc)
    channels = pl.multiple_of(chunk * bc, bc) + jax.lax.iota(jnp.int32, bc)
    xs = x0 + jax.lax.iota(jnp.int32, bx)
    w = [taps_ref[k, cols].astype(jnp.float32)[None, :] for k in range(9)]  # HWIO order
    table = bias_ref.shape[0] == 16
    if table:
        col_class = 2 * (xs == 0) + (xs == ww - 1)
    else:
        conv_bias = bias_ref[cols].astype(jnp.float32)[None, :]
        b1 = b1_ref[cols].astype(jnp.float32)[None, :]

    def start(yo):
        """Output row ``yo`` before any tap: the biases."""
        if table:
            row_class = 2 * (yo == 0) + (yo == hh - 1)
            return bias_ref[4 * row_class + col_class, cols].astype(jnp.float32)
        return jnp.broadcast_to(conv_bias, (bx, bc))

    def load_row(yi):
        """Input row ``yi`` at columns ``xs - 1``, ``xs``, ``xs + 1`` as stored (bf16), by
        indices clamped so that no address leaves the array; zero outside the map with
        ``masked_loads``, else ``shifted`` masks them."""
        if padded:  # rows -1 and hh are the zero ring; the prefetch past it is clamped
            pw = ww + 2
            row = img * ((hh + 2) * pw) + jnp.clip(yi + 1, 0, hh + 1) * pw
            return tuple(h_ref[pl.ds(row + x0 + 1 + dx, bx), cols] for dx in (-1, 0, 1))
        row = image + jnp.clip(yi, 0, hh - 1) * ww
        rows = [row + jnp.clip(xs + dx, 0, ww - 1) for dx in (-1, 0, 1)]
        if masked_loads:  # zero where the tap falls outside the map: predicated loads
            # Both indices as arrays: interpret mode takes masked loads only as gathers;
            # Triton still sees the channels as contiguous (16-byte loads in the SASS).
            return tuple(plt.load(h_ref.at[r[:, None], channels[None, :]], other=0.0,
                                  mask=jnp.broadcast_to(inside(yi, dx)[:, None], (bx, bc)))
                         for dx, r in zip((-1, 0, 1), rows))
        return tuple(h_ref[r, cols] for r in rows)

    def inside(yi, dx):
        xn = xs + dx
        return (xn >= 0) & (xn < ww) & (yi >= 0) & (yi < hh)

    def shifted(raw, yi, dx):
        """One of ``load_row``'s tiles in float32, zero outside the map (the conv's
        padding)."""
        v = raw[dx + 1].astype(jnp.float32)
        if padded or masked_loads:
            return v
        if not table:
            v = v + b1
            if relu:
                v = jnp.maximum(v, 0.0)
        return jnp.where(inside(yi, dx)[:, None], v, 0.0)

    # fc1's bias comes in through the table, so outside the map the input is just zero
    masked_loads = table and not padded and bool(CONV_BLOCKS["masked_loads"])
    depth = int(CONV_BLOCKS["prefetch"])  # input rows loaded ahead of their use

    def load_g(yo):
        return g_ref[0][pl.ds(image + jnp.clip(yo, 0, hh - 1) * ww + x0, bx), cols]

    # the backward: the cotangent's row loaded a step before its use
    g_ahead = bool(g_ref) and bool(CONV_GRAD_BLOCKS["prefetch_g"])

    def step(i, carry):
        if g_ahead:
            g_row, *carry = carry
        above, here, *ahead = carry  # output rows yi - 1 and yi; input rows yi .. yi+depth-1
        yi = y0 - 1 + i
        if g_ahead:
            g_now, g_row = g_row, load_g(yi)
        if depth:  # issue the loads of row yi + depth before this row's arithmetic
            raw, ahead = ahead[0], [*ahead[1:], load_row(yi + depth)]
        else:
            raw = load_row(yi)
        below = start(yi + 1)
        for dx in (-1, 0, 1):
            v = shifted(raw, yi, dx)
            above = above + v * w[_tap(1, dx)]   # dy = +1 for output row yi - 1
            here = here + v * w[_tap(0, dx)]
            below = below + v * w[_tap(-1, dx)]  # dy = -1 for output row yi + 1

        @pl.when(i >= 2)  # output rows y0 .. y0 + by - 1 are finished here
        def _():
            row = pl.ds(image + (yi - 1) * ww + x0, bx)
            if g_ref:
                g = g_now if g_ahead else g_ref[0][row, cols]
                out = g.astype(jnp.float32) * _gelu_grad_f32(above, fast_recip)
            elif slope:
                out, d = _gelu_and_grad_f32(above, fast_recip)
                s_ref[row, cols] = d.astype(s_ref.dtype)
            else:
                out = _gelu_f32(above, False, fast_recip)
            o_ref[row, cols] = out.astype(o_ref.dtype)

        return ((g_row,) if g_ahead else ()) + (here, below, *ahead)

    zeros = jnp.zeros((bx, bc), jnp.float32)
    first = [load_row(y0 - 1 + k) for k in range(depth)]
    g_first = (load_g(y0 - 2),) if g_ahead else ()
    jax.lax.fori_loop(0, by + 2, step, (*g_first, zeros, zeros, *first))


def _whole(a):
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _conv_layout(relu: bool) -> tuple[bool, bool]:
    """(table, padded): fc1's bias through the edge table (no ReLU between it and the
    conv), and fc1 run on zero-ringed tokens (with the table only)."""
    table = bool(CONV_BLOCKS["edge_bias"]) and not relu
    return table, table and bool(CONV_BLOCKS["pad"])


def conv_inputs(fc1, dwconv, x, *, hw, relu: bool, dtype):
    """What the conv kernel reads: fc1's matmul ``h`` of the (B, N, C) tokens (with a
    zero ring around each image when the kernel runs ``padded``), fc1's bias, the nine
    taps and the biases (the edge-class table where no ReLU sits between fc1's bias and
    the conv)."""
    b, _, c_in = x.shape
    hidden = fc1["kernel"].shape[1]
    table, padded = _conv_layout(relu)
    tokens = x.astype(dtype)
    if padded:  # fc1 has no bias in this matmul, so it is zero on the ring
        tokens = jnp.pad(tokens.reshape(b, *hw, c_in), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h = jnp.matmul(tokens.reshape(-1, c_in), fc1["kernel"].astype(dtype))
    b1 = (fc1["bias"] if "bias" in fc1 else jnp.zeros((hidden,))).astype(dtype)
    taps = dwconv["kernel"].reshape(9, hidden).astype(dtype)
    bias = (edge_bias_table(b1, taps, dwconv["bias"].astype(dtype)) if table
            else dwconv["bias"].astype(dtype))
    return h, b1, taps, bias, padded


def conv_gelu(h, b1, taps, bias, *, batch: int, hw, relu: bool, padded: bool,
              interpret: bool = False, g=None, slope: bool = False):
    """The conv kernel's call on :func:`conv_inputs`: the activated (B * H * W, hidden)
    map; with ``slope``, that and GELU'(z) (z the conv's output); given ``g``, the
    cotangent of that map, g GELU'(z) instead (the backward's first kernel, which
    recomputes z). ``interpret=True`` runs it anywhere."""
    hidden = taps.shape[1]
    size = None if g is None else CONV_GRAD_BLOCKS["gelu_size"]
    tiles = conv_tiles(batch, hw, hidden, size)
    kw = dict(hw=tuple(hw), tiles=tiles, relu=relu, padded=padded, slope=slope,
              fast_recip=bool(BLOCKS.get("approx_recip")) and not interpret)
    warps = CONV_BLOCKS["num_warps"] if g is None else CONV_GRAD_BLOCKS["gelu_warps"]
    params = plt.CompilerParams(num_warps=warps, num_stages=1)
    args = (h, b1, taps, bias) + (() if g is None else (g,))
    # Programs write rows anywhere in it.
    out = jax.ShapeDtypeStruct((batch * hw[0] * hw[1], hidden), h.dtype)
    out = (out, out) if slope else out
    return pl.pallas_call(
        functools.partial(_conv_gelu_kernel, **kw),
        out_shape=out,
        grid=_conv_grid(batch, tiles),
        in_specs=[_whole(a) for a in args],
        out_specs=jax.tree.map(_whole, out),
        compiler_params=params, interpret=interpret,
        name="lucid_fn_fused_conv_gelu" + ("" if g is None else "_grad"),
    )(*args)


def _conv_transpose_kernel(g_ref, h_ref, taps_ref, dh_ref, dtaps_ref, *dtable_ref, hw,
                           tiles):
    """The depthwise conv's backward for ``by`` rows of ``bx`` columns and ``bc`` channels
    of one image, from g (the cotangent of the conv's output z) and h (its input):

    - ``dh``: the transposed conv, dh[q] = sum_k w[k] g[q - k] (zero outside the map),
      written for the program's tile (overlaps twice, with the same values);
    - ``dtaps``: this program's part of dw[k] = sum_q h[q] g[q - k], over the positions q
      it owns (its tile less the rows and columns a neighbour's tile also covers), so
      that the partial sums add up to each position once;
    - ``dtable`` (if given): its part of the edge table's gradient, g summed over the
      positions it owns of each of the 16 edge classes (:func:`edge_class_sums`).

    The program walks down the map as the forward kernel does: each row of g is loaded
    once at three horizontal shifts and meets the rows of h above, at and below it
    (loaded once each, zero where not owned) and the three dh rows it touches."""
    hh, ww = hw
    bx, bc, by, bands = tiles["bx"], tiles["bc"], tiles["by"], tiles["bands"]
    band, strip, chunk = _conv_program_ids()
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
        dw, inner = dw[:9], dw[9:]
        yi = y0 - 1 + i            # this step's row of g; h rows yi - 1, yi, yi + 1
        raw, nxt = load_g(yi + 1), raw   # the next row's loads before this row's arithmetic
        h_next = load_h(yi + 2)
        if inner:  # the edge table's interior rows: one FMA per element, a uniform weight
            counted = (yi >= own_y) & (yi < y0 + by) & (yi > 0) & (yi < hh - 1)
            inner = [inner[0] + nxt[1].astype(jnp.float32) * counted.astype(jnp.float32)]
        below = jnp.zeros_like(above)
        for s, v in zip((-1, 0, 1), nxt):   # v = g[yi, x + s] pairs with h[yi + dy, x]
            v = v.astype(jnp.float32)
            above = above + v * w[_tap(-1, -s)]
            here = here + v * w[_tap(0, -s)]
            below = below + v * w[_tap(1, -s)]
            for dy, hq in zip((-1, 0, 1), (h_up, h_mid, h_down)):
                dw[_tap(dy, -s)] = dw[_tap(dy, -s)] + hq * v

        @pl.when(i >= 2)  # dh rows y0 .. y0 + by - 1 are finished here
        def _():
            dh_ref[pl.ds(image + (yi - 1) * ww + x0, bx), cols] = above.astype(dh_ref.dtype)

        return (here, below, h_mid, h_down, h_next, raw, *dw, *inner)

    zeros = jnp.zeros((bx, bc), jnp.float32)
    carry = (zeros, zeros, load_h(y0 - 2), load_h(y0 - 1), load_h(y0), load_g(y0 - 1),
             *([zeros] * (9 + len(dtable_ref))))
    out = jax.lax.fori_loop(0, by + 2, step, carry)[6:]
    part = band * tiles["strips"] + strip
    for k in range(9):
        dtaps_ref[part, k, cols] = jnp.sum(out[k], axis=0)
    if dtable_ref:
        # {row class: g summed over this program's rows of it}: the interior rows' sum the
        # loop kept, the first and last rows loaded again by the programs owning them
        def g_row(y, owns):
            return load(g_ref, y, 0, own_x & owns).astype(jnp.float32)

        first = g_row(0, own_y == 0)
        rows = ({3: first} if hh == 1 else
                {0: out[9], 2: first, 1: g_row(hh - 1, y0 + by == hh)})
        col_class = _edge_class(ww, xs)
        for r in range(4):
            for c in range(4):
                total = (jnp.sum(jnp.where((own_x & (col_class == c))[:, None], rows[r], 0.0),
                                 axis=0) if r in rows else jnp.zeros((bc,), jnp.float32))
                dtable_ref[0][part, 4 * r + c, cols] = total


def conv_transpose(g, h, taps, *, batch: int, hw, edge_sums: bool = False,
                   interpret: bool = False):
    """(dh, dtaps): the depthwise conv's input gradient (B * H * W, hidden) in g's dtype
    and its taps' gradient (9, hidden) in float32, from one kernel that reads g and h once
    (:func:`_conv_transpose_kernel`) and XLA's sum of its per-program parts; with
    ``edge_sums`` also :func:`edge_class_sums` of g, (16, hidden), from the same kernel."""
    hidden = taps.shape[1]
    tiles = conv_tiles(batch, hw, hidden, CONV_GRAD_BLOCKS["transpose_size"])
    parts = batch * tiles["bands"] * tiles["strips"]
    args = (g, h, taps)
    out = (jax.ShapeDtypeStruct(g.shape, g.dtype),
           jax.ShapeDtypeStruct((parts, 9, hidden), jnp.float32))
    if edge_sums:
        out += (jax.ShapeDtypeStruct((parts, 16, hidden), jnp.float32),)
    dh, *sums = pl.pallas_call(
        functools.partial(_conv_transpose_kernel, hw=tuple(hw), tiles=tiles),
        out_shape=out,
        grid=_conv_grid(batch, tiles),
        in_specs=[_whole(a) for a in args],
        out_specs=tuple(_whole(o) for o in out),
        compiler_params=plt.CompilerParams(num_warps=CONV_GRAD_BLOCKS["transpose_warps"],
                                           num_stages=1),
        interpret=interpret, name="lucid_fn_fused_conv_transpose",
    )(*args)
    return (dh, *(s.sum(axis=0) for s in sums))


def _edge_class(n: int, i=None):
    """Each row's (or column's) edge class 2 * first + last, as the table indexes it: of
    ``arange(n)``, or of the indices ``i`` (in a kernel too)."""
    i = np.arange(n) if i is None else i
    return 2 * (i == 0).astype(np.int32) + (i == n - 1).astype(np.int32)


def _edge_classes(n: int) -> np.ndarray:
    """(n, 4) one-hot of :func:`_edge_class`."""
    return np.eye(4, dtype=np.float32)[_edge_class(n)]


def edge_class_sums(g, *, batch: int, hw):
    """(16, hidden) float32: g summed over the positions of each edge class, the edge
    table's gradient."""
    hh, ww = hw
    s = g.reshape(batch, hh, ww, -1).astype(jnp.float32).sum(axis=0)
    return jnp.einsum("hwc,hr,wk->rkc", s, _edge_classes(hh), _edge_classes(ww)).reshape(16, -1)


def reference_conv_gelu(h, taps, table, *, hw):
    """What :func:`conv_gelu_table` computes, as XLA ops in h's dtype: GELU(the zero-padded
    depthwise conv of the (B * H * W, hidden) map h + the edge table's row for each
    position)."""
    hh, ww = hw
    hidden = h.shape[-1]
    kernel = {"kernel": taps.reshape(3, 3, 1, hidden), "bias": jnp.zeros((hidden,), taps.dtype)}
    z = layers.conv(kernel, h.reshape(-1, hh, ww, hidden), stride=1, padding=1, groups=hidden)
    z = z.astype(jnp.float32) + table[4 * _edge_class(hh)[:, None] + _edge_class(ww)]
    return layers.gelu(z, approximate=False).astype(h.dtype).reshape(h.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_gelu_table(h, taps, table, static):
    """The conv kernel with its edge table (no ReLU), differentiable by kernels of its
    own: ``static = (batch, hw, interpret)``. Its backward forms g GELU'(z): with
    ``CONV_GRAD_BLOCKS["slope"]`` 0 a kernel reads h and the cotangent and recomputes z
    (the forward kernel), else the forward kept GELU'(z) and XLA multiplies; then one
    kernel reads that and h for the input and taps' gradients and sums it by edge class
    for the table's (CONV_GRAD_BLOCKS["edge_sums"]; off, XLA sums it in a pass of its
    own)."""
    return _table_conv_gelu(h, taps, table, static)


def _table_conv_gelu(h, taps, table, static, g=None, slope: bool = False):
    """:func:`conv_gelu` with the edge table (fc1's bias is in it: the kernel's own b1
    input goes unread, zeros)."""
    batch, hw, interpret = static
    return conv_gelu(h, jnp.zeros(taps.shape[1:], h.dtype), taps, table, batch=batch, hw=hw,
                     relu=False, padded=False, interpret=interpret, g=g, slope=slope)


def _conv_gelu_table_fwd(h, taps, table, static):
    if CONV_GRAD_BLOCKS["slope"]:
        a, s = _table_conv_gelu(h, taps, table, static, slope=True)
        return a, (h, taps, table, s)
    return conv_gelu_table(h, taps, table, static), (h, taps, table, None)


def _conv_gelu_table_bwd(static, res, g):
    h, taps, table, s = res
    if s is None:
        gz = _table_conv_gelu(h, taps, table, static, g)
    else:
        gz = (g.astype(jnp.float32) * s.astype(jnp.float32)).astype(g.dtype)
    return _conv_backward(gz, h, taps, static)


conv_gelu_table.defvjp(_conv_gelu_table_fwd, _conv_gelu_table_bwd)


def _conv_backward(gz, h, taps, static, dtable=None):
    """(dh, dtaps, dtable) of the conv + edge table from g GELU'(z): the transposed-conv
    kernel, and the table's gradient from it, from XLA, or ``dtable`` as given."""
    batch, hw, interpret = static
    in_kernel = dtable is None and CONV_GRAD_BLOCKS["edge_sums"]
    dh, dtaps, *sums = conv_transpose(gz, h, taps, batch=batch, hw=hw, edge_sums=in_kernel,
                                      interpret=interpret)
    if dtable is None:
        dtable = sums[0] if in_kernel else edge_class_sums(gz, batch=batch, hw=hw)
    return dh, dtaps.astype(taps.dtype), dtable


def _k_pieces(k: int) -> tuple:
    """(start, width) pieces of a contraction of ``k`` (a multiple of 16): powers of two
    up to 128, as Triton's dots take them."""
    pieces, k0 = [], 0
    while k0 < k:
        n = min(128, _largest_pow2_at_most(k - k0))
        pieces.append((k0, n))
        k0 += n
    return tuple(pieces)


def slope_tiles(rows: int, hidden: int) -> dict:
    """:func:`_slope_matmul_kernel`'s tiling of (rows, hidden): ``br`` rows a step,
    ``steps`` steps and ``bc`` channels a program, as many steps as keep at least 1,024
    programs (``slope_programs``; up to ``slope_steps``: fewer partial sums of the edge
    table to add)."""
    br = CONV_GRAD_BLOCKS["slope_rows"]
    bc = 128 if hidden % 128 == 0 else 64
    tiles, chunks = -(-rows // br), hidden // bc
    steps = max(1, min(CONV_GRAD_BLOCKS["slope_steps"],
                       tiles * chunks // CONV_GRAD_BLOCKS["slope_programs"]))
    return dict(br=br, bc=bc, steps=steps, blocks=-(-tiles // steps), chunks=chunks)


def _slope_matmul_kernel(dy_ref, w_ref, s_ref, gz_ref, parts_ref, *, rows, hw, tiles,
                         pieces):
    """g GELU'(z) for ``steps`` tiles of ``br`` rows and ``bc`` channels: g = dy w^T
    (fc2's input gradient, float32, never written), times the slope the forward kept,
    rounded once; and this program's part of the edge table's gradient, g GELU'(z) summed
    by edge class (:func:`edge_class_sums`) as a (16 x br) one-hot times the tile on the
    tensor cores. Rows past ``rows`` (the clamped tail) add nothing to the sums."""
    br, bc, steps = tiles["br"], tiles["bc"], tiles["steps"]
    hh, ww = hw
    blk, chunk = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(chunk * bc, bc), bc)
    classes = jax.lax.broadcasted_iota(jnp.int32, (16, br), 0)

    def step(j, acc):
        idx = (blk * steps + j) * br + jax.lax.iota(jnp.int32, br)
        r = jnp.minimum(idx, rows - 1)
        g = sum(jax.lax.dot_general(dy_ref[r, pl.ds(k0, n)], w_ref[cols, pl.ds(k0, n)],
                                    (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                for k0, n in pieces)  # w read each step: held, wide K would spill
        gz = (g * s_ref[r, cols].astype(jnp.float32)).astype(gz_ref.dtype)
        gz_ref[r, cols] = gz
        p = r % (hh * ww)
        y, x = p // ww, p % ww
        cls = 4 * _edge_class(hh, y) + _edge_class(ww, x)
        onehot = ((classes == cls[None, :]) & (idx < rows)[None, :]).astype(gz.dtype)
        return acc + jnp.dot(onehot, gz, preferred_element_type=jnp.float32)

    parts_ref[...] = jax.lax.fori_loop(0, steps, step, jnp.zeros((16, bc), jnp.float32))


def slope_warps(c_out: int) -> int:
    return CONV_GRAD_BLOCKS["slope_warps_wide" if c_out > 128 else "slope_warps"]


def supported_slope_matmul(w2) -> bool:
    return w2.shape[1] % 16 == 0


def slope_matmul(dy, w2, s, *, batch: int, hw, interpret: bool = False):
    """(g GELU'(z), the edge table's gradient): g = ``dy`` (B * H * W, c_out) times fc2's
    kernel ``w2`` (hidden, c_out) transposed, by :func:`_slope_matmul_kernel`; XLA adds
    the programs' (16, hidden) parts."""
    rows, hidden = s.shape
    tiles = slope_tiles(rows, hidden)
    parts = jax.ShapeDtypeStruct((tiles["blocks"], 16, hidden), jnp.float32)
    gz, parts = pl.pallas_call(
        functools.partial(_slope_matmul_kernel, rows=rows, hw=tuple(hw), tiles=tiles,
                          pieces=_k_pieces(w2.shape[1])),
        out_shape=(jax.ShapeDtypeStruct(s.shape, dy.dtype), parts),
        grid=(tiles["blocks"], tiles["chunks"]),
        in_specs=[_whole(a) for a in (dy, w2, s)],
        out_specs=(_whole(s), pl.BlockSpec((None, 16, tiles["bc"]), lambda i, c: (i, 0, c))),
        compiler_params=plt.CompilerParams(num_warps=slope_warps(w2.shape[1]), num_stages=1),
        interpret=interpret, name="lucid_fn_fused_slope_matmul",
    )(dy, w2, s)
    return gz, parts.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def conv_gelu_fc2(h, taps, table, w2, static):
    """``conv_gelu_table(h, taps, table, static) @ w2`` (fc2 without its bias), with fc2
    inside the custom VJP so that its input gradient never reaches memory: the backward
    takes g GELU'(z) and the edge table's sums from :func:`slope_matmul` (the forward kept
    GELU'(z)), fc2's kernel gradient from XLA, then the transposed-conv kernel."""
    return jnp.matmul(_table_conv_gelu(h, taps, table, static), w2)


def _conv_gelu_fc2_fwd(h, taps, table, w2, static):
    a, s = _table_conv_gelu(h, taps, table, static, slope=True)
    return jnp.matmul(a, w2), (h, taps, w2, a, s)


def _conv_gelu_fc2_bwd(static, res, dy):
    h, taps, w2, a, s = res
    batch, hw, interpret = static
    dw2 = jax.vjp(lambda w: jnp.matmul(a, w), w2)[1](dy)[0]
    gz, dtable = slope_matmul(dy, w2, s, batch=batch, hw=hw, interpret=interpret)
    return (*_conv_backward(gz, h, taps, static, dtable), dw2)


conv_gelu_fc2.defvjp(_conv_gelu_fc2_fwd, _conv_gelu_fc2_bwd)


def pallas_conv_mlp(fc1, dwconv, fc2, x, *, hw, relu: bool, dtype, interpret: bool = False):
    """The v2 MLP with fc1's bias, the conv, its bias and GELU in one kernel between XLA's
    fc1 and fc2 matmuls, on (B, N, C) tokens of an ``hw`` map. (fc2 accumulated in the
    kernel, as the v1 kernel does, was slower: benchmarks/NOTES.md.) ``interpret=True``
    runs it anywhere."""
    b, n, _ = x.shape
    c_out = fc2["kernel"].shape[1]
    h, b1, taps, bias, padded = conv_inputs(fc1, dwconv, x, hw=hw, relu=relu, dtype=dtype)
    static = (b, tuple(hw), interpret)
    table = bias.shape[0] == 16 and not padded  # the edge table: the kernels' own gradient
    if table and CONV_GRAD_BLOCKS["slope"] == 2 and supported_slope_matmul(fc2["kernel"]):
        y = conv_gelu_fc2(h, taps, bias, fc2["kernel"].astype(dtype), static)
        if "bias" in fc2:  # as layers.linear adds it
            y = y + fc2["bias"].astype(dtype)
        return y.reshape(b, n, c_out)
    if table:
        g = conv_gelu_table(h, taps, bias, static)
    else:
        g = conv_gelu(h, b1, taps, bias, batch=b, hw=hw, relu=relu, padded=padded,
                      interpret=interpret)
    return layers.linear(fc2, g, dtype).reshape(b, n, c_out)


def conv_mlp(fc1, dwconv, fc2, x, *, hw, relu: bool = False, dtype=None):
    """PVT v2's ``fc2(gelu(dwconv(fc1(x))))`` (ReLU after fc1 when ``relu``): the fused
    kernel where :func:`supported_conv_mlp`, else XLA ops. With the edge table (no ReLU)
    its gradient is the backward kernels' (:func:`conv_gelu_table`); otherwise XLA's,
    recomputed from the inputs."""
    dtype = dtype or x.dtype
    kw = dict(hw=tuple(hw), relu=relu, dtype=dtype)
    if enabled() and supported_conv_mlp(fc1, dwconv, fc2, x, dtype):
        kernel = functools.partial(pallas_conv_mlp, **kw)
        reference = functools.partial(reference_conv_mlp, **kw)
        if conv_has_own_grad(relu):
            return jax.lax.platform_dependent(fc1, dwconv, fc2, x, cuda=kernel,
                                              default=reference)
        return kernel_with_xla_grad(kernel, reference, fc1, dwconv, fc2, x)
    return reference_conv_mlp(fc1, dwconv, fc2, x, **kw)


def conv_has_own_grad(relu: bool) -> bool:
    """Whether the conv kernel's call is differentiated by the backward kernels: with the
    edge table, unpadded (``CONV_GRAD_BLOCKS["own"]`` off: XLA's recomputed gradient)."""
    table, padded = _conv_layout(relu)
    return bool(CONV_GRAD_BLOCKS["own"]) and table and not padded


# ------------------------------------------------------------ SRA attention core

# Query rows per program, warps. Keys and values (at most MAX_KEYS, 49 in every PVT at
# 224x224) fit in one tile, so each program does the whole softmax on chip. q_bias: at
# inference the query projection's bias comes in un-added (layers.Biased) and the kernel
# adds it, as the add+norm kernel does the branches' (off: XLA's add, a pass of its own;
# on, +1.9% for pvt_v2_b2 inference on the H200, benchmarks/NOTES.md).
ATTN_BLOCKS = {"block_q": 128, "num_warps": 4, "q_bias": True}
MAX_KEYS = 128
# The attention's backward kernel (in training): query rows per step and warps; a program
# walks ``blocks`` steps down one (image, head)'s queries, carrying its keys' and values'
# gradients, with enough programs per head to fill the GPU (min_programs); own: off, the
# gradient is XLA's, recomputed from the inputs (the path before; benchmarks/NOTES.md).
ATTN_GRAD_BLOCKS = {"block_q": 64, "num_warps": 4, "min_programs": 1024, "own": True}


def supported_attention(q, k, v, dtype) -> bool:
    """bf16 throughout (as the model's projections give them: then the XLA form's result
    is bf16 too), head widths the dots take, and keys that fit one tile. ``q`` may be a
    ``layers.Biased``."""
    q = q.value if isinstance(q, layers.Biased) else q
    d, m = q.shape[-1], k.shape[1]
    bf16 = jnp.dtype(jnp.bfloat16)
    return (all(a.dtype == bf16 for a in (q, k, v)) and jnp.dtype(dtype) == bf16
            and _is_pow2(d) and 16 <= d <= 128 and m <= MAX_KEYS)


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
                     interpret: bool = False):
    """The attention core on per-head queries (B, N, heads, d) (plus their bias (heads, d),
    if given), keys and values (B, M, heads, d), heads read in place from the
    (B, N, heads * d) token layout (no transposes). ``interpret=True`` runs it anywhere."""
    b, n, heads, d = q.shape
    m = k.shape[1]
    bq = ATTN_BLOCKS["block_q"]
    (q, k, v), bias, bias_spec = _token_layout((q, k, v), q_bias, dtype)
    head = functools.partial(_head_spec, d=d)
    out = pl.pallas_call(
        functools.partial(_attention_kernel, n=n, m=m, scale=scale or d ** -0.5, block_q=bq),
        out_shape=jax.ShapeDtypeStruct((b, n, heads * d), dtype),
        grid=(b, heads, -(-n // bq)),
        in_specs=[head(n), *bias_spec, head(m), head(m)],
        out_specs=head(n),
        compiler_params=plt.CompilerParams(num_warps=ATTN_BLOCKS["num_warps"], num_stages=1),
        interpret=interpret, name="lucid_fn_fused_attention",
    )(q, *bias, k, v)
    return out.reshape(b, n, heads, d)


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
    its tiles. Each tile recomputes the probabilities (every key is in it, so no
    statistics come from the forward) and takes the softmax's gradient as XLA's does:
    dp = do v^T rounded to bf16 (XLA's dot gives bf16), ds = p (dp - sum(p dp)), dq and dk
    from ds * scale at about float32 precision (:func:`_split_dot`), dv from the bf16
    probabilities. Rows past ``n`` (the clamped tail) add nothing to dk and dv.
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


def attention_grad_tiles(b: int, heads: int, n: int) -> tuple[int, int]:
    """(programs per head, query tiles each walks): enough programs for the GPU
    (``min_programs`` in all), as few tiles past the last query as that allows."""
    tiles = -(-n // ATTN_GRAD_BLOCKS["block_q"])
    parts = min(tiles, max(1, -(-ATTN_GRAD_BLOCKS["min_programs"] // (b * heads))))
    blocks = -(-tiles // parts)
    return -(-tiles // blocks), blocks


def pallas_attention_grad(q, k, v, g, q_bias=None, *, scale: float | None, dtype,
                          interpret: bool = False):
    """(dq, dk, dv[, dq_bias]) of :func:`pallas_attention` for the output cotangent ``g``
    (B, N, heads, d), in the inputs' dtypes, from :func:`_attention_grad_kernel`; XLA sums
    the programs' parts of dk and dv and the bias's gradient (dq summed over tokens)."""
    b, n, heads, d = q.shape
    m = k.shape[1]
    parts, blocks = attention_grad_tiles(b, heads, n)
    keys = _key_tile(m)
    (q2, k2, v2, g2), bias, bias_spec = _token_layout((q, k, v, g), q_bias, dtype)
    head = functools.partial(_head_spec, d=d)
    part = pl.BlockSpec((None, None, keys, d), lambda i, h, j: (i, j, 0, h))
    part_shape = jax.ShapeDtypeStruct((b, parts, keys, heads * d), jnp.float32)
    dq, dk, dv = pl.pallas_call(
        functools.partial(_attention_grad_kernel, n=n, m=m, scale=scale or d ** -0.5,
                          block_q=ATTN_GRAD_BLOCKS["block_q"], blocks=blocks),
        out_shape=(jax.ShapeDtypeStruct((b, n, heads * d), dtype), part_shape, part_shape),
        grid=(b, heads, parts),
        in_specs=[head(n), *bias_spec, head(m), head(m), head(n)],
        out_specs=(head(n), part, part),
        compiler_params=plt.CompilerParams(num_warps=ATTN_GRAD_BLOCKS["num_warps"],
                                           num_stages=1),
        interpret=interpret, name="lucid_fn_fused_attention_grad",
    )(q2, *bias, k2, v2, g2)
    dk, dv = (a[:, :, :m].sum(axis=1).reshape(k.shape).astype(k.dtype) for a in (dk, dv))
    dq = dq.reshape(q.shape).astype(q.dtype)
    if q_bias is None:
        return dq, dk, dv
    return dq, dk, dv, dq.astype(jnp.float32).sum(axis=(0, 1)).astype(q_bias.dtype)


def attention(q, k, v, *, scale: float | None, dtype, reference):
    """``reference(q, k, v)`` (SRA's probabilities times values, no dropout) by the kernel
    where :func:`supported_attention`, on CUDA, its gradient by the backward kernel
    (:func:`pallas_attention_grad`; XLA's recomputed form with ``ATTN_GRAD_BLOCKS["own"]``
    off); XLA elsewhere. ``q`` may be a ``layers.Biased``: the kernel adds its bias, the
    reference gets it added."""
    if not (enabled() and supported_attention(q, k, v, dtype)):
        return reference(layers.add_bias(q), k, v)
    kernel = functools.partial(pallas_attention, scale=scale, dtype=dtype)
    grad = None
    if ATTN_GRAD_BLOCKS["own"]:
        grad = functools.partial(pallas_attention_grad, scale=scale, dtype=dtype)
    if not isinstance(q, layers.Biased):
        return kernel_with_xla_grad(kernel, reference, q, k, v, grad_kernel=grad)
    return kernel_with_xla_grad(
        kernel, lambda q, k, v, q_bias: reference(layers.add_bias(layers.Biased(q, q_bias)), k, v),
        q.value, k, v, q.bias.astype(q.value.dtype), grad_kernel=grad)


# ------------------------------------------------------------ residual add + LayerNorm

# Elements per program (rows = elements // padded width, at most the largest power of two
# that divides the row count, so no block is partial) and warps, both kernels. train: the
# forward kernel in training too: an option, off, since pvt_v2_b2's training step was the
# same with it (benchmarks/NOTES.md). grad: the backward kernel in training (off: XLA's
# VJP; pvt_v2_b2's step 31.6 -> 29.2 ms with it, NOTES.md). branch_bias: the blocks hand the
# branches' output bias to the kernel at inference (layers.Biased). stage_norm: a stage's
# closing LayerNorm in the kernel with the last residual add (add_layer_norm, no sum
# written); embed_norm: the patch embedding's norm (v1: and its position embedding) and
# the first block's norm1 in one kernel (norm_layer_norm). Off: XLA's fusions, as before
# (benchmarks/NOTES.md).
NORM_BLOCKS = {"elements": 4096, "num_warps": 4, "min_rows": 8, "train": False,
               "grad": True, "branch_bias": True, "stage_norm": True, "embed_norm": True}


def reference_add_layer_norm(p, x, y, *, eps: float, keep_sum: bool = True):
    """``s = x + y`` (in x's dtype) and ``layer_norm(p, s)`` (that alone if not
    ``keep_sum``), as XLA ops. ``y`` may be a ``layers.Biased``: its bias is added first,
    as the linear layer would have."""
    s = x + layers.add_bias(y).astype(x.dtype)
    n = layers.layer_norm(p, s, eps)
    return (s, n) if keep_sum else n


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _norm_rows(rows: int, width: int) -> int:
    """Rows per program: a power of two dividing ``rows`` (0 if below ``min_rows``)."""
    bm = max(1, NORM_BLOCKS["elements"] // _next_pow2(width))
    while bm > 1 and rows % bm:
        bm //= 2
    return bm if bm >= NORM_BLOCKS["min_rows"] else 0


def _branch(y) -> tuple:
    """(values, bias or None) of a branch given as an array or a ``layers.Biased``."""
    return (y.value, y.bias) if isinstance(y, layers.Biased) else (y, None)


def _supported_rows(x) -> bool:
    """bf16, and a width whose power-of-two tile fits (16..1024 wide: stage 3's 320 and
    160 run in 512 and 256 tiles, the columns past the width masked)."""
    width, rows = x.shape[-1], int(np.prod(x.shape[:-1]))
    return (x.dtype == jnp.bfloat16 and 16 <= _next_pow2(width) <= 1024
            and _norm_rows(rows, width) > 0)


def supported_add_layer_norm(x, y) -> bool:
    """:func:`_supported_rows`, ``y`` (and its bias, if any) matching ``x``."""
    y, y_bias = _branch(y)
    if y_bias is not None and (y_bias.dtype != y.dtype or y_bias.shape != y.shape[-1:]):
        return False
    return y.dtype == jnp.bfloat16 and x.shape == y.shape and _supported_rows(x)


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


def _norm_and_norm(x, *vectors, eps_a, eps, positioned, width, valid):
    """``t = LN_a(x)`` (plus the position embedding's tile, the first of ``vectors``, if
    ``positioned``) and ``LN(t)`` of one tile, each rounded as the XLA path rounds it."""
    pos, scale_a, bias_a, scale, bias = vectors if positioned else (None, *vectors)
    t = _tile_norm(x, scale_a, bias_a, eps=eps_a, width=width, valid=valid)
    if pos is not None:
        t = _rounded_add(t, pos)
    return t, _tile_norm(t, scale, bias, eps=eps, width=width, valid=valid)


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


def _rows_per_program(tokens: list, periodic: list) -> int:
    """:func:`_norm_rows` over the tokens' rows, also dividing the periodic arrays' N where
    blocks are used (a power-of-two width), so that each block sits in one period."""
    width = tokens[0].shape[-1]
    rows = int(np.prod(tokens[0].shape[:-1]))
    if periodic and _next_pow2(width) == width:
        rows = math.gcd(rows, periodic[0].shape[0])
    return _norm_rows(rows, width)


def _pallas_rows(body, tokens: list, vectors: list, outs: int, *, name: str,
                 interpret: bool, periodic: tuple = (), sums: int = 0) -> tuple:
    """Run a :func:`_rows_kernel` ``body`` over (..., C) ``tokens`` (all one shape), (N, C)
    ``periodic`` arrays repeating every N rows of the flattened tokens, and per-column
    ``vectors``; returns its ``outs`` outputs, shaped and typed as the first tokens, then
    its ``sums`` column sums as (C,) float32 (each program's partial sums, added by XLA).
    Rows per program: :func:`_rows_per_program`."""
    x = tokens[0]
    width = x.shape[-1]
    flat = [a.reshape(-1, width) for a in tokens]
    bm = _rows_per_program(tokens, list(periodic))
    programs = flat[0].shape[0] // bm
    tile = _next_pow2(width)
    partials = jax.ShapeDtypeStruct((programs, width), jnp.float32)
    if tile == width:
        tile, block = None, pl.BlockSpec((bm, width), lambda i: (i, 0))
        blocks_per_period = [a.shape[0] // bm for a in periodic]
        periodic_specs = [pl.BlockSpec((bm, width), functools.partial(
            lambda i, n: (i % n, 0), n=n)) for n in blocks_per_period]
        partial_spec = pl.BlockSpec((1, width), lambda i: (i, 0))
    else:
        block = _whole(flat[0])
        periodic_specs = [_whole(a) for a in periodic]
        partial_spec = _whole(partials)
    out = pl.pallas_call(
        functools.partial(_rows_kernel, body=body, tiles=len(flat), periodic=len(periodic),
                          outs=outs, rows=bm, tile=tile, sums=sums),
        out_shape=(jax.ShapeDtypeStruct(flat[0].shape, x.dtype),) * outs + (partials,) * sums,
        grid=(programs,),
        in_specs=[block] * len(flat) + periodic_specs + [_whole(v) for v in vectors],
        out_specs=(block,) * outs + (partial_spec,) * sums,
        compiler_params=plt.CompilerParams(num_warps=NORM_BLOCKS["num_warps"], num_stages=1),
        interpret=interpret, name=name,
    )(*flat, *periodic, *vectors)
    return (tuple(a.reshape(x.shape) for a in out[:outs])
            + tuple(jnp.sum(a, axis=0) for a in out[outs:]))


def pallas_add_layer_norm(p, x, y, *, eps: float, keep_sum: bool = True,
                          interpret: bool = False):
    """The kernel on (..., C) tokens: one read of ``x`` and ``y`` (a ``layers.Biased`` or
    an array), one write of the sum (unless not ``keep_sum``: then only the norm comes
    back) and of its norm. ``interpret=True`` runs it anywhere."""
    y, y_bias = _branch(y)
    vectors = ([] if y_bias is None else [y_bias]) + [p["scale"], p["bias"]]
    body = functools.partial(_sum_and_norm, eps=eps, biased=y_bias is not None,
                             keep_sum=keep_sum)
    out = _pallas_rows(body, [x, y], vectors, 2 if keep_sum else 1,
                       name="lucid_fn_fused_add_norm", interpret=interpret)
    return out if keep_sum else out[0]


def add_layer_norm(p, x, y, *, eps: float, keep_sum: bool = True,
                   forward_kernel: bool = True):
    """``(x + y, layer_norm(p, x + y))``, the pre-norm block's residual add and the next
    LayerNorm (``y`` an array or a ``layers.Biased`` branch whose bias the kernel adds):
    one kernel where :func:`supported_add_layer_norm`, else XLA ops. Not ``keep_sum``: the
    norm alone (a stage's closing LayerNorm; the kernel then writes no sum). Through
    XLA, each such LayerNorm was a fusion that re-read and recomputed the residual stream
    at about 3x the memory floor (benchmarks/NOTES.md).

    Its gradient: with NORM_BLOCKS["grad"] (``y`` an array) the backward kernel
    (:func:`pallas_add_layer_norm_grad`) on CUDA, else XLA's. ``forward_kernel`` False
    (training without NORM_BLOCKS["train"]): the forward is XLA's."""
    kw = dict(eps=eps, keep_sum=keep_sum)
    reference = functools.partial(reference_add_layer_norm, **kw)
    if not (enabled() and supported_add_layer_norm(x, y)):
        return reference(p, x, y)
    forward = functools.partial(pallas_add_layer_norm, **kw) if forward_kernel else reference
    if NORM_BLOCKS["grad"] and not isinstance(y, layers.Biased):
        # the backward keeps the sum the forward wrote, not x and y: a block's branch
        # need not live until the backward pass, and one read less
        return kernel_with_xla_grad(
            forward, reference, p, x, y,
            keep=lambda a, out: (a[0], (out[0],) if keep_sum else a[1:]),
            grad_kernel=functools.partial(pallas_add_layer_norm_grad, **kw),
            xla_grad=functools.partial(_xla_add_norm_grad, **kw))
    if not forward_kernel:
        return reference(p, x, y)
    return kernel_with_xla_grad(forward, reference, p, x, y)


# ------------------------------------------------------------ its backward

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
                               interpret: bool = False):
    """The add+norm's VJP as one kernel: ``saved`` the forward's ``(s,)`` (``keep_sum``;
    ``g = (gs, gn)``) or its inputs ``(x, y)`` (``g = gn``). One read of each token array
    and one write of the sum's cotangent, which is x's and y's; the scale's and bias's
    column sums come from per-program partial sums. Returns ``(dp, dx, dy)``."""
    tokens = [saved[0], *g] if keep_sum else [*saved, g]
    body = functools.partial(_add_norm_grad, eps=eps, from_parts=not keep_sum)
    ds, d_scale, d_bias = _pallas_rows(body, tokens, [p["scale"]], 1, sums=2,
                                       name="lucid_fn_fused_add_norm_grad",
                                       interpret=interpret)
    dp = {"scale": d_scale.astype(p["scale"].dtype), "bias": d_bias.astype(p["bias"].dtype)}
    return dp, ds, ds


def _xla_add_norm_grad(p, saved, g, *, eps: float, keep_sum: bool = True):
    """:func:`pallas_add_layer_norm_grad` as XLA's VJP of the reference."""
    if not keep_sum:
        return jax.vjp(functools.partial(reference_add_layer_norm, eps=eps, keep_sum=False),
                       p, *saved)[1](g)
    gs, gn = g
    dp, ds = jax.vjp(lambda p, s: layers.layer_norm(p, s, eps), p, saved[0])[1](gn)
    ds = gs + ds
    return dp, ds, ds


# ------------------------------------------------------------ patch embedding's norm + norm1

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


def pallas_norm_layer_norm(p_a, p, x, pos=None, *, eps_a: float, eps: float,
                           interpret: bool = False):
    """The kernel on (B, N, C) tokens (any (..., C) without ``pos``, which is (N, C) or
    (1, N, C)): one read of ``x`` and of each program's rows of ``pos``, one write of each
    norm."""
    body = functools.partial(_norm_and_norm, eps_a=eps_a, eps=eps, positioned=pos is not None)
    vectors = [p_a["scale"], p_a["bias"], p["scale"], p["bias"]]
    periodic = () if pos is None else (pos.astype(x.dtype).reshape(-1, x.shape[-1]),)
    return _pallas_rows(body, [x], vectors, 2, name="lucid_fn_fused_norm_norm",
                        interpret=interpret, periodic=periodic)


def supported_norm_layer_norm(x, pos=None) -> bool:
    """:func:`_supported_rows`; with ``pos``, (N, C) or (1, N, C) for (B, N, C) tokens,
    and a block of rows that fits in N."""
    if pos is None:
        return _supported_rows(x)
    if x.ndim != 3 or pos.shape[-2:] != x.shape[1:] or pos.size != math.prod(x.shape[1:]):
        return False
    return _supported_rows(x) and _rows_per_program([x], [pos.reshape(x.shape[1:])]) > 0


def norm_layer_norm(p_a, p, x, pos=None, *, eps_a: float, eps: float):
    """``(t, layer_norm(p, t))`` for ``t = layer_norm(p_a, x)`` (``+ pos``, a position
    embedding (N, C) over (B, N, C) tokens, if given): a stage's patch-embedding norm and
    its first block's norm1, one kernel where :func:`supported_norm_layer_norm`, else XLA
    ops. Through XLA the second fusion recomputed the first norm from ``x`` instead of
    reading it (pvt_v2_b2 stage 1: 52 + 80 us, benchmarks/NOTES.md)."""
    kw = dict(eps_a=eps_a, eps=eps)
    if enabled() and supported_norm_layer_norm(x, pos):
        return kernel_with_xla_grad(functools.partial(pallas_norm_layer_norm, **kw),
                                    functools.partial(reference_norm_layer_norm, **kw),
                                    p_a, p, x, pos)
    return reference_norm_layer_norm(p_a, p, x, pos, **kw)
