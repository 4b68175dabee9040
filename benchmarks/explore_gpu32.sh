#!/usr/bin/env bash
# Thirty-second call (benchmarks/NOTES.md), H200: the spatial reduction through cuDNN at
# inference only (explore_gpu31.sh: it lost 5% in training). pvt_small inference with it
# against sr=matmul (v1's reduction had not been timed through cuDNN) and against
# embednorm=xla (v1's patch norm, position embedding and norm1 now one kernel), pvt_v2_b0 and
# pvt_v2_b2 training as now committed (b2 profiled, with its optimised HLO: the breakdown of
# the one row short of the goal); each against torch.compile in the same run.
#   bash benchmarks/explore_gpu32.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log32.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 145 --name h200_small_infer7 --models pvt_small --modes infer \
  --variants default sr=matmul embednorm=xla --refs compiled --budget-s 95
b 150 --name h200_b0_train7 --models pvt_v2_b0 --modes train --refs compiled --budget-s 75
b 180 --name h200_b2_train9 --models pvt_v2_b2 --modes train --refs compiled --budget-s 105 \
  --profile --dump-hlo
gzip -f "$out"/*.hlo.txt
