#!/usr/bin/env bash
# Twenty-seventh call (benchmarks/NOTES.md), H200: the query projection's bias added in
# the attention kernel at inference (qbias=kernel; the default adds it in XLA, one pass
# over the queries per block; 16 loop fusions, 0.47 ms of b2's profiled 14.9 ms in
# explore_gpu26), pvt_v2_b2 against torch.compile in the same run, then pvt_small and
# pvt_v2_b0.
#   bash benchmarks/explore_gpu27.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log27.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 160 --name h200_b2_infer7 --models pvt_v2_b2 --modes infer --variants default qbias=kernel \
  --refs compiled --budget-s 100
b 60 --name h200_small_infer4 --models pvt_small --modes infer --variants default qbias=kernel \
  --refs --budget-s 45
b 60 --name h200_b0_infer6 --models pvt_v2_b0 --modes infer --variants default qbias=kernel \
  --refs --budget-s 45
