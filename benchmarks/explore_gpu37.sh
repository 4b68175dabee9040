#!/usr/bin/env bash
# Thirty-seventh call (benchmarks/NOTES.md), H200: the whole training gradient of
# pvt_v2_b2 with the fused kernels (the add+norm's backward kernel included) against XLA,
# both against float32 (check_grad_gpu.py; call 36 gave it too little time); then
# pvt_v2_b2 training as committed (the edge table's sums back in XLA), profiled, its HLO.
#   bash benchmarks/explore_gpu37.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
log=$out/log37.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 270 python3 benchmarks/check_grad_gpu.py pvt_v2_b2 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep pvt
timeout 250 python3 benchmarks/bench.py --out "$out" --name h200_b2_train13 --models pvt_v2_b2 \
  --modes train --refs --profile --dump-hlo 2>&1 | grep -v cuda_timer | tee -a "$log" \
  | grep '^| '
gzip -f "$out"/*.hlo.txt
