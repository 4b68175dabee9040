#!/usr/bin/env bash
# Thirty-third call (benchmarks/NOTES.md), H200, for the one row short of issue 7's goal:
# pvt_v2_b2 training as committed, profiled with its optimised HLO, against torch.compile
# in the same run (explore_gpu32.sh's last command, which the device time did not reach);
# then the same step with XLA's Triton gemm fusions off (every matmul through cuBLAS: the
# profile had 4.2 ms in Triton gemm fusions, 5.1 in cuBLAS).
#   bash benchmarks/explore_gpu33.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log33.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 190 --name h200_b2_train9 --models pvt_v2_b2 --modes train --refs compiled --budget-s 105 \
  --profile --dump-hlo
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \
  b 130 --name h200_b2_train10 --models pvt_v2_b2 --modes train --budget-s 110
gzip -f "$out"/*.hlo.txt
