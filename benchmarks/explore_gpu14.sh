#!/usr/bin/env bash
# Fourteenth call (benchmarks/NOTES.md): where the LayerNorm fusions and v2's first patch
# embedding stand. XLA's block-level (Triton) normalization fusions with
# --xla_gpu_enable_softmax_fusion=false (pvt_v2_b2, pvt_small); v2's 7x7/4 patch embedding
# on 3 channels as one matmul over strided slices (embed=im2col) instead of cuDNN;
# pvt_small inference against torch eager and torch.compile.   bash benchmarks/explore_gpu14.sh OUT
out=$1; r=$out; mkdir -p "$r"  # results straight into OUT: a cut call keeps them
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
b() { timeout "$1" python3 benchmarks/bench.py --out $r "${@:2}" 2>&1 | grep -v cuda_timer | grep -v '^|'; }
XLA_FLAGS=--xla_gpu_enable_softmax_fusion=false b 100 --name x_b2_nosoftmax --models pvt_v2_b2 \
  --modes infer --refs --budget-s 60 --profile first
XLA_FLAGS=--xla_gpu_enable_softmax_fusion=false b 70 --name x_small_nosoftmax --models pvt_small \
  --modes infer --refs --budget-s 40
b 110 --name x_v2_embed --models pvt_v2_b2 pvt_v2_b0 --modes infer --variants default embed=im2col \
  --refs --budget-s 100
b 150 --name h100_small_infer_rows2 --models pvt_small --modes infer --budget-s 60
for f in $r/*.md; do echo "== $f"; grep '^| pvt\|^| \*\|^| fusion\|^| lucid' $f | head -30; done
