#!/usr/bin/env bash
# Twenty-ninth call (benchmarks/NOTES.md), H200: the spatial reduction through cuDNN's
# conv on GPUs (the default now) against reshape, transpose and matmul (sr=matmul, the
# path before), each against torch.compile in the same run: pvt_v2_b2 inference, pvt_small
# inference, pvt_v2_b2 training.
#   bash benchmarks/explore_gpu29.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log29.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 150 --name h200_b2_infer9 --models pvt_v2_b2 --modes infer --variants default sr=matmul \
  --refs compiled --budget-s 100
b 130 --name h200_small_infer5 --models pvt_small --modes infer --variants default sr=matmul \
  --refs compiled --budget-s 85
b 230 --name h200_b2_train6 --models pvt_v2_b2 --modes train --variants default sr=matmul \
  --refs compiled --budget-s 170
