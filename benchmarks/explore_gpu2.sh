#!/usr/bin/env bash
# Second exploration call (benchmarks/NOTES.md): the fused MLP's numerics on GPU, its tile
# sizes and the approximate reciprocal for pvt_small inference; then pvt_v2_b2 training
# against both torch references in one run.   bash benchmarks/explore_gpu2.sh OUTDIR
out=$1; r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
b="python3 benchmarks/bench.py --out $r"
f() { grep -v cuda_timer | grep -v '^|'; }
timeout 90 python3 benchmarks/check_fused_gpu.py 2>&1 | grep -v cuda_timer | tee "$r/check_fused_gpu.txt"
timeout 200 $b --refs --name x_small_mlp2 --models pvt_small --modes infer --budget-s 170 \
  --variants default mlpblk=128x128x8xr mlpblk=128x64x8 mlpblk=256x64x8 mlpblk=64x128x8 2>&1 | f
timeout 290 $b --name h100_b2_train --models pvt_v2_b2 --modes train 2>&1 | f
tar czf "$out/results.tgz" -C "$r" .
