#!/usr/bin/env bash
# Twelfth call (benchmarks/NOTES.md): the row-walking v2 conv kernel and the kernels' A&S
# GELU. On the GPU: the conv kernel against XLA at batch 256 (one band per image); then
# inference of the tree before this change (prev/, `git archive 6cd519b`) and of this one,
# same machine, same call; this one with torch eager and torch.compile references and
# kgelu=rational (the kernels' GELU as before).   bash benchmarks/explore_gpu12.sh OUT
out=$1; r=$out; mkdir -p "$r"  # results straight into OUT: a cut call keeps them
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
PYTHONPATH=$PWD timeout 45 python3 - > "$r/check_conv_kernel_gpu.txt" 2>&1 <<'PY'
import jax, jax.numpy as jnp
from lucid_fn.nn import fused
for b, hw, c, hidden in [(256, (56, 56), 64, 512), (256, (7, 7), 512, 2048), (3, (28, 28), 128, 1024)]:
    k = jax.random.split(jax.random.key(0), 6)
    fc1 = {"kernel": jax.random.normal(k[0], (c, hidden)) * c**-0.5, "bias": jax.random.normal(k[1], (hidden,)) * 0.5}
    dw = {"kernel": jax.random.normal(k[2], (3, 3, 1, hidden)) / 3, "bias": jax.random.normal(k[3], (hidden,)) * 0.2}
    fc2 = {"kernel": jax.random.normal(k[4], (hidden, c)) * hidden**-0.5, "bias": jax.random.normal(k[5], (c,)) * 0.1}
    x = jax.random.normal(jax.random.key(5), (b, hw[0] * hw[1], c))
    for relu in (False, True):
        kw = dict(hw=hw, relu=relu)
        r32 = fused.reference_conv_mlp(fc1, dw, fc2, x, dtype=jnp.float32, **kw)
        r16 = fused.reference_conv_mlp(fc1, dw, fc2, x, dtype=jnp.bfloat16, **kw)
        out = jax.jit(lambda *a: fused.pallas_conv_mlp(*a, dtype=jnp.bfloat16, **kw))(fc1, dw, fc2, x)
        e = float(jnp.abs(out.astype(jnp.float32) - r32).max()); e16 = float(jnp.abs(r16.astype(jnp.float32) - r32).max())
        print(f"b={b} hw={hw} hidden={hidden} relu={relu} tiles={fused.conv_tiles(b, hw, hidden)}: "
              f"kernel vs f32 {e:.4g}, XLA bf16 vs f32 {e16:.4g}, mean {float(jnp.abs(out.astype(jnp.float32) - r32).mean()):.3g} "
              f"vs {float(jnp.abs(r16.astype(jnp.float32) - r32).mean()):.3g}")
PY
cat "$r/check_conv_kernel_gpu.txt" | grep -v Warn
(cd prev && PYTHONPATH=$PWD timeout 105 python3 benchmarks/bench.py --out $r --name x_prev_infer \
  --models pvt_v2_b2 pvt_v2_b0 pvt_small --modes infer --refs --budget-s 85 \
  2>&1 | grep -v cuda_timer | grep -v '^|')
export PYTHONPATH=$PWD
timeout 180 python3 benchmarks/bench.py --out $r --name h100_b2_infer_rows --models pvt_v2_b2 \
  --modes infer --variants default kgelu=rational --budget-s 110 --profile first \
  2>&1 | grep -v cuda_timer | grep -v '^|'
timeout 150 python3 benchmarks/bench.py --out $r --name h100_small_infer_as --models pvt_small \
  --modes infer --variants default kgelu=rational --budget-s 90 \
  2>&1 | grep -v cuda_timer | grep -v '^|'
timeout 95 python3 benchmarks/bench.py --out $r --name h100_b0_infer_rows --models pvt_v2_b0 \
  --modes infer --budget-s 50 2>&1 | grep -v cuda_timer | grep -v '^|'
for f in $r/*.md; do echo "== $f"; grep '^| pvt' $f; done
