"""The SRA attention core's forward and backward on a GPU, at PVT's stage shapes (batch
128, the training batch, bf16): the backward kernel (``nn.fused.pallas_attention_grad``)
against XLA's gradient recomputed from the inputs (the path before), both with the
forward kernel, both checked against float32 and timed::

    PYTHONPATH=. python3 benchmarks/attention_grad_gpu.py --out OUT --name attn_grad

For each shape and path, one jitted step of the attention's forward and backward (the
queries', keys' and values' gradients for a fixed random cotangent), median of 5 repeats
of 20 calls. Error: each gradient's largest absolute difference from float32 over the
float32 gradient's largest magnitude. ``--variants name:key=value,...`` (over
``nn.fused.ATTN_GRAD_BLOCKS``) time the kernel again with other settings. Writes
``<out>/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from conv_sweep import conv_blocks, parse, timed  # benchmarks/
from lucid_fn.nn import attention, fused

# (batch, queries, keys, heads, head width): pvt_v2_b2's and pvt_small's stages (v1's
# last with its class token), and b0's first (head width 32).
SHAPES = {"s1": (128, 3136, 49, 1, 64), "s2": (128, 784, 49, 2, 64),
          "s3": (128, 196, 49, 5, 64), "s4": (128, 49, 49, 8, 64),
          "v1s4": (128, 50, 50, 8, 64), "b0s1": (128, 3136, 49, 1, 32),
          "tiny": (2, 200, 49, 2, 32)}


def grad_fn(dtype, cotangent, fused_path: bool):
    def loss(q, k, v):
        fn = attention.attend if fused_path else attention.attend_xla
        kw = dict(attn_drop=0.0, rng=None) if fused_path else {}
        y = fn(q, k, v, scale=None, dtype=dtype, **kw)
        return (y.astype(jnp.float32) * cotangent).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def run_shape(label, shape, timing, variants=()) -> list:
    b, n, m, heads, d = shape
    k = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k[0], (b, n, heads, d)) * 2
    args = tuple(a.astype(jnp.bfloat16) for a in (
        q, *(jax.random.normal(kk, (b, m, heads, d)) for kk in k[1:3])))
    cot = jax.random.normal(k[3], (b, n, heads, d))
    # float32 from the same bf16 inputs, so that the error is the paths' own (the first
    # call's file, h200_attn_grad1, compared with the unrounded inputs: both paths showed
    # the inputs' rounding alone)
    want = grad_fn(jnp.float32, cot, False)(*(a.astype(jnp.float32) for a in args))[1]
    rows = []
    runs = [("kernel", {}), ("xlagrad", {"own": 0})] + [parse(s, (fused.ATTN_GRAD_BLOCKS,)) for s in variants]
    for name, over in runs:
        with conv_blocks(over, (fused.ATTN_GRAD_BLOCKS,)):
            f = grad_fn(jnp.bfloat16, cot, True)
            hlo = f.lower(*args).as_text()
            got = f(*args)[1]
            err = [float(jnp.abs(g.astype(jnp.float32) - w).max() / jnp.abs(w).max())
                   for g, w in zip(got, want)]
            ms = timed(f, *args, timing=timing) * 1e3
            tiles = fused.attention_grad_tiles(b, heads, n)
        rows.append(dict(shape=label, dims=shape, path=name, settings=over, ms=round(ms, 4),
                         grad_kernel="lucid_fn_fused_attention_grad" in hlo,
                         programs_per_head_and_tiles=tiles,
                         err_q_k_v=[round(e, 5) for e in err]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s != "tiny"])
    ap.add_argument("--variants", nargs="*", default=[])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="attn_grad")
    ap.add_argument("--timing", type=int, nargs=2, default=(5, 20),
                    metavar=("REPEATS", "CALLS"))
    args = ap.parse_args(argv)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
    os.makedirs(args.out, exist_ok=True)
    for label in args.shapes:
        result["rows"] += run_shape(label, SHAPES[label], tuple(args.timing), args.variants)
        with open(os.path.join(args.out, args.name + ".json"), "w") as f:
            json.dump(result, f, indent=1)
    print("\n| shape | path | settings | ms (fwd + bwd) | max error vs f32 (q, k, v) |")
    print("|---|---|---|---:|---|")
    for r in result["rows"]:
        print(f"| {r['shape']} | {r['path']} | {r['settings']} | {r['ms']:.3f} | "
              f"{r['err_q_k_v']} |")
    return result


if __name__ == "__main__":
    main()
