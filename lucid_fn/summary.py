"""Parameter counts and a per-group summary, computed from shapes only (nothing allocated)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lucid_fn.registry import resolve


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct``)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def _path(keypath) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in keypath)


def summary(model, *, batch_size: int = 1, **builder_kwargs) -> str:
    """A table of each top-level parameter group: count and leaf shapes; then the total
    and the output shape for a batch of ``batch_size`` images.

    ``model`` is a registered name (builder keywords go in ``builder_kwargs``) or a Model.
    """
    m = resolve(model, builder_kwargs)
    cfg = m.config
    shapes = jax.eval_shape(m.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch_size, cfg.img_size, cfg.img_size, cfg.in_channels),
                             jnp.float32)
    out = jax.eval_shape(m.apply, shapes, x)

    flavor = f"flavor={cfg.flavor}, " if hasattr(cfg, "flavor") else ""
    lines = [f"{m.name}  ({flavor}img_size={cfg.img_size}, num_classes={cfg.num_classes})",
             f"{'group':<10} {'params':>14}  shapes"]
    for group, sub in shapes.items():
        leaves = jax.tree_util.tree_flatten_with_path(sub)[0]
        lines.append(f"{group:<10} {count_params(sub):>14,}")
        for keypath, leaf in leaves:
            lines.append(f"{'':<10} {'':>14}  {_path(keypath) or group}: {tuple(leaf.shape)}")
    lines.append(f"{'total':<10} {count_params(shapes):>14,}")
    lines.append(f"input  {tuple(x.shape)} float32 (NHWC)")
    lines.append(f"output {tuple(out.shape)} {out.dtype}")
    return "\n".join(lines)
