#!/usr/bin/env bash
# Fortieth call (benchmarks/NOTES.md), H200: slope=1 (the forward keeps GELU'(z), XLA
# multiplies) as the default. The v2 MLP's forward + backward alone at b2/b0 stage shapes,
# errors against float32, with slope 0, 1 (default) and 2 at three tilings of its kernel
# (conv_grad_gpu.py); then pvt_v2_b2 and pvt_v2_b0 training as committed against
# torch.compile in the same run (b2 also with slope=2 at 128 rows, 8 warps).
#   bash benchmarks/explore_gpu40.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
log=$out/log40.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 120 python3 benchmarks/conv_grad_gpu.py --out "$out" --name h200_conv_grad4 \
  --shapes b2_s1 b2_s2 b2_s3 b0_s1 --variants slope0:slope=0 slope2:slope=2 \
  slope2w:slope=2,slope_rows=128,slope_warps=8 slope2s:slope=2,slope_steps=2 2>&1 \
  | grep -v cuda_timer | tee -a "$log" | grep '^| '
timeout 250 python3 benchmarks/bench.py --out "$out" --name h200_b2_train16 --models pvt_v2_b2 \
  --modes train --variants default convgrad.slope=2,convgrad.slope_rows=128,convgrad.slope_warps=8 \
  --refs compiled --budget-s 150 2>&1 | grep -v cuda_timer | tee -a "$log" | grep '^| pvt'
timeout 190 python3 benchmarks/bench.py --out "$out" --name h200_b0_train10 --models pvt_v2_b0 \
  --modes train --refs compiled --budget-s 90 2>&1 | grep -v cuda_timer | tee -a "$log" \
  | grep '^| pvt'
