#!/usr/bin/env bash
# Thirty-first call (benchmarks/NOTES.md), H200: the thirtieth (explore_gpu30.sh) had every
# training row 3-5% below its last timing, and the one change since that runs in training is
# the spatial reduction through cuDNN's conv; here it is against reshape, transpose and
# matmul (sr=matmul, the path before) in training, each against torch.compile in the same run.
#   bash benchmarks/explore_gpu31.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log31.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 300 --name h200_b2_train8 --models pvt_v2_b2 --modes train --variants default sr=matmul \
  --refs compiled --budget-s 205
b 280 --name h200_small_train7 --models pvt_small --modes train --variants default sr=matmul \
  --refs compiled --budget-s 170
