#!/usr/bin/env bash
# Sixteenth call (benchmarks/NOTES.md, BENCHMARKS.md): training against torch.compile in the
# same run: pvt_small (its reference was cut by the budget in the fifteenth call), pvt_v2_b0
# profiled (the fifteenth call measured 5,216 img/s against 7,848-9,301 in earlier runs of
# the same training program), then pvt_v2_b2 as far as the time allows.
#   bash benchmarks/explore_gpu16.sh OUT
out=$1; r=$out; mkdir -p "$r"  # results straight into OUT: a cut call keeps them
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.draw,temperature.gpu --format=csv
b() { timeout "$1" python3 benchmarks/bench.py --out $r "${@:2}" 2>&1 | grep -v cuda_timer | grep -v '^|'; }
b 200 --name h100_small_train_rows2 --models pvt_small --modes train --refs compiled --budget-s 100
b 220 --name h100_b0_train_rows2 --models pvt_v2_b0 --modes train --refs compiled --budget-s 110 \
  --profile first
b 150 --name h100_b2_train_rows --models pvt_v2_b2 --modes train --refs compiled --budget-s 100
for f in $r/*.md; do echo "== $f"; grep '^| pvt\|^| \*' $f; done
