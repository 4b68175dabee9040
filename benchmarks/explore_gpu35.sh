#!/usr/bin/env bash
# Thirty-fifth call (benchmarks/NOTES.md), H200: pvt_small and pvt_v2_b0 training with the
# attention's backward kernel (as committed), each against torch.compile in the same run;
# then the attention core alone at b0's first stage (head width 32), kernel against XLA's
# gradient, errors from the same bf16 inputs.
#   bash benchmarks/explore_gpu35.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
log=$out/log35.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 230 --name h200_small_train8 --models pvt_small --modes train --refs compiled --budget-s 110
b 170 --name h200_b0_train8 --models pvt_v2_b0 --modes train --refs compiled --budget-s 80
timeout 90 python3 benchmarks/attention_grad_gpu.py --out "$out" --name h200_attn_grad2 \
  --shapes b0s1 s1 2>&1 | grep -v cuda_timer | tee -a "$log" | grep '^| '
