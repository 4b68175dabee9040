#!/usr/bin/env bash
# Thirty-ninth call (benchmarks/NOTES.md), H200: the training forward keeps GELU'(z)
# (CONV_GRAD_BLOCKS["slope"]). First the whole b2 training gradient with slope=2 (fc2's
# input gradient, the slope and the edge table's sums in one kernel) against XLA and
# float32 (check_grad_gpu.py); then pvt_v2_b2 training with slope=2, the path before
# (default, slope=0: the backward's first kernel recomputes z) and slope=1 (XLA
# multiplies), against torch.compile in the same run.
#   bash benchmarks/explore_gpu39.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
log=$out/log39.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 120 python3 benchmarks/check_grad_gpu.py pvt_v2_b2 slope=2 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep -E "pvt|settings|Error"
timeout 450 python3 benchmarks/bench.py --out "$out" --name h200_b2_train15 --models pvt_v2_b2 \
  --modes train --variants convgrad.slope=2 default convgrad.slope=1 \
  --refs compiled --budget-s 230 2>&1 | grep -v cuda_timer | tee -a "$log" | grep '^| pvt'
