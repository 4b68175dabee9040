"""On a GPU: logits with the fused Pallas kernels against XLA ops, both in bf16, and
against float32; prints the max differences relative to the logits' scale, per model
(default: pvt_small (paper), pvt_v2_b2, pvt_v2_b2_li).

    PYTHONPATH=. python3 benchmarks/check_fused_gpu.py [MODEL ...]
"""

import os
import sys

import jax
import jax.numpy as jnp

from lucid_fn import registry

KERNELS = ("lucid_fn_fused_mlp", "lucid_fn_fused_conv_gelu", "lucid_fn_fused_attention",
           "lucid_fn_fused_add_norm")
x = jax.random.normal(jax.random.key(1), (8, 224, 224, 3))
for name in sys.argv[1:] or ["pvt_small", "pvt_v2_b2", "pvt_v2_b2_li"]:
    kw = {"flavor": "paper"} if name == "pvt_small" else {}
    model32 = registry[name](**kw)
    params = model32.init(jax.random.key(0))
    ref = jax.jit(model32.apply)(params, x)
    out = {}
    for mode in ("on", "off"):
        os.environ["LUCID_FN_FUSED"] = mode
        m = registry[name](dtype=jnp.bfloat16, **kw)  # fresh apply: retrace
        f = jax.jit(m.apply)
        out[mode] = f(params, x)
        hlo = f.lower(params, x).as_text()
        used = any(k in hlo for k in KERNELS)
        assert used == (mode == "on"), (name, mode)
    scale = float(jnp.abs(ref).max())
    for mode, y in out.items():
        print(f"{name} fused={mode}: max |bf16 - f32| / max|f32| = "
              f"{float(jnp.abs(y - ref).max()) / scale:.4f}")
    print(f"{name} max |fused - xla| (both bf16) / max|f32| = "
          f"{float(jnp.abs(out['on'] - out['off']).max()) / scale:.4f}")
