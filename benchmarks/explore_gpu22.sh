#!/usr/bin/env bash
# Twenty-second call (benchmarks/NOTES.md), H200: the branches' output biases (attention
# projection, v2's fc2) added in the add+norm kernel instead of an XLA pass each
# (bias=added is the path before), inference of the three models against torch.compile;
# the conv kernel's chunks-first launch order again; pvt_v2_b2 profiled.
#   bash benchmarks/explore_gpu22.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log22.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 140 --name h200_small_infer3 --models pvt_small --modes infer --variants default bias=added \
  --refs compiled --budget-s 90
b 190 --name h200_b2_infer4 --models pvt_v2_b2 --modes infer --variants default bias=added \
  conv.chunks_first=1 --refs compiled --budget-s 130 --profile
b 150 --name h200_b0_infer4 --models pvt_v2_b0 --modes infer --variants default bias=added \
  conv.chunks_first=1 --refs compiled --budget-s 100
