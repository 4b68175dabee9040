#!/usr/bin/env bash
# Thirty-eighth call (benchmarks/NOTES.md), H200: the three training rows with the
# add+norm's backward kernel (as committed), each against torch.compile in the same run.
#   bash benchmarks/explore_gpu38.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
log=$out/log38.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 215 --name h200_b2_train14 --models pvt_v2_b2 --modes train --refs compiled --budget-s 100
b 200 --name h200_small_train9 --models pvt_small --modes train --refs compiled --budget-s 100
b 170 --name h200_b0_train9 --models pvt_v2_b0 --modes train --refs compiled --budget-s 80
