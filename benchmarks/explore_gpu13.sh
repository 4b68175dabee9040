#!/usr/bin/env bash
# Thirteenth call (benchmarks/NOTES.md): the conv kernel with the next row prefetched, and
# its tiles (registers: 32x64x4 227, 32x64x8 159, 16x64x4 157 per thread, from the
# cubin compiled here); GPU numerics of all kernels; pvt_small (also patchify=conv) and
# pvt_v2_b0 inference against torch.compile.   bash benchmarks/explore_gpu13.sh OUT
out=$1; r=$out; mkdir -p "$r"  # results straight into OUT: a cut call keeps them
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
timeout 110 python3 benchmarks/check_fused_gpu.py pvt_small pvt_v2_b0 pvt_v2_b2_li \
  > "$r/check_fused_gpu_rows.txt" 2>&1; grep -v "cuda_timer\|Delay kernel" "$r/check_fused_gpu_rows.txt"
timeout 160 python3 benchmarks/bench.py --out $r --name x_b2_conv_prefetch --models pvt_v2_b2 \
  --modes infer --variants default convblk=32x64x4xn convblk=32x64x8 convblk=16x64x4 \
  --refs --budget-s 140 --profile first --dump-hlo 2>&1 | grep -v cuda_timer | grep -v '^|'
gzip -f $r/*.hlo.txt
timeout 130 python3 benchmarks/bench.py --out $r --name h100_small_infer_rows --models pvt_small \
  --modes infer --variants default patchify=conv --refs compiled --budget-s 70 \
  2>&1 | grep -v cuda_timer | grep -v '^|'
timeout 90 python3 benchmarks/bench.py --out $r --name h100_b0_infer_rows2 --models pvt_v2_b0 \
  --modes infer --refs compiled --budget-s 40 2>&1 | grep -v cuda_timer | grep -v '^|'
for f in $r/*.md; do echo "== $f"; grep '^| pvt' $f; done
