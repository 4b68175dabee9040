#!/usr/bin/env bash
# Tenth call (benchmarks/NOTES.md, BENCHMARKS.md): after the fused attention kernel,
# pvt_small training as is and with the fused kernels in training too (trainfused=1),
# and pvt_small inference, each against torch eager and torch.compile in the same run.
# It ran as `--variants default trainfused=1` when the kernels ran in training only under
# that variant; with them in training by default, the same two programs are now
# `trainfused=0 default`.   bash benchmarks/explore_gpu10.sh OUT
out=$1; r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
timeout 350 python3 benchmarks/bench.py --out $r --name h100_small_train_attn \
  --models pvt_small --modes train --budget-s 300 --variants trainfused=0 default \
  2>&1 | grep -v cuda_timer | grep -v '^|'
timeout 220 python3 benchmarks/bench.py --out $r --name h100_small_infer_attn \
  --models pvt_small --modes infer --budget-s 200 \
  2>&1 | grep -v cuda_timer | grep -v '^|'
for f in $r/h100_*.md; do grep '^| pvt' $f; done
tar czf "$out/results.tgz" -C "$r" .
