#!/usr/bin/env bash
# Ninth call (benchmarks/NOTES.md): the fused SRA attention kernel, then used at inference
# only (on top of 18d77f6). GPU numerics of all fused kernels against XLA, then inference
# with and without the attention kernel and two of its tiles; no torch references (the
# ratios come from later runs).
#   bash benchmarks/explore_gpu9.sh OUT
out=$1; r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
timeout 150 python3 benchmarks/check_fused_gpu.py pvt_small pvt_v2_b0 pvt_v2_b2 \
  2>&1 | tee "$r/check_fused_gpu_attention.txt"
timeout 200 python3 benchmarks/bench.py --out $r --name x_small_attn --models pvt_small \
  --modes infer --budget-s 180 --profile first \
  --variants default attn=xla attnblk=64x4 attnblk=128x8 2>&1 | grep -v cuda_timer | grep -v '^|'
timeout 200 python3 benchmarks/bench.py --out $r --name x_v2_attn --models pvt_v2_b2 pvt_v2_b0 \
  --modes infer --budget-s 180 --variants default attn=xla attnblk=64x4 \
  2>&1 | grep -v cuda_timer | grep -v '^|'
for f in $r/x_*.md; do grep '^| pvt' $f; done
tar czf "$out/results.tgz" -C "$r" .
