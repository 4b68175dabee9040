#!/usr/bin/env bash
# Twenty-fifth call (benchmarks/NOTES.md), H200: v2's patch embeddings as stride-1 convs
# over space-to-depth blocks (embed=s2dstem: the 7x7/4 stem on 3 channels only; embed=s2d:
# the 3x3/2 ones too), inference of pvt_v2_b2 (profiled) and pvt_v2_b0 against
# torch.compile in the same run; the transposed-conv tile of explore_gpu24 at b2's stages
# 2 and 3 (that call's sweep ran out of time after stage 1).
#   bash benchmarks/explore_gpu25.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log25.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 110 python3 benchmarks/conv_grad_gpu.py --out "$out" --name h200_conv_grad3 \
  --shapes b2_s2 b2_s3 --variants t512:transpose_size=512 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^|'
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 230 --name h200_b2_infer5 --models pvt_v2_b2 --modes infer --variants embed=s2dstem default \
  embed=s2d embed=s2dstem,conv.chunks_first=1 --refs compiled --budget-s 170 --profile
b 160 --name h200_b0_infer5 --models pvt_v2_b0 --modes infer --variants default embed=s2dstem \
  embed=s2d --refs compiled --budget-s 110
