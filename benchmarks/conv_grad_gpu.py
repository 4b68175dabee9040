"""The PVT v2 conv MLP's gradient on a GPU, at each stage shape of pvt_v2_b2 and b0 (batch
128, the training batch, bf16): the backward kernels (``nn.fused.conv_gelu_table``'s VJP)
against XLA's gradient of the same MLP, both checked against float32 and timed::

    PYTHONPATH=. python3 benchmarks/conv_grad_gpu.py --out OUT --name conv_grad

For each shape and each path, one jitted step of the MLP's forward and backward (the
gradients of fc1, the conv, fc2 and the tokens for a fixed random cotangent), median of 5
repeats of 20 calls. Paths: ``kernels`` (the conv kernel and its backward kernels),
``xlagrad`` (the conv kernel, XLA's gradient recomputed from the inputs), ``xla`` (XLA ops
throughout: cuDNN's depthwise conv). Error: each gradient's largest absolute difference
from float32 over the float32 gradient's largest magnitude; the kernels must be no worse
than XLA's bf16 path by more than rounding. ``--variants name:key=value,...`` (over
``nn.fused.CONV_GRAD_BLOCKS`` and ``CONV_BLOCKS``) time the kernels path again with other
settings. Writes ``<out>/<name>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import jax
import jax.numpy as jnp

from conv_sweep import SHAPES, conv_blocks, inputs, parse, timed  # benchmarks/
from lucid_fn.nn import fused

GRAD_SHAPES = {k: (128, *v[1:]) for k, v in SHAPES.items() if k != "tiny"}
GRAD_SHAPES["tiny"] = SHAPES["tiny"]
PATHS = ("kernels", "xlagrad", "xla")


@contextlib.contextmanager
def path(name: str):
    """The conv MLP through one of PATHS while tracing."""
    with conv_blocks({"own": name == "kernels"}):
        yield fused.reference_conv_mlp if name == "xla" else fused.conv_mlp


def grad_fn(mlp, hw, dtype, cotangent):
    def loss(fc1, dw, fc2, x):
        y = mlp(fc1, dw, fc2, x, hw=hw, relu=False, dtype=dtype)
        return (y.astype(jnp.float32) * cotangent).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def errors(grads, want) -> dict:
    """Per gradient leaf: max |got - want| / max |want|."""
    out = {}
    for (p, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
        scale = float(jnp.abs(w).max())
        out[jax.tree_util.keystr(p)] = float(jnp.abs(g.astype(jnp.float32) - w).max()) / scale
    return out


def run_shape(label, shape, timing, variants=()) -> list:
    b, hh, ww, hidden = shape
    fc1, dw, x = inputs(shape)
    c = x.shape[-1]
    k = jax.random.split(jax.random.key(9), 2)
    fc2 = {"kernel": jax.random.normal(k[0], (hidden, c)) * hidden**-0.5,
           "bias": jnp.zeros((c,))}
    cot = jax.random.normal(k[1], x.shape)
    args = (fc1, dw, fc2, x)
    want = grad_fn(fused.reference_conv_mlp, (hh, ww), jnp.float32, cot)(*args)
    rows = []
    runs = [(name, name, {}) for name in PATHS]
    runs += [("kernels", *parse(spec)) for spec in variants]
    for name, label_path, over in runs:
        with conv_blocks(over), path(name) as mlp:
            f = grad_fn(mlp, (hh, ww), jnp.bfloat16, cot)
            hlo = f.lower(*args).as_text()
            err = errors(f(*args), want)
            ms = timed(f, *args, timing=timing) * 1e3
        rows.append(dict(shape=label, batch=b, path=label_path, settings=over,
                         ms=round(ms, 4),
                         backward_kernels="lucid_fn_fused_conv_transpose" in hlo,
                         max_err=max(err.values()), err=err))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=[s for s in GRAD_SHAPES if s != "tiny"])
    ap.add_argument("--variants", nargs="*", default=[])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="conv_grad")
    ap.add_argument("--timing", type=int, nargs=2, default=(5, 20),
                    metavar=("REPEATS", "CALLS"))
    args = ap.parse_args(argv)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
    os.makedirs(args.out, exist_ok=True)
    for label in args.shapes:
        result["rows"] += run_shape(label, GRAD_SHAPES[label], tuple(args.timing),
                                    args.variants)
        with open(os.path.join(args.out, args.name + ".json"), "w") as f:
            json.dump(result, f, indent=1)
    print("\n| shape | path | ms (fwd + bwd) | max error vs f32 |")
    print("|---|---|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['shape']} | {r['path']} | {r['ms']:.3f} | {r['max_err']:.4f} |")
    return result


if __name__ == "__main__":
    main()
