"""Reproduce the tables of docs/performance.md, each into result files named by date,
device, software versions and what was timed::

    python benchmarks/reproduce.py gpu --out OUT      # the six rows against torch.compile
    python benchmarks/reproduce.py latency --out OUT  # batch 1 and 8, against CUDA graphs
    python benchmarks/reproduce.py f32 --out OUT      # pvt_v2_b2 in float32 (and TF32)
    python benchmarks/reproduce.py big --out OUT      # pvt_v2_b5, pvt_large: training batches
    python benchmarks/reproduce.py compile --out OUT  # compile seconds, scanned vs unrolled
    python benchmarks/reproduce.py cpu --out OUT      # pvt_small against HF on the CPU

``gpu``, ``latency``, ``f32`` and ``big`` need a CUDA GPU and torch, timm and transformers
(none is a dependency of lucid_fn); ``cpu`` needs torch and transformers for its reference.
Run from the repository root. ``--dry-run`` prints the commands (as argument lists) and
runs nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402

GPU_MODELS = ("pvt_small", "pvt_v2_b2", "pvt_v2_b0")


def stem(what: str) -> str:
    """``<date>_<device>_jax<version>[_torch<version>]_<what>``."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        name = f"cpu{os.cpu_count()}core"
    else:
        name = device.device_kind.lower().replace("nvidia ", "").split()[0]
    try:
        import torch
        torch_version = "_torch" + ".".join(torch.__version__.split("+")[0].split(".")[:2])
    except ImportError:
        torch_version = ""
    date = datetime.date.today().isoformat()
    return f"{date}_{name}_jax{jax.__version__}{torch_version}_{what}"


def commands(table: str, out: str) -> list[tuple[str, list[str]]]:
    """(script, argv) of each run the table needs."""
    if table == "gpu":
        return [("bench", ["--models", m, "--modes", "infer", "train", "--refs", "compiled",
                           "--out", out, "--name", stem(m + ("_paper" if m == "pvt_small"
                                                             else ""))])
                for m in GPU_MODELS]
    if table == "latency":
        return [("bench", ["--models", *GPU_MODELS, "--modes", "latency", "--refs", "compiled",
                           "reduce-overhead", "--out", out, "--name", stem("latency")])]
    if table == "f32":  # JAX takes float32 dots as TF32 on these GPUs; torch by default not
        return [("bench", ["--models", "pvt_v2_b2", "--dtype", "float32", "--refs", "compiled",
                           "--torch-tf32", tf32, "--out", out,
                           "--name", stem(f"pvt_v2_b2_f32_torch_tf32_{tf32}")])
                for tf32 in ("default", "on")]
    if table == "big":  # a row per batch: the largest that both sides ran is the table's
        return [("bench", ["--models", m, "--modes", "train", "--train-batch", "64", "128",
                           "256", "--refs", "compiled", "--out", out,
                           "--name", stem(m + ("_paper" if m == "pvt_large" else "") + "_train")])
                for m in ("pvt_v2_b5", "pvt_large")]
    if table == "compile":
        return [("compile_time", ["--models", "pvt_tiny", "pvt_small", "pvt_huge", "--remat",
                                  "--out", out, "--name", stem("compile_time")])]
    return [("bench", ["--device", "cpu", "--models", "pvt_small", "--modes", "infer",
                       "--infer-batch", "8", "--dtype", "float32", "--refs", "eager",
                       "--threads", "2", "--repeats", "3", "--iters", "3", "--out", out,
                       "--name", stem("pvt_small_paper_infer_f32")])]


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=("gpu", "latency", "f32", "big", "compile", "cpu"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if args.table in ("gpu", "latency", "f32", "big") and jax.default_backend() != "gpu":
        raise SystemExit(f"reproduce.py {args.table}: JAX sees no GPU; install jax with CUDA "
                         "(README, Install) and run on a machine with an NVIDIA GPU")
    runs = commands(args.table, args.out)
    for script, argv_ in runs:
        print(f"python benchmarks/{script}.py {' '.join(argv_)}", flush=True)
        if not args.dry_run:
            __import__(script).main(argv_)
    print(f"done on {platform.node()}: results in {args.out}", flush=True)
    return runs


if __name__ == "__main__":
    main()
