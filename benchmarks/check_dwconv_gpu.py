"""On a GPU: the depthwise 3x3 conv's weight gradient, Pallas (``nn.fused``) against
XLA's (cuDNN), at pvt_v2_b2's four stage shapes for a training batch of 128 in bf16:
relative error of each against float32, and milliseconds per call (median of 20).

    PYTHONPATH=. python3 benchmarks/check_dwconv_gpu.py [BATCH]
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

from lucid_fn.nn import fused

B = int(sys.argv[1]) if len(sys.argv) > 1 else 128
SHAPES = [((56, 56), 512), ((28, 28), 1024), ((14, 14), 1280), ((7, 7), 2048)]


def xla_wgrad(h, g, hw, dtype):
    return fused._xla_dwconv_wgrad(h.astype(dtype), g.astype(dtype), hw=hw, dtype=dtype,
                                   param_dtypes=(jnp.float32, jnp.float32))


def ms(f, *args):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


print("| map | C | XLA ms | Pallas ms | XLA rel.err (kernel, bias) | Pallas rel.err |")
print("|---|---:|---:|---:|---|---|")
for i, (hw, c) in enumerate(SHAPES):
    k = jax.random.split(jax.random.key(i), 2)
    n = hw[0] * hw[1]
    h = jax.random.normal(k[0], (B, n, c), jnp.float32).astype(jnp.bfloat16)
    g = (jax.random.normal(k[1], (B, n, c), jnp.float32) * 0.01).astype(jnp.bfloat16)
    ref = jax.jit(lambda a, b, hw=hw: xla_wgrad(a.astype(jnp.float32), b.astype(jnp.float32),
                                                  hw, jnp.float32))(h, g)
    f_xla = jax.jit(lambda a, b, hw=hw: xla_wgrad(a, b, hw, jnp.bfloat16))
    f_pl = jax.jit(lambda a, b, hw=hw: fused.pallas_dwconv_wgrad(a, b, hw=hw))
    out_x, out_p = f_xla(h, g), f_pl(h, g)
    ex = ", ".join(f"{rel(o, r):.1e}" for o, r in zip(out_x, ref))
    ep = ", ".join(f"{rel(o, r):.1e}" for o, r in zip(out_p, ref))
    print(f"| {hw[0]}x{hw[1]} | {c} | {ms(f_xla, h, g):.3f} | {ms(f_pl, h, g):.3f} | {ex} | "
          f"{ep} |", flush=True)
