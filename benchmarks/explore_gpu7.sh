#!/usr/bin/env bash
# Ran at commit 8c3cd2a (the convblk "xf" fc2-on-chip option was removed after it).
# Seventh call (benchmarks/NOTES.md): the v2 kernel with fc2 accumulated on chip, its
# numerics, then pvt_v2_b2 and pvt_v2_b0 inference against torch eager and compiled in
# the same run.   bash benchmarks/explore_gpu7.sh OUT
out=$1; r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
b="python3 benchmarks/bench.py --out $r"
f() { grep -v cuda_timer | grep -v '^|'; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
timeout 100 python3 benchmarks/check_fused_gpu.py pvt_v2_b0 2>&1 | grep -v cuda_timer | tee "$r/check_fused_gpu_v2_fc2.txt"
tar czf "$out/results.tgz" -C "$r" .
timeout 250 $b --name h100_b2_infer --models pvt_v2_b2 --modes infer --budget-s 230 \
  --variants default convblk=32x64x4xf convblk=64x64x4xf 2>&1 | f
tar czf "$out/results.tgz" -C "$r" .
timeout 200 $b --name h100_b0_infer --models pvt_v2_b0 --modes infer --budget-s 180 \
  --variants default convblk=32x64x4xf convblk=64x64x4xf 2>&1 | f
tar czf "$out/results.tgz" -C "$r" .
