#!/usr/bin/env bash
# Twenty-sixth call (benchmarks/NOTES.md), H200: the new defaults (v2's stem over
# space-to-depth blocks, the conv kernels' programs launched channel chunks first, the
# transposed-conv kernel on 512-element tile rows) against torch.compile in the same run:
# pvt_v2_b2 inference (profiled, its HLO dumped; embed=s2dsplit converts the stem's input
# in a pass of its own), pvt_v2_b2 and pvt_v2_b0 training.
#   bash benchmarks/explore_gpu26.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log26.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 170 --name h200_b2_infer6 --models pvt_v2_b2 --modes infer --variants default embed=s2dsplit \
  --refs compiled --budget-s 110 --profile --dump-hlo
b 210 --name h200_b2_train5 --models pvt_v2_b2 --modes train --variants default \
  --refs compiled --budget-s 150
b 150 --name h200_b0_train5 --models pvt_v2_b0 --modes train --variants default \
  --refs compiled --budget-s 100
