#!/usr/bin/env bash
# One exploration call on the device machine (benchmarks/NOTES.md has what it found):
# the fused MLP's numerics on GPU, its tile sizes against XLA ops for pvt_small inference,
# and depthwise conv as shifted multiply-adds for PVT v2.
#   bash benchmarks/explore_gpu.sh OUTDIR
out=$1; r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
b="python3 benchmarks/bench.py --out $r --refs"
f() { grep -v cuda_timer | grep -v '^|'; }
timeout 60 python3 benchmarks/check_fused_gpu.py 2>&1 | f
timeout 230 $b --name x_small_mlp --models pvt_small --modes infer --profile --budget-s 200 \
  --variants default mlp=xla mlpblk=128x64x4 mlpblk=64x128x4 mlpblk=128x128x8 2>&1 | f
timeout 120 $b --name x_v2_infer_shift --models pvt_v2_b0 pvt_v2_b2 --modes infer \
  --variants dwconv=shift 2>&1 | f
timeout 120 $b --name x_b0_train_shift --models pvt_v2_b0 --modes train --profile \
  --variants dwconv=shift 2>&1 | f
tar czf "$out/results.tgz" -C "$r" .
