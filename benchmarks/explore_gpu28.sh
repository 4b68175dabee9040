#!/usr/bin/env bash
# Twenty-eighth call (benchmarks/NOTES.md), H200: v2's stage-closing LayerNorm in the
# add+norm kernel with the last residual add (no sum written) and each stage's
# patch-embedding norm with the first norm1 in one kernel, against both through XLA's
# fusions as before (stagenorm=xla,embednorm=xla); the spatial reduction's patchify as
# cuDNN's conv (patchify=conv, untried on v2). pvt_v2_b2 inference against torch.compile
# in the same run (profiled, HLO dumped), then pvt_v2_b0.
#   bash benchmarks/explore_gpu28.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log28.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
b 230 --name h200_b2_infer8 --models pvt_v2_b2 --modes infer \
  --variants default stagenorm=xla,embednorm=xla patchify=conv \
  --refs compiled --budget-s 150 --profile --dump-hlo
b 90 --name h200_b0_infer7 --models pvt_v2_b0 --modes infer \
  --variants default stagenorm=xla,embednorm=xla patchify=conv --refs --budget-s 70
