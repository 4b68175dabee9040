"""Functional layers: each is an ``init_*`` that returns a dict of float32 arrays and an
apply function over that dict.

Conventions, chosen so that checkpoints of other layouts map onto ours by a transpose:

- Linear: ``{"kernel": (in, out), "bias": (out,)}`` (PyTorch stores ``weight`` as (out, in)).
- Conv: ``{"kernel": (kh, kw, in, out), "bias": (out,)}`` (HWIO, XLA's natural layout for
  NHWC activations; PyTorch stores OIHW).
- LayerNorm: ``{"scale": (dim,), "bias": (dim,)}``.

Parameters are always float32; ``dtype`` arguments are the compute dtype. LayerNorm and
softmax statistics are taken in float32 whatever the compute dtype, because bf16 has too
few mantissa bits for a variance over hundreds of channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn.kernels.gelu import gelu  # noqa: F401  (GELU's forms live with the kernels')

Params = dict


# ----------------------------------------------------------------------------- init
#
# Init functions return *specs* (shape + distribution), not arrays; ``materialize`` draws
# them all from one key. One flat draw per distribution instead of one per tensor: XLA
# compiles a random-number kernel per distinct shape (~0.1 s each on CPU), which made a
# jitted PVT init take 8 s to compile; drawing flat and slicing takes under 1 s.


@dataclasses.dataclass(frozen=True)
class Init:
    """A parameter not drawn yet: ``kind`` in normal | uniform | zeros | ones; ``scale`` is
    the standard deviation (normal) or the bound (uniform)."""

    shape: tuple
    kind: str
    scale: float = 1.0

    def stacked(self, n: int) -> "Init":
        return dataclasses.replace(self, shape=(n, *self.shape))


def is_init(x) -> bool:
    return isinstance(x, Init)


def stack(specs, n: int):
    """The specs of ``n`` independently drawn copies, stacked on a leading axis."""
    return jax.tree_util.tree_map(lambda s: s.stacked(n), specs, is_leaf=is_init)


def _draw(kind: str, key, n: int):
    if kind == "normal":
        return jax.random.normal(key, (n,), jnp.float32)
    if kind == "uniform":
        return jax.random.uniform(key, (n,), jnp.float32, -1.0, 1.0)
    raise ValueError(f"unknown init kind {kind!r}")


def materialize(specs, key):
    """Draw every ``Init`` in ``specs`` from ``key``; returns the same tree of float32 arrays."""
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_init)
    random_kinds = sorted({s.kind for s in leaves} - {"zeros", "ones"})
    keys = dict(zip(random_kinds, jax.random.split(key, max(len(random_kinds), 1))))
    flat = {k: _draw(k, keys[k], sum(math.prod(s.shape) for s in leaves if s.kind == k))
            for k in random_kinds}
    offset = dict.fromkeys(random_kinds, 0)
    out = []
    for s in leaves:
        if s.kind in ("zeros", "ones"):
            out.append((jnp.zeros if s.kind == "zeros" else jnp.ones)(s.shape, jnp.float32))
            continue
        size = math.prod(s.shape)
        chunk = flat[s.kind][offset[s.kind]: offset[s.kind] + size]
        offset[s.kind] += size
        out.append(s.scale * chunk.reshape(s.shape))
    return jax.tree_util.tree_unflatten(treedef, out)


def normal(shape, std=0.02) -> Init:
    return Init(tuple(shape), "normal", std)


def init_linear(d_in, d_out, *, bias=True, weight=normal) -> Params:
    p = {"kernel": weight((d_in, d_out))}
    if bias:
        p["bias"] = Init((d_out,), "zeros")
    return p


def init_conv(kernel_size, d_in, d_out) -> Params:
    """Initialised as PyTorch's nn.Conv2d (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in))
    for weight and bias, which the seed and the paper's code keep for their convs."""
    kh, kw = kernel_size
    bound = 1.0 / math.sqrt(kh * kw * d_in)
    return {"kernel": Init((kh, kw, d_in, d_out), "uniform", bound),
            "bias": Init((d_out,), "uniform", bound)}


def init_layer_norm(dim) -> Params:
    return {"scale": Init((dim,), "ones"), "bias": Init((dim,), "zeros")}


# ---------------------------------------------------------------------------- apply


class Biased(NamedTuple):
    """A linear layer's output with its bias not yet added (``value + bias`` is the
    output). A residual branch is handed on this way at inference so that the add+norm
    kernel adds the bias in its own pass: XLA cannot fuse an add into a custom kernel's
    input, so each bias cost a pass over the tokens of its own (benchmarks/NOTES.md).
    Whoever reads it adds the bias: :func:`add_bias`, :func:`drop_path`, nn/block.py."""
    value: jax.Array
    bias: jax.Array

    def __radd__(self, x):
        """``x + branch``, the bias added first (in the branch's dtype)."""
        return x + add_bias(self)


def add_bias(y):
    """``y`` itself, or a :class:`Biased` output with its bias added (in its dtype)."""
    if isinstance(y, Biased):
        return y.value + y.bias.astype(y.value.dtype)
    return y


def linear(p: Params, x, dtype=None, *, defer_bias: bool = False):
    """``x @ kernel + bias`` in ``dtype``; with ``defer_bias`` a :class:`Biased` (the same
    value once ``add_bias`` adds the bias, rounded the same way)."""
    dtype = dtype or x.dtype
    y = jnp.matmul(x.astype(dtype), p["kernel"].astype(dtype))
    if "bias" not in p:
        return y
    y = Biased(y, p["bias"].astype(dtype))
    return y if defer_bias else add_bias(y)


def layer_norm(p: Params, x, eps: float):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def patchify_conv(p: Params, x, dtype=None):
    """Conv with kernel == stride and no padding on an NHWC map, as reshape + matmul.

    Rows and columns that do not fill a whole patch are dropped, exactly as a VALID
    convolution (PyTorch's ``Conv2d(k=s, padding=0)``) drops them. A reshape and one
    matmul beat XLA's general convolution for this case on every backend we tried, and
    the HWIO kernel flattens to (kh*kw*in, out) in the same order as the patch.
    """
    kh, kw, c_in, c_out = p["kernel"].shape
    b, h, w, c = x.shape
    ho, wo = h // kh, w // kw
    x = x[:, : ho * kh, : wo * kw, :]
    x = x.reshape(b, ho, kh, wo, kw, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, ho, wo, kh * kw * c)
    kernel = p["kernel"].reshape(kh * kw * c_in, c_out)
    return linear({"kernel": kernel, "bias": p["bias"]}, x, dtype)


def conv(p: Params, x, *, stride: int, padding: int, groups: int = 1, dtype=None):
    """General NHWC conv with an HWIO kernel (``groups`` > 1: the I axis is in // groups);
    no bias when ``p`` has none (a conv followed by a norm)."""
    dtype = dtype or x.dtype
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), p["kernel"].astype(dtype), (stride, stride),
        [(padding, padding), (padding, padding)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
    return y + p["bias"].astype(dtype) if "bias" in p else y


def _s2d_geometry(k: int, stride: int, padding: int, n: int) -> tuple[int, int, int, int]:
    """(top pad, offset d, blocks per kernel side kb, output size) of a stride-``stride``
    conv over ``n`` rows written over stride x stride blocks: the top pad is ``padding``
    rounded up to whole blocks, so output row o reads padded rows s o + d .. s o + d + k - 1,
    which are blocks o .. o + kb - 1."""
    top = stride * -(-padding // stride)
    d = top - padding
    return top, d, -(-(d + k) // stride), (n + 2 * padding - k) // stride + 1


def space_to_depth_conv(p: Params, x, *, stride: int, padding: int, dtype=None):
    """The same function as :func:`conv` (dense, ``stride`` > 1) computed as a stride-1
    conv over ``stride`` x ``stride`` blocks of the input stacked into channels, with the
    kernel zero-padded onto the blocks (kb x kb taps of s*s*C_in channels).

    For v2's first patch embedding (7x7 stride 4 over 3 channels) that is a 2x2 conv over
    48 channels: cuDNN's kernel for 3 input channels ran at about a tenth of its memory
    floor, with a padding pass of its own (benchmarks/NOTES.md)."""
    kh, kw, c_in, c_out = p["kernel"].shape
    b, h, w, _ = x.shape
    s = stride
    top, dy, kby, ho = _s2d_geometry(kh, s, padding, h)
    left, dx, kbx, wo = _s2d_geometry(kw, s, padding, w)
    rows, cols = s * (ho + kby - 1), s * (wo + kbx - 1)  # padded extent the blocks cover
    x = x.astype(dtype or x.dtype)
    x = jnp.pad(x, ((0, 0), (top, max(0, rows - top - h)), (left, max(0, cols - left - w)),
                    (0, 0)))[:, :rows, :cols]
    x = x.reshape(b, rows // s, s, cols // s, s, c_in).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, rows // s, cols // s, s * s * c_in)
    k = jnp.pad(p["kernel"], ((dy, s * kby - dy - kh), (dx, s * kbx - dx - kw), (0, 0), (0, 0)))
    k = k.reshape(kby, s, kbx, s, c_in, c_out).transpose(0, 2, 1, 3, 4, 5)
    k = k.reshape(kby, kbx, s * s * c_in, c_out)
    return conv({"kernel": k, "bias": p["bias"]}, x, stride=1, padding=0, dtype=dtype)


def depthwise_conv3x3(p: Params, x, hw, dtype=None, *, portable: bool = False):
    """PVT v2's depthwise 3x3 conv (padding 1, bias) on (B, N, C) tokens laid out on an
    ``hw`` map; tokens in, tokens out. On the CPU (unless ``portable``: one form for every
    platform) as nine shifted multiply-adds: XLA:CPU runs a grouped convolution
    as a generic loop many times slower than one fused elementwise pass
    (benchmarks/NOTES.md)."""
    b, n, c = x.shape
    m = x.reshape(b, *hw, c)
    grouped = functools.partial(conv, p, stride=1, padding=1, groups=c, dtype=dtype)
    if portable:
        return grouped(m).reshape(b, n, c)
    taps = functools.partial(shifted_depthwise_conv3x3, p, dtype=dtype)
    return jax.lax.platform_dependent(m, cpu=taps, default=grouped).reshape(b, n, c)


def shifted_depthwise_conv3x3(p: Params, x, dtype=None):
    """:func:`conv` with a (3, 3, 1, C) kernel, padding 1 and C groups, on an NHWC map, as
    the sum of nine shifted copies of the padded map times a tap each (in float32 at
    least, as the convolution accumulates)."""
    dtype = jnp.dtype(dtype or x.dtype)
    acc = jnp.promote_types(dtype, jnp.float32)
    _, h, w, _ = x.shape
    k = p["kernel"].astype(dtype).astype(acc)
    xp = jnp.pad(x.astype(dtype).astype(acc), ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(xp[:, i:i + h, j:j + w, :] * k[i, j, 0] for i in range(3) for j in range(3))
    if "bias" in p:
        y = y.astype(dtype).astype(acc) + p["bias"].astype(dtype).astype(acc)
    return y.astype(dtype)


def _pool_matrix(n_in, n_out: int, dtype):
    """Rows average the bins of PyTorch's adaptive pooling: [floor(i n/o), ceil((i+1) n/o)).
    Built from iotas rather than in NumPy so that ``n_in`` may be a symbolic size (an
    exported model's height or width); at a static size XLA folds it to a constant. The
    sizes are positive, so lax.div (which truncates) floors, and unlike jnp's floor
    division it adds no nested jit, which jax2onnx cannot convert on every JAX."""
    i = jax.lax.iota(jnp.int32, n_out)[:, None]
    j = jnp.arange(n_in, dtype=jnp.int32)[None, :]
    start = jax.lax.div(i * n_in, n_out)
    end = jax.lax.div((i + 1) * n_in + (n_out - 1), n_out)
    inside = (j >= start) & (j < end)
    return inside.astype(dtype) / (end - start).astype(dtype)


def adaptive_avg_pool(x, out_hw):
    """``nn.AdaptiveAvgPool2d(out_hw)`` on an NHWC map, as two small matmuls."""
    ph = _pool_matrix(x.shape[1], out_hw[0], x.dtype)
    pw = _pool_matrix(x.shape[2], out_hw[1], x.dtype)
    return jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x)


def dropout(x, rate: float, rng):
    """Inverted dropout; a no-op (no RNG drawn) when ``rng`` is None or the rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def drop_path(x, rate, rng):
    """Stochastic depth: drop the whole residual branch per sample.

    ``rate`` may be a traced scalar (blocks run under ``lax.scan`` carry their own rate).
    A rate known to be 0 draws nothing: the mask would be all ones, and a
    :class:`Biased` branch stays so.
    """
    if rng is None or (isinstance(rate, (int, float, np.floating)) and rate == 0):
        return x
    x = add_bias(x)
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), 0).astype(x.dtype)


def resize_pos_embed(pe, new_grid: tuple, has_cls: bool):
    """Bilinear resize of a square (1, [1 +] S*S, C) position embedding to ``new_grid``
    (h, w), keeping the class token's row, as PyTorch's ``interpolate(mode='bilinear',
    align_corners=False)`` does (the PVT detection code, HF transformers). No-op at the
    same size; works on NumPy and JAX arrays, inside jit too."""
    cls, grid = (pe[:, :1], pe[:, 1:]) if has_cls else (None, pe)
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} tokens is not a square grid")
    if (side, side) == tuple(new_grid):
        return pe
    c = grid.shape[-1]
    resized = jax.image.resize(jnp.asarray(grid).reshape(1, side, side, c),
                               (1, *new_grid, c), method="linear", antialias=False)
    resized = resized.reshape(1, new_grid[0] * new_grid[1], c).astype(grid.dtype)
    return resized if cls is None else jnp.concatenate([jnp.asarray(cls), resized], axis=1)
