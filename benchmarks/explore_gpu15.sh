#!/usr/bin/env bash
# Fifteenth call (benchmarks/NOTES.md, BENCHMARKS.md): training after the A&S GELU in the
# v1 MLP kernel (pvt_small) and the conv-kernel rework (v2 training runs XLA's conv unless
# trainfused=conv), each against torch eager and torch.compile in the same run.
#   bash benchmarks/explore_gpu15.sh OUT
out=$1; r=$out; mkdir -p "$r"  # results straight into OUT: a cut call keeps them
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
b() { timeout "$1" python3 benchmarks/bench.py --out $r "${@:2}" 2>&1 | grep -v cuda_timer | grep -v '^|'; }
b 290 --name h100_small_train_rows --models pvt_small --modes train --budget-s 60
b 290 --name h100_b0_train_rows --models pvt_v2_b0 --modes train --variants default trainfused=conv \
  --budget-s 90
for f in $r/*.md; do echo "== $f"; grep '^| pvt' $f; done
