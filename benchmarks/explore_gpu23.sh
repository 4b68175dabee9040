#!/usr/bin/env bash
# Twenty-third call (benchmarks/NOTES.md), H200: the conv MLP's backward kernels
# (nn.fused.conv_gelu_table) in v2 training. The MLP alone at each stage shape
# (benchmarks/conv_grad_gpu.py: gradients against float32, fwd + bwd time, against XLA's);
# pvt_v2_b2 training against the path before (trainconv=xla: XLA's conv MLP) and the conv
# kernel with XLA's recomputed gradient (trainconv=xlagrad), torch.compile in the same
# run, the default profiled.
#   bash benchmarks/explore_gpu23.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log23.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 170 python3 benchmarks/conv_grad_gpu.py --out "$out" --name h200_conv_grad 2>&1 \
  | grep -v cuda_timer | tee -a "$log" | grep '^|'
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 380 --name h200_b2_train3 --models pvt_v2_b2 --modes train --variants default trainconv=xla \
  trainconv=xlagrad --refs compiled --budget-s 300 --profile
