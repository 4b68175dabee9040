#!/usr/bin/env bash
# Eighth call (benchmarks/NOTES.md): where the v2 conv kernel's time goes; pvt_v2_b2
# inference with the kernel as is, without its GELU, and with one tap instead of nine
# (diagnostics, not the same function), each profiled.   bash benchmarks/explore_gpu8.sh OUT
out=$1; r=/tmp/bench_r; mkdir -p "$r" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
timeout 280 python3 benchmarks/bench.py --out $r --refs --name x_b2_convdiag \
  --models pvt_v2_b2 --modes infer --budget-s 260 --profile all \
  --variants default convdiag=nogelu convdiag=onetap 2>&1 | grep -v cuda_timer | grep -v '^|'
python3 - "$r/x_b2_convdiag.json" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["rows"]:
    ops = row.get("profile", {}).get("ops", [])
    k = sum(o["us"] for o in ops if "conv_gelu" in o["op"])
    print(row["variant"], row.get("img_s"), "conv kernel us/step", round(k, 1),
          "device us/step", row.get("profile", {}).get("total_us_per_step"))
PY
tar czf "$out/results.tgz" -C "$r" .
