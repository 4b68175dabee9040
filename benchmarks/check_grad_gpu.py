"""On a GPU: the training gradient with the fused kernels (their backward kernels
included) against XLA ops, both in bf16, and both against float32. Prints, per model, the
gradient's relative error over all parameters (||g - g32|| / ||g32||) and the worst
parameter's, each path's, and which backward kernels the fused step ran.

    PYTHONPATH=. python3 benchmarks/check_grad_gpu.py [MODEL ...] [KEY=N ...]
        (default pvt_v2_b2; KEY=N: a setting of nn.fused.CONV_BLOCKS or CONV_GRAD_BLOCKS
        for the fused path, e.g. slope=2)
"""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from conv_sweep import conv_blocks, parse  # benchmarks/, beside this file
from lucid_fn import registry


def errors(g, ref):
    """(relative error over all leaves, worst leaf's relative error, its path)."""
    leaves = jax.tree_util.tree_leaves_with_path(g)
    ref_leaves = jax.tree.leaves(ref)
    diff = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
            for (_, a), b in zip(leaves, ref_leaves)]
    total = np.sqrt(sum((d ** 2).sum() for d in diff) /
                    sum((np.asarray(b, np.float64) ** 2).sum() for b in ref_leaves))
    per_leaf = [np.linalg.norm(d) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30)
                for d, b in zip(diff, ref_leaves)]
    worst = int(np.argmax(per_leaf))
    return total, per_leaf[worst], jax.tree_util.keystr(leaves[worst][0])


def check(name, x):
    """Print the fused kernels the step ran and both paths' errors against float32."""
    kw = {"flavor": "paper"} if name == "pvt_small" else {}
    w = jax.random.normal(jax.random.key(3), (8, 1000))

    def grad_fn(model):
        def loss(p, v):
            logits = model.apply(p, v, train=True, rng=jax.random.key(2))
            return (logits.astype(jnp.float32) * w).sum()
        return jax.jit(jax.grad(loss))

    model32 = registry[name](**kw)
    params = model32.init(jax.random.key(0))
    ref = grad_fn(model32)(params, x)
    out = {}
    for mode in ("on", "off"):
        os.environ["LUCID_FN_FUSED"] = mode
        f = grad_fn(registry[name](dtype=jnp.bfloat16, **kw))  # fresh apply: retrace
        out[mode] = f(params, x)
        if mode == "on":
            hlo = f.lower(params, x).as_text()
            ran = sorted(set(re.findall(r'name = "(lucid_fn_fused_\w+)"', hlo)))
            print(f"{name} fused kernels in the step: {ran}")
    for mode, g in out.items():
        total, worst, where = errors(g, ref)
        print(f"{name} fused={mode}: |g - g32| / |g32| = {total:.4f}; worst parameter "
              f"{worst:.4f} ({where})")


names = [a for a in sys.argv[1:] if "=" not in a] or ["pvt_v2_b2"]
_, settings = parse(":" + ",".join(a for a in sys.argv[1:] if "=" in a))
if settings:
    print(f"settings: {settings}")
images = jax.random.normal(jax.random.key(1), (8, 224, 224, 3))
with conv_blocks(settings):  # every trace below sees them (XLA's path ignores them)
    for name in names:
        check(name, images)
