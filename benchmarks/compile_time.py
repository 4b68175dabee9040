"""Compile seconds of PVT v1, blocks scanned vs unrolled (and remat), forward and grad.

Nothing is allocated: params and images are ``jax.ShapeDtypeStruct``s, so pvt_huge's 287M
parameters cost no memory. Each measurement is a fresh ``jax.jit(...).lower(...).compile()``.

    python benchmarks/compile_time.py --models pvt_tiny pvt_huge --out OUT

writes ``<name>.json`` and ``<name>.md`` there (``--name``, default ``compile_time``) and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import optax

from lucid_fn import registry


def loss_fn(apply):
    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

    return loss


def compile_seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0


def measure(name: str, scan: bool, remat: bool, batch: int) -> dict:
    model = registry[name](scan_blocks=scan, remat=remat)
    cfg = model.config
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch, cfg.img_size, cfg.img_size, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return {
        "model": name,
        "blocks": "scan" if scan else "unrolled",
        "remat": remat,
        "forward_s": round(compile_seconds(model.apply, params, x), 2),
        "grad_s": round(compile_seconds(jax.grad(loss_fn(model.apply)), params, x, y), 2),
    }


def device_name() -> str:
    return f"{jax.devices()[0].platform}: {platform.processor() or platform.machine()}, " \
           f"{os.cpu_count()} cores"


def write(out: str | None, rows: list, batch: int, name: str = "compile_time") -> str:
    """The table so far; rewritten after every row, so a stopped run keeps what it measured."""
    md = [f"Compile seconds, jax {jax.__version__}, {device_name()}, batch {batch}, 224x224.",
          "", "| model | blocks | remat | forward (s) | grad (s) |", "|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['blocks']} | {r['remat']} | {r['forward_s']} | {r['grad_s']} |"
           for r in rows]
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump({"jax": jax.__version__, "device": device_name(), "batch": batch,
                       "rows": rows}, f, indent=1)
        with open(os.path.join(out, name + ".md"), "w") as f:
            f.write("\n".join(md) + "\n")
    return "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pvt_tiny", "pvt_huge"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--remat", action="store_true", help="also measure remat=True")
    ap.add_argument("--out", default=None, help="folder for the .json and .md")
    ap.add_argument("--name", default="compile_time")
    args = ap.parse_args(argv)

    rows = []
    for name in args.models:
        for scan in (True, False):
            for remat in ((False, True) if args.remat else (False,)):
                rows.append(measure(name, scan, remat, args.batch))
                print(json.dumps(rows[-1]), flush=True)
                table = write(args.out, rows, args.batch, args.name)
    print(table)


if __name__ == "__main__":
    main()
