#!/usr/bin/env bash
# Twenty-first call (benchmarks/NOTES.md), H200: the add+norm kernel at stage 3 (320 and
# 160 wide, masked power-of-two tiles): its numerics against XLA on the GPU, then
# inference of the three models against the kernel on power-of-two widths only
# (addnorm=pow2, the path before) and torch.compile, and the conv kernel's
# channel-chunks-first launch order in the v2 models; pvt_v2_b2 profiled.
#   bash benchmarks/explore_gpu21.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log21.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 40 python3 - 2>&1 <<'PY' | grep -v "Delay\|cuda_timer" | tee -a "$log"
import jax, jax.numpy as jnp
from lucid_fn.nn import fused, layers
for shape in [(256, 196, 320), (256, 196, 160), (256, 3136, 64)]:
    k = jax.random.split(jax.random.key(0), 4); c = shape[-1]
    p = {"scale": 1 + 0.2 * jax.random.normal(k[0], (c,)), "bias": 0.2 * jax.random.normal(k[1], (c,))}
    x = (3 * jax.random.normal(k[2], shape) + 1).astype(jnp.bfloat16); y = jax.random.normal(k[3], shape).astype(jnp.bfloat16)
    s, n = jax.jit(lambda *a: fused.pallas_add_layer_norm(*a, eps=1e-6))(p, x, y)
    s0, n0 = jax.jit(lambda *a: fused.reference_add_layer_norm(*a, eps=1e-6))(p, x, y)
    exact = layers.layer_norm(p, s.astype(jnp.float32), 1e-6)
    print(shape, "sum equal:", bool((s == s0).all()), "norm vs f32: kernel", float(jnp.abs(n.astype(jnp.float32) - exact).max()),
          "XLA", float(jnp.abs(n0.astype(jnp.float32) - exact).max()), "differing:", float((n != n0).mean()))
PY
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 140 --name h200_small_infer2 --models pvt_small --modes infer --variants default addnorm=pow2 \
  --refs compiled --budget-s 90
b 190 --name h200_b2_infer3 --models pvt_v2_b2 --modes infer --variants default addnorm=pow2 \
  conv.chunks_first=1 --refs compiled --budget-s 130 --profile
b 150 --name h200_b0_infer3 --models pvt_v2_b0 --modes infer --variants default addnorm=pow2 \
  conv.chunks_first=1 --refs compiled --budget-s 100
