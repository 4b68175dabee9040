#!/usr/bin/env bash
# Twenty-fourth call (benchmarks/NOTES.md), H200: the conv backward kernels' tiles and the
# cotangent's prefetch (benchmarks/conv_grad_gpu.py at b2's first three stage shapes,
# batch 128); the fastest setting by summed time, then pvt_v2_b2 training, default and
# with it, against torch.compile in the same run.
#   bash benchmarks/explore_gpu24.sh OUT
out=$1; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log=$out/log24.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv | tee "$log"
timeout 160 python3 benchmarks/conv_grad_gpu.py --out "$out" --name h200_conv_grad2 \
  --shapes b2_s1 b2_s2 b2_s3 --variants g1024:gelu_size=1024 pg:prefetch_g=1 \
  g1024_pg:gelu_size=1024,prefetch_g=1 t512:transpose_size=512 \
  t2048w8:transpose_size=2048,transpose_warps=8 g1024_t512:gelu_size=1024,transpose_size=512 \
  g1024_pg_t512:gelu_size=1024,prefetch_g=1,transpose_size=512 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^|'
best=$(python3 - "$out/h200_conv_grad2.json" <<'PY'
import collections, json, sys
rows = json.load(open(sys.argv[1]))["rows"]
total = collections.defaultdict(float)
for r in rows:
    if r["path"] not in ("xla", "xlagrad"):
        total[json.dumps(r["settings"])] += r["ms"]
best = json.loads(min(total, key=total.get))
print(",".join(f"convgrad.{k}={v}" for k, v in best.items()) or "default")
PY
)
echo "best: $best" | tee -a "$log"
b() { timeout "$1" python3 benchmarks/bench.py --out "$out" "${@:2}" 2>&1 | grep -v cuda_timer \
  | tee -a "$log" | grep '^| pvt'; }
variants="default"; [ "$best" != default ] && variants="default $best"
b 420 --name h200_b2_train4 --models pvt_v2_b2 --modes train --variants $variants \
  --refs compiled --budget-s 330
