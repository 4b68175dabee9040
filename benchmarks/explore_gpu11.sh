#!/usr/bin/env bash
# Eleventh call (benchmarks/NOTES.md, BENCHMARKS.md): with the fused attention kernel
# (inference, and training where dropout is 0), pvt_v2_b0 and pvt_v2_b2 inference against
# torch eager and torch.compile, and pvt_v2_b2 training as is and as before (trainfused=0)
# against torch.compile, each in the same run.   bash benchmarks/explore_gpu11.sh OUT
out=$1; r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
timeout 270 python3 benchmarks/bench.py --out $r --name h100_v2_infer_attn \
  --models pvt_v2_b0 pvt_v2_b2 --modes infer --budget-s 230 \
  2>&1 | grep -v cuda_timer | grep -v '^|'
timeout 290 python3 benchmarks/bench.py --out $r --name h100_b2_train_attn \
  --models pvt_v2_b2 --modes train --budget-s 200 --variants default trainfused=0 \
  --refs compiled 2>&1 | grep -v cuda_timer | grep -v '^|'
for f in $r/h100_*.md; do grep '^| pvt' $f; done
tar czf "$out/results.tgz" -C "$r" .
