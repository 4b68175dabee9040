#!/usr/bin/env bash
# Twentieth call (benchmarks/NOTES.md), H200: after explore_gpu18.sh (the zero ring around
# fc1's input made the kernel faster but the model slower), the conv kernel with predicated
# loads instead of the ring, swept alone, then pvt_v2_b2 and b0 inference with it against
# the kernel as it was ("before") and torch.compile.
#   bash benchmarks/explore_gpu20.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log20.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 120 python3 benchmarks/conv_sweep.py --out "$out" --name h200_conv_sweep2 \
  --shapes b2_s1 b2_s2 b2_s3 b0_s1 b0_s2 2>&1 | grep -v cuda_timer | tee -a "$log" | grep '^|'
before=conv.pad=0,conv.masked_loads=0,conv.exact_min=0,conv.max_h=4096,conv.max_h_narrow=4096
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 150 --name h200_b2_infer2 --models pvt_v2_b2 --modes infer --variants default $before \
  --refs compiled --budget-s 100
b 130 --name h200_b0_infer2 --models pvt_v2_b0 --modes infer --variants default $before \
  --refs compiled --budget-s 85
