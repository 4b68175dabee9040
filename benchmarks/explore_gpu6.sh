#!/usr/bin/env bash
# Ran at commit a902e59 (the wgrad kernel and check_dwconv_gpu.py were removed after it).
# Sixth exploration call (benchmarks/NOTES.md): the depthwise conv's weight-gradient
# kernel against cuDNN's (numerics and time per stage shape), then pvt_v2_b2 training with
# it against XLA ops, and inference after the kernel's loads became clamped gathers (no
# padded copy), with more warps.   bash benchmarks/explore_gpu6.sh OUT
out=$1; r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
b="python3 benchmarks/bench.py --out $r --refs"
f() { grep -v cuda_timer | grep -v '^|'; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
timeout 120 python3 benchmarks/check_dwconv_gpu.py 2>&1 | grep -v cuda_timer | tee "$r/check_dwconv_gpu.txt"
tar czf "$out/results.tgz" -C "$r" .
timeout 300 $b --name x_b2_train_wgrad --models pvt_v2_b2 --modes train --budget-s 280 \
  --profile first --variants default mlp=xla 2>&1 | f
tar czf "$out/results.tgz" -C "$r" .
timeout 150 $b --name x_b2_infer_gather --models pvt_v2_b2 --modes infer --budget-s 130 \
  --variants default convblk=64x64x8 convblk=128x64x8 2>&1 | f
tar czf "$out/results.tgz" -C "$r" .
