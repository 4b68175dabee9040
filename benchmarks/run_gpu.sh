#!/usr/bin/env bash
# Issue 7's table on the device machine: ours at defaults against torch eager and
# torch.compile, inference (b=256) and AdamW training (b=128), each torch reference in its
# own process. Usage, from the repository root:
#   BUDGET=480 bash benchmarks/run_gpu.sh OUTDIR NAME MODEL [MODEL...] [-- BENCH ARGS]
# writes NAME.json / NAME.md into OUTDIR/results.tgz and prints the table.
out=$1; name=$2; shift 2
models=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do models+=("$1"); shift; done
[ "$1" = "--" ] && shift
r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
timeout 585 python3 benchmarks/bench.py --out "$r" --name "$name" --models "${models[@]}" \
  --budget-s "${BUDGET:-500}" "$@" 2>&1 | grep -v cuda_timer
tar czf "$out/results.tgz" -C "$r" .
