#!/usr/bin/env bash
# Fifth exploration call (benchmarks/NOTES.md): the v2 conv-GELU kernel's numerics on the
# GPU, then pvt_v2_b2 and pvt_v2_b0 inference with it against XLA ops and across tile
# sizes, fc1's bias per tap or through the edge-class table (ours only).
#   bash benchmarks/explore_gpu5.sh OUT
out=$1; r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
b="python3 benchmarks/bench.py --out $r --refs"
f() { grep -v cuda_timer | grep -v '^|'; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
timeout 150 python3 benchmarks/check_fused_gpu.py pvt_v2_b2 pvt_v2_b2_li pvt_v2_b0 2>&1 | grep -v cuda_timer | tee "$r/check_fused_gpu_v2.txt"
tar czf "$out/results.tgz" -C "$r" .
timeout 300 $b --name x_b2_convgelu --models pvt_v2_b2 --modes infer --budget-s 280 \
  --profile first --variants default mlp=xla convblk=32x64x4xb convblk=64x64x4 \
  convblk=16x64x4 convblk=32x128x4 2>&1 | f
tar czf "$out/results.tgz" -C "$r" .
timeout 100 $b --name x_b0_convgelu --models pvt_v2_b0 --modes infer --budget-s 80 \
  --variants default mlp=xla convblk=64x64x4 2>&1 | f
tar czf "$out/results.tgz" -C "$r" .
