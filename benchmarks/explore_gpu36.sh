#!/usr/bin/env bash
# Thirty-sixth call (benchmarks/NOTES.md), H200: the add+norm's backward kernel
# (nn.fused.pallas_add_layer_norm_grad) and the edge table's gradient summed in the
# transposed conv's kernel. First the whole training gradient, fused against XLA and
# both against float32 (benchmarks/check_grad_gpu.py); then pvt_v2_b2 training as
# committed, without each of the two (norm.grad=0, convgrad.edge_sums=0) and with the
# add+norm's forward kernel too (addnorm=train), against torch.compile in the same run.
#   bash benchmarks/explore_gpu36.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
log=$out/log36.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 100 python3 benchmarks/check_grad_gpu.py pvt_v2_b2 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep pvt
timeout 440 python3 benchmarks/bench.py --out "$out" --name h200_b2_train12 --models pvt_v2_b2 \
  --modes train --variants default norm.grad=0 convgrad.edge_sums=0 addnorm=train \
  --refs compiled --budget-s 330 2>&1 | grep -v cuda_timer | tee -a "$log" | grep '^| pvt'
