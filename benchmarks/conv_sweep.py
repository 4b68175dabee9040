"""The PVT v2 conv kernel alone on a GPU: each variant of its settings at each stage shape
of pvt_v2_b2 and b0 (batch 256, bf16), checked against float32 and timed, beside XLA's
form of the same op (cuDNN's depthwise conv, the bias, GELU) and the memory floor (one
read of the hidden map and one write, at a measured copy bandwidth)::

    PYTHONPATH=. python3 benchmarks/conv_sweep.py --out OUT --name conv_sweep

A variant is ``name:key=value,...`` over ``nn.fused.CONV_BLOCKS``. Time per call is the
median of 5 repeats of 20 calls. Error: the largest absolute difference from the float32
form on the kernel's own input, against the same for XLA's bf16 form (the kernel must be
no worse). Writes ``<out>/<name>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from lucid_fn.nn import fused, layers

SHAPES = {  # (batch, height, width, hidden) of each stage's MLP
    "b2_s1": (256, 56, 56, 512), "b2_s2": (256, 28, 28, 1024),
    "b2_s3": (256, 14, 14, 1280), "b2_s4": (256, 7, 7, 2048),
    "b0_s1": (256, 56, 56, 256), "b0_s2": (256, 28, 28, 512),
    "tiny": (2, 8, 8, 64),  # with --interpret: a CPU smoke run (tests)
}
VARIANTS = [  # the second call's (explore_gpu20.sh); explore_gpu18.sh swept the first set
    "before:pad=0,masked_loads=0,exact_min=0,max_h=4096,max_h_narrow=4096",
    "pad_exact:pad=1,exact_min=4,max_h=256,max_h_narrow=256",
    "exact_select:pad=0,masked_loads=0",
    "default:",
    "default_chunks:chunks_first=1",
]


def parse(spec: str, tables=None) -> tuple[str, dict]:
    """``name:key=value,...`` over settings ``tables`` (default ``nn.fused.CONV_BLOCKS``
    and ``CONV_GRAD_BLOCKS``, the backward kernels'; their keys differ)."""
    tables = tables or (fused.CONV_BLOCKS, fused.CONV_GRAD_BLOCKS)
    name, _, items = spec.partition(":")
    out = {}
    for item in filter(None, items.split(",")):
        k, _, v = item.partition("=")
        if not any(k in t for t in tables):
            raise SystemExit(f"unknown settings key {k!r} in {spec!r}; known: "
                             f"{', '.join(k for t in tables for k in t)}")
        out[k] = int(v)
    return name, out


@contextlib.contextmanager
def conv_blocks(settings: dict, tables=None):
    """Settings ``tables`` (default ``nn.fused.CONV_BLOCKS`` and ``CONV_GRAD_BLOCKS``)
    with ``settings`` while tracing, restored after."""
    tables = tables or (fused.CONV_BLOCKS, fused.CONV_GRAD_BLOCKS)
    saved = [dict(t) for t in tables]
    for k, v in settings.items():
        next(t for t in tables if k in t)[k] = v
    try:
        yield
    finally:
        for t, old in zip(tables, saved):
            t.clear()
            t.update(old)


def timed(fn, *args, timing=(5, 20)) -> float:
    """Median seconds per call over ``timing = (repeats, calls per repeat)``."""
    repeats, iters = timing
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def copy_bandwidth(timing=(5, 20)) -> float:
    """Bytes read plus written per second by a large elementwise pass."""
    a = jnp.ones((1 << (29 if timing[1] > 1 else 20),), jnp.bfloat16)  # 1 GiB on the GPU
    s = timed(jax.jit(lambda v: v * 2), a, timing=timing)
    return 2 * a.nbytes / s


def inputs(shape, seed=0):
    b, hh, ww, hidden = shape
    k = jax.random.split(jax.random.key(seed), 5)
    c = 64
    fc1 = {"kernel": jax.random.normal(k[0], (c, hidden)) * c**-0.5,
           "bias": jax.random.normal(k[1], (hidden,)) * 0.5}
    dw = {"kernel": jax.random.normal(k[2], (3, 3, 1, hidden)) / 3,
          "bias": jax.random.normal(k[3], (hidden,)) * 0.2}
    x = jax.random.normal(k[4], (b, hh * ww, c), jnp.float32)
    return fc1, dw, x


def reference_f32(h, fc1, dw, hw):
    """GELU(dwconv(h + b1) + bias) in float32 on the kernel's own (unpadded) input."""
    h = (h.astype(jnp.float32) + fc1["bias"]).reshape(-1, hw[0] * hw[1], h.shape[-1])
    g = layers.gelu(layers.depthwise_conv3x3(dw, h, hw, jnp.float32), approximate=False)
    return g.reshape(-1, h.shape[-1])


def xla_bf16(h, fc1, dw, hw):
    """The XLA path's form (as in reference_conv_mlp): bias, cuDNN conv, GELU in bf16."""
    h = (h + fc1["bias"].astype(h.dtype)).reshape(-1, hw[0] * hw[1], h.shape[-1])
    g = layers.gelu(layers.depthwise_conv3x3(dw, h, hw, jnp.bfloat16), approximate=False)
    return g.reshape(-1, h.shape[-1])


def interior(h, b, hw):
    """The unpadded map of a padded kernel input."""
    hh, ww = hw
    return h.reshape(b, hh + 2, ww + 2, -1)[:, 1:-1, 1:-1].reshape(b * hh * ww, -1)


def run_shape(label, shape, variants, bw, interpret=False, timing=(5, 20)) -> list:
    b, hh, ww, hidden = shape
    hw = (hh, ww)
    fc1, dw, x = inputs(shape)
    rows = []
    moved = 2 * b * hh * ww * hidden * 2  # read h, write g, bf16
    floor_ms = moved / bw * 1e3
    base = None
    for spec in variants:
        name, over = parse(spec)
        with conv_blocks(over):
            h, b1, taps, bias, padded = fused.conv_inputs(fc1, dw, x, hw=hw, relu=False,
                                                          dtype=jnp.bfloat16)
            call = jax.jit(lambda h, b1, taps, bias: fused.conv_gelu(
                h, b1, taps, bias, batch=b, hw=hw, relu=False, padded=padded,
                interpret=interpret))
            out = call(h, b1, taps, bias)
            h0 = interior(h, b, hw) if padded else h
            want = reference_f32(h0, fc1, dw, hw)
            err = float(jnp.abs(out.astype(jnp.float32) - want).max())
            if base is None:
                base = (h0, float(jnp.abs(xla_bf16(h0, fc1, dw, hw).astype(jnp.float32)
                                          - want).max()))
            written = bool(jnp.isfinite(out.astype(jnp.float32)).all())
            ms = timed(call, h, b1, taps, bias, timing=timing) * 1e3
            tiles = fused.conv_tiles(b, hw, hidden)
        rows.append(dict(shape=label, variant=name, spec=spec, ms=round(ms, 4),
                         floor_ms=round(floor_ms, 4), x_floor=round(ms / floor_ms, 2),
                         err=err, err_xla_bf16=base[1], finite=written,
                         tiles={k: tiles[k] for k in ("bx", "bc", "strips", "chunks")}))
        print(json.dumps(rows[-1]), flush=True)
    h0 = base[0]
    xla = jax.jit(lambda h: xla_bf16(h, fc1, dw, hw))
    rows.append(dict(shape=label, variant="xla (cuDNN conv + GELU)",
                     ms=round(timed(xla, h0, timing=timing) * 1e3, 4),
                     floor_ms=round(floor_ms, 4)))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s != "tiny"])
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="conv_sweep")
    ap.add_argument("--interpret", action="store_true",
                    help="run the kernel in interpret mode (CPU; times mean nothing)")
    args = ap.parse_args(argv)
    timing = (1, 1) if args.interpret else (5, 20)
    bw = copy_bandwidth(timing)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "copy_bandwidth_gb_s": round(bw / 1e9, 1), "rows": []}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    for label in args.shapes:
        result["rows"] += run_shape(label, SHAPES[label], args.variants, bw,
                                    args.interpret, timing)
        with open(os.path.join(args.out, args.name + ".json"), "w") as f:
            json.dump(result, f, indent=1)
    print("\n| shape | variant | ms | x floor | err | err XLA bf16 |")
    print("|---|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['shape']} | {r['variant']} | {r['ms']:.3f} | "
              f"{r['ms'] / r['floor_ms']:.2f} | {r.get('err', float('nan')):.4f} | "
              f"{r.get('err_xla_bf16', float('nan')):.4f} |")
    return result


if __name__ == "__main__":
    main()
