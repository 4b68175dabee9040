#!/usr/bin/env bash
# Nineteenth call (benchmarks/NOTES.md), H200: the training rows of the table, ours
# against torch.compile in the same run (pvt_v2_b2, pvt_v2_b0, then pvt_small).
#   bash benchmarks/explore_gpu19.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log19.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 260 --name h200_b2_train --models pvt_v2_b2 --modes train --refs compiled --budget-s 150
b 200 --name h200_b0_train --models pvt_v2_b0 --modes train --refs compiled --budget-s 110
b 130 --name h200_small_train --models pvt_small --modes train --refs compiled --budget-s 80
