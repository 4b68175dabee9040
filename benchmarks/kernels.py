"""Each fused kernel family alone, at the stage shapes of the benchmarked models: checked
against float32 and timed beside XLA's form of the same op, forward and (where the family
has a backward kernel) forward + backward; and, with ``--models``, whole models' logits
and gradients with the kernels against XLA's path and float32::

    PYTHONPATH=. python3 benchmarks/kernels.py --out OUT --name kernels_h100
    PYTHONPATH=. python3 benchmarks/kernels.py --families conv_mlp \\
        --variants default conv_mlp.block_x=16 --out OUT --name conv_tiles
    PYTHONPATH=. python3 benchmarks/kernels.py --models pvt_small pvt_v2_b2 --out OUT

A variant is ``default`` or ``lucid_fn.kernels.parse`` items (``conv_mlp.block_x=16``).
Time per call: the median of 5 repeats of 20 calls. Error: the largest absolute
difference from float32 (inputs rounded to bf16 first, so both paths see the same
values), over the float32 result's largest magnitude, beside XLA's bf16 path's own: the
kernels must be no worse than it by more than rounding. ``--interpret`` runs the kernels
in interpret mode on any backend (a CPU smoke run at ``--shapes tiny``; times mean
nothing). Writes ``<out>/<name>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from lucid_fn import kernels, registry
from lucid_fn.kernels import attention as attention_k
from lucid_fn.kernels import conv_mlp as conv_mlp_k
from lucid_fn.kernels import layer_norm as layer_norm_k
from lucid_fn.kernels import mlp as mlp_k
from lucid_fn.nn import attention as sra
from lucid_fn.nn import layers

# Per family, per shape set: the stage shapes at the benchmark's batch (inference 256:
# forward only; training 128: forward and backward).
SHAPES = {
    "mlp": {"small": [(256, 3136, 64, 512), (256, 784, 128, 1024)],  # B, N, C, hidden
            "tiny": [(2, 40, 16, 128)]},
    "conv_mlp": {"b2": [(128, 56, 56, 64, 512), (128, 28, 28, 128, 1024),  # B, H, W, C, hidden
                        (128, 14, 14, 320, 1280), (128, 7, 7, 512, 2048)],
                 "b0": [(128, 56, 56, 32, 256), (128, 28, 28, 64, 512)],
                 "tiny": [(2, 5, 7, 16, 64)]},
    "attention": {"b2": [(128, 3136, 49, 1, 64), (128, 784, 49, 2, 64),  # B, N, M, heads, d
                         (128, 196, 49, 5, 64), (128, 49, 49, 8, 64)],
                  "tiny": [(2, 40, 9, 2, 16)]},
    "norm": {"b2": [(128, 3136, 64), (128, 784, 128), (128, 196, 320), (128, 49, 512)],
             "tiny": [(2, 40, 48)]},
}
GRADS = {"mlp": False, "conv_mlp": True, "attention": True, "norm": True}


def _normal(key, shape, scale=1.0):
    """bf16-exact float32 values: both paths read the same inputs."""
    return (jax.random.normal(key, shape) * scale).astype(jnp.bfloat16).astype(jnp.float32)


def op(family: str, shape: tuple, ks: kernels.KernelSettings):
    """(fused(*args, dtype), reference(*args, dtype), args) of one family at one shape."""
    k = jax.random.split(jax.random.key(0), 8)
    if family == "mlp":
        b, n, c, hidden = shape
        fc1 = {"kernel": _normal(k[0], (c, hidden), c**-0.5), "bias": _normal(k[1], (hidden,), .1)}
        fc2 = {"kernel": _normal(k[2], (hidden, c), hidden**-0.5), "bias": _normal(k[3], (c,), .1)}
        args = (fc1, fc2, _normal(k[4], (b, n, c)))
        return (lambda *a, dtype: mlp_k.mlp_gelu(*a, approximate=False, dtype=dtype, kernels=ks),
                lambda *a, dtype: mlp_k.reference(*a, approximate=False, dtype=dtype), args)
    if family == "conv_mlp":
        b, hh, ww, c, hidden = shape
        fc1 = {"kernel": _normal(k[0], (c, hidden), c**-0.5), "bias": _normal(k[1], (hidden,), .5)}
        dw = {"kernel": _normal(k[2], (3, 3, 1, hidden), 1 / 3), "bias": _normal(k[3], (hidden,), .2)}
        fc2 = {"kernel": _normal(k[4], (hidden, c), hidden**-0.5), "bias": _normal(k[5], (c,), .1)}
        args = (fc1, dw, fc2, _normal(k[6], (b, hh * ww, c)))
        kw = dict(hw=(hh, ww), relu=False)
        return (lambda *a, dtype: layers.add_bias(conv_mlp_k.conv_mlp(*a, dtype=dtype,
                                                                      kernels=ks, **kw)),
                lambda *a, dtype: conv_mlp_k.reference(*a, dtype=dtype, **kw), args)
    if family == "attention":
        b, n, m, heads, d = shape
        args = tuple(_normal(k[i], (b, r, heads, d)) for i, r in enumerate((n, m, m)))

        def fused(q, kk, v, dtype):
            return sra.attend(*(a.astype(dtype) for a in (q, kk, v)), scale=None,
                              dtype=dtype, attn_drop=0.0, rng=None, kernels=ks)

        def reference(q, kk, v, dtype):
            return sra.attend_xla(*(a.astype(dtype) for a in (q, kk, v)), scale=None,
                                  dtype=dtype)

        return fused, reference, args
    b, n, c = shape
    p = {"scale": 1 + _normal(k[0], (c,), .2), "bias": _normal(k[1], (c,), .2)}
    args = (p, _normal(k[2], (b, n, c), 3.0) + 1, _normal(k[3], (b, n, c)))

    def fused(p, x, y, dtype):
        return layer_norm_k.add_layer_norm(p, x.astype(dtype), y.astype(dtype), eps=1e-6,
                                           kernels=ks)

    def reference(p, x, y, dtype):
        return layer_norm_k.reference_add_layer_norm(p, x.astype(dtype), y.astype(dtype),
                                                     eps=1e-6)

    return fused, reference, args


def timed(fn, *args, timing=(5, 20)) -> float:
    """Median seconds per call over ``timing = (repeats, calls per repeat)``."""
    repeats, iters = timing
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def _rel_err(got, want) -> float:
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    return max(float(jnp.abs(a.astype(jnp.float32) - w).max() / jnp.abs(w).max())
               for a, w in zip(got, want))


def _loss(fn, dtype):
    """A fixed linear functional of the output, to differentiate."""
    def loss(*a):
        out = jax.tree.leaves(fn(*a, dtype=dtype))
        return sum((o.astype(jnp.float32) * jnp.cos(jnp.arange(o.size).reshape(o.shape)))
                   .sum() for o in out)
    return loss


def run_op(family, shape, spec, *, interpret: bool, timing) -> list[dict]:
    ks = kernels.parse(spec if spec != "default" else "").replace(interpret=interpret)
    fused, reference, args = op(family, shape, ks)
    bf16, f32 = jnp.bfloat16, jnp.float32
    rows = []
    modes = [("forward", lambda fn, dt: jax.jit(functools.partial(fn, dtype=dt)))]
    if GRADS[family]:
        argnums = tuple(range(len(args)))
        modes.append(("forward+backward", lambda fn, dt: jax.jit(
            jax.grad(_loss(fn, dt), argnums=argnums))))
    for mode, make in modes:
        want = make(reference, f32)(*args)
        got_fn, xla_fn = make(fused, bf16), make(reference, bf16)
        row = dict(family=family, shape=list(shape), variant=spec, mode=mode,
                   err=_rel_err(got_fn(*args), want), err_xla_bf16=_rel_err(xla_fn(*args), want))
        row.update(ms=round(timed(got_fn, *args, timing=timing) * 1e3, 4),
                   ms_xla=round(timed(xla_fn, *args, timing=timing) * 1e3, 4))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_model(name, spec) -> dict:
    """Logits and the training gradient of a model with the kernels (bf16) against XLA's
    path (bf16) and float32, at 224x224, batch 8."""
    kw = {"flavor": "paper"} if name.startswith("pvt_") and "v2" not in name else {}
    ks = kernels.parse(spec if spec != "default" else "")
    x = jax.random.normal(jax.random.key(1), (8, 224, 224, 3))
    f32 = registry[name](**kw)
    params = f32.init(jax.random.key(0))

    def grad(model):
        return jax.jit(jax.grad(lambda p: model.apply(p, x, train=True, rng=jax.random.key(2))
                                .astype(jnp.float32).sum()))(params)

    want = (jax.jit(f32.apply)(params, x), grad(f32))
    row = {"model": name, "variant": spec}
    for label, model in (("kernels", registry[name](dtype=jnp.bfloat16, kernels=ks, **kw)),
                         ("xla", registry[name](dtype=jnp.bfloat16, kernels="off", **kw))):
        row[f"logits_err_{label}"] = _rel_err(jax.jit(model.apply)(params, x), want[0])
        g = grad(model)
        num = sum(float(jnp.sum((a.astype(jnp.float32) - b) ** 2))
                  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want[1])))
        den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(want[1]))
        row[f"grad_err_{label}"] = (num / den) ** 0.5
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--shapes", default=None,
                    help="shape set: small/b2/b0 per family (default: each family's first), "
                         "or tiny")
    ap.add_argument("--variants", nargs="+", default=["default"])
    ap.add_argument("--models", nargs="*", default=None,
                    help="check whole models instead of single kernels")
    ap.add_argument("--interpret", action="store_true",
                    help="the kernels in interpret mode (CPU smoke run; times mean nothing)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="kernels")
    args = ap.parse_args(argv)
    for spec in args.variants:  # a bad variant stops the run before any work
        try:
            kernels.parse(spec if spec != "default" else "")
        except (TypeError, ValueError) as e:
            raise SystemExit(f"bad variant {spec!r}: {e}") from None
    timing = (1, 1) if args.interpret else (5, 20)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
    if args.models is not None:
        result["rows"] = [run_model(m, s) for m in args.models for s in args.variants]
    for family in ([] if args.models is not None else args.families):
        sets = SHAPES[family]
        for shape in sets[args.shapes if args.shapes in sets else next(iter(sets))]:
            for spec in args.variants:
                result["rows"] += run_op(family, shape, spec, interpret=args.interpret,
                                         timing=timing)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, args.name + ".json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
