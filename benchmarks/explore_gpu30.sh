#!/usr/bin/env bash
# Thirtieth call (benchmarks/NOTES.md), H200: all six of issue 7's rows with the code as
# committed (the defaults only), each against torch.compile in the same run.
#   bash benchmarks/explore_gpu30.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log30.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 90 --name h200_b2_infer10 --models pvt_v2_b2 --modes infer --refs compiled --budget-s 60
b 140 --name h200_b2_train7 --models pvt_v2_b2 --modes train --refs compiled --budget-s 110
b 80 --name h200_small_infer6 --models pvt_small --modes infer --refs compiled --budget-s 50
b 80 --name h200_b0_infer8 --models pvt_v2_b0 --modes infer --refs compiled --budget-s 50
b 100 --name h200_small_train6 --models pvt_small --modes train --refs compiled --budget-s 80
b 80 --name h200_b0_train6 --models pvt_v2_b0 --modes train --refs compiled --budget-s 60
