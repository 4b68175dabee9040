#!/usr/bin/env bash
# Forty-first call (benchmarks/NOTES.md), H200: the whole pvt_v2_b2 training gradient with
# slope=1 (the default) against XLA and float32 (check_grad_gpu.py, batch 8), then
# pvt_v2_b2 training as committed, profiled, against torch.compile in the same run.
#   bash benchmarks/explore_gpu41.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
log=$out/log41.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 230 python3 benchmarks/check_grad_gpu.py pvt_v2_b2 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep -E "pvt|Error"
timeout 280 python3 benchmarks/bench.py --out "$out" --name h200_b2_train17 --models pvt_v2_b2 \
  --modes train --refs compiled --profile first --budget-s 150 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'
