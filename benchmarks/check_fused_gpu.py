"""On a GPU: pvt_small (paper) logits with the fused MLP kernel against XLA ops, both in
bf16, and against float32; prints the max differences relative to the logits' scale.

    PYTHONPATH=. python3 benchmarks/check_fused_gpu.py
"""

import os

import jax
import jax.numpy as jnp

from lucid_fn import registry

x = jax.random.normal(jax.random.key(1), (8, 224, 224, 3))
model32 = registry["pvt_small"](flavor="paper")
params = model32.init(jax.random.key(0))
ref = jax.jit(model32.apply)(params, x)
out = {}
for mode in ("on", "off"):
    os.environ["LUCID_FN_FUSED_MLP"] = mode
    m = registry["pvt_small"](flavor="paper", dtype=jnp.bfloat16)  # fresh apply: retrace
    f = jax.jit(m.apply)
    out[mode] = f(params, x)
    assert ("lucid_fn_fused_mlp" in f.lower(params, x).as_text()) == (mode == "on")
scale = float(jnp.abs(ref).max())
for mode, y in out.items():
    print(f"fused={mode}: max |bf16 - f32| / max|f32| = "
          f"{float(jnp.abs(y - ref).max()) / scale:.4f}")
print(f"max |fused - xla| (both bf16) / max|f32| = "
      f"{float(jnp.abs(out['on'] - out['off']).max()) / scale:.4f}")
