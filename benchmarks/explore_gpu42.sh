#!/usr/bin/env bash
# Forty-second call (benchmarks/NOTES.md), H200, the session's last minutes of device
# time: the v2 MLP's forward + backward alone at b2's stage-2 and stage-4 shapes, errors
# against float32 and times, slope=1 (the default, the "kernels" path) and slope=2.
#   bash benchmarks/explore_gpu42.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
log=$out/log42.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 150 python3 benchmarks/conv_grad_gpu.py --out "$out" --name h200_conv_grad5 \
  --shapes b2_s2 b2_s4 --variants slope2:slope=2 slope0:slope=0 2>&1 \
  | grep -v cuda_timer | tee -a "$log" | grep -E '^\{|^\| '
