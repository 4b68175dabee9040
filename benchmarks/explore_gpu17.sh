#!/usr/bin/env bash
# Seventeenth call (benchmarks/NOTES.md): the residual-add + LayerNorm kernel at inference
# (addnorm=xla is the path before it): its numerics against XLA on the GPU, pvt_small
# against torch eager and torch.compile, pvt_v2_b2 without references.
#   bash benchmarks/explore_gpu17.sh OUT
out=$1; r=$out; mkdir -p "$r"  # results straight into OUT: a cut call keeps them
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv
timeout 25 python3 - > "$r/check_add_norm_gpu.txt" 2>&1 <<'PY'
import jax, jax.numpy as jnp
from lucid_fn.nn import fused, layers
for shape in [(256, 3136, 64), (256, 784, 128), (256, 50, 512)]:
    k = jax.random.split(jax.random.key(0), 4); c = shape[-1]
    p = {"scale": 1 + 0.2 * jax.random.normal(k[0], (c,)), "bias": 0.2 * jax.random.normal(k[1], (c,))}
    x = (3 * jax.random.normal(k[2], shape) + 1).astype(jnp.bfloat16); y = jax.random.normal(k[3], shape).astype(jnp.bfloat16)
    s, n = jax.jit(lambda *a: fused.pallas_add_layer_norm(*a, eps=1e-6))(p, x, y)
    s0, n0 = jax.jit(lambda *a: fused.reference_add_layer_norm(*a, eps=1e-6))(p, x, y)
    exact = layers.layer_norm(p, s.astype(jnp.float32), 1e-6)
    print(shape, "sum equal:", bool((s == s0).all()), "norm vs f32: kernel", float(jnp.abs(n.astype(jnp.float32) - exact).max()),
          "XLA", float(jnp.abs(n0.astype(jnp.float32) - exact).max()), "differing:", float((n != n0).mean()))
PY
grep -v "Delay\|cuda_timer" "$r/check_add_norm_gpu.txt"
b() { timeout "$1" python3 benchmarks/bench.py --out $r "${@:2}" 2>&1 | grep -v cuda_timer | grep -v '^|'; }
b 140 --name h100_small_infer_addnorm --models pvt_small --modes infer --variants default addnorm=xla \
  --budget-s 60
b 90 --name x_b2_addnorm --models pvt_v2_b2 --modes infer --variants default addnorm=xla --refs \
  --budget-s 60
for f in $r/*.md; do echo "== $f"; grep '^| pvt' $f; done
