#!/usr/bin/env bash
# Thirty-fourth call (benchmarks/NOTES.md), H200: the attention's backward kernel
# (nn.fused.pallas_attention_grad). First the attention core alone at PVT's stage shapes,
# kernel against XLA's recomputed gradient, with tile settings; then pvt_v2_b2 training
# with the kernel and without it (attngrad=xla), against torch.compile in the same run.
#   bash benchmarks/explore_gpu34.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
log=$out/log34.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 170 python3 benchmarks/attention_grad_gpu.py --out "$out" --name h200_attn_grad1 \
  --variants q64w8:num_warps=8 q128w8:block_q=128,num_warps=8 q32w4:block_q=32 \
  p2048:min_programs=2048 2>&1 | grep -v cuda_timer | tee -a "$log" | grep '^| '
timeout 380 python3 benchmarks/bench.py --out "$out" --name h200_b2_train11 --models pvt_v2_b2 \
  --modes train --variants default attngrad=xla --refs compiled --budget-s 210 2>&1 \
  | grep -v cuda_timer | tee -a "$log" | grep '^| pvt'
