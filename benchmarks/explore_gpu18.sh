#!/usr/bin/env bash
# Eighteenth call (benchmarks/NOTES.md), the first on an H200: the v2 conv kernel's
# settings swept alone at every b2/b0 stage shape (checked against float32, beside XLA's
# cuDNN form and the memory floor), then pvt_v2_b2 and b0 inference with the new defaults
# against the kernel as it was ("before") and torch.compile, and pvt_small inference
# against torch.compile.
#   bash benchmarks/explore_gpu18.sh OUT
out=$1; mkdir -p "$out"  # results straight into OUT: a cut call keeps them
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log18.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 230 python3 benchmarks/conv_sweep.py --out "$out" --name h200_conv_sweep 2>&1 \
  | grep -v cuda_timer | tee -a "$log" | grep '^|'
before=conv.pad=0,conv.exact_min=0,conv.max_h=4096
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 150 --name h200_b2_infer --models pvt_v2_b2 --modes infer --variants default $before \
  --refs compiled --budget-s 100
b 130 --name h200_b0_infer --models pvt_v2_b0 --modes infer --variants default $before \
  --refs compiled --budget-s 85
b 100 --name h200_small_infer --models pvt_small --modes infer --refs compiled --budget-s 50
