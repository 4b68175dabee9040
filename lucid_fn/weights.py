"""Checkpoints of other layouts -> our parameter pytrees.

``from_state_dict(state_dict, name, **builder_kwargs)`` takes a mapping of key -> array
(NumPy arrays, torch tensors, anything ``np.asarray`` takes), detects its key layout, and
returns params for ``registry[name](**builder_kwargs)``. Layouts:

- ``lucid``: the seed system's PVT v1 (``pos_emb1``, ``patch_emb1.proj.weight``,
  ``block1.0.attn.q.weight``, ...);
- ``timm``: timm's ``pvt_v2_*`` (``patch_embed.proj.weight``, ``stages.1.downsample...``,
  ``stages.0.blocks.0.attn.q.weight``, ``stages.0.norm.weight``, ...).

The key of every parameter is derived from its path in our pytree, so the mapping cannot
drift from the model: ``stage2.blocks.attn.kv.kernel`` (stacked over blocks) is Lucid's
``block2.{j}.attn.kv.weight`` for every block ``j``, transposed from (out, in) to (in, out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn.registry import registry

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _unwrap(state_dict: Mapping) -> Mapping:
    """Training checkpoints often nest the weights under 'model' or 'state_dict'."""
    for key in ("model", "state_dict"):
        inner = state_dict.get(key) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping) and len(state_dict) <= 8:
            return inner
    return state_dict


# ------------------------------------------------------------------ the Lucid layout


def _lucid_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """Lucid's key for one of our leaves, with '{j}' for the block index; and whether the
    leaf is stacked over blocks."""
    head, *rest = path
    if head.startswith("stage"):
        i = head[len("stage"):]
        part, *inner = rest
        if part == "pos_embed":
            return f"pos_emb{i}", False
        if part == "cls_token":
            return "cls_token", False
        inner = [*inner[:-1], _LEAF_NAMES[inner[-1]]]
        if part == "patch_embed":
            return ".".join([f"patch_emb{i}", *inner]), False
        if part == "blocks":
            return ".".join([f"block{i}", "{j}", *inner]), True
        raise AssertionError(path)
    return f"{head}.{_LEAF_NAMES[path[-1]]}", False


def _timm_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """timm's pvt_v2 key for one of our leaves (see ``_lucid_key``)."""
    head, *rest = path
    leaf = _LEAF_NAMES[path[-1]]
    if not head.startswith("stage"):
        return f"{head}.{leaf}", False
    i = int(head[len("stage"):]) - 1
    part, *inner = rest
    inner = [*inner[:-1], leaf]
    if part == "patch_embed":
        prefix = "patch_embed" if i == 0 else f"stages.{i}.downsample"
        return ".".join([prefix, *inner]), False
    if part == "blocks":
        return ".".join([f"stages.{i}.blocks", "{j}", *inner]), True
    return ".".join([f"stages.{i}", part, *inner]), False


def _to_ours(array: np.ndarray, leaf_ndim: int, leaf: str) -> np.ndarray:
    """PyTorch (out, in) Linear and (out, in, kh, kw) conv weights -> (in, out) and HWIO."""
    if leaf == "kernel" and leaf_ndim == 2:
        return array.T
    if leaf == "kernel" and leaf_ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _theirs_shape(shape: tuple, leaf: str) -> tuple:
    if leaf == "kernel" and len(shape) == 2:
        return shape[::-1]
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def _expected(shapes, key_fn) -> dict:
    """key -> (our path, block index or None, their shape) for every tensor we need."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in keypath)
        template, stacked = key_fn(path)
        if stacked:
            for j in range(leaf.shape[0]):
                out[template.format(j=j)] = (path, j, _theirs_shape(leaf.shape[1:], path[-1]))
        else:
            out[template] = (path, None, _theirs_shape(leaf.shape, path[-1]))
    return out


def infer_lucid_kwargs(sd: Mapping) -> dict:
    """Builder arguments a Lucid-layout PVT v1 state dict was made with (what can be read off
    its shapes), for error messages that say which build would fit."""
    kw = {}
    try:
        kw["embed_dims"] = [int(sd[f"patch_emb{i}.proj.weight"].shape[0]) for i in range(1, 5)]
        kw["patch_size"] = int(sd["patch_emb1.proj.weight"].shape[-1])
        kw["in_channels"] = int(sd["patch_emb1.proj.weight"].shape[1])
        kw["depths"] = _block_depths(sd, lambda i: f"block{i + 1}")
        kw["img_size"] = int(math.isqrt(sd["pos_emb1"].shape[1])) * kw["patch_size"]
        kw["num_classes"] = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
        kw["flavor"] = "paper" if any(".attn.proj." in k for k in sd) else "lucid"
        kw["qkv_bias"] = "block1.0.attn.q.bias" in sd
    except (KeyError, IndexError, AttributeError):
        pass
    return kw


def _block_depths(sd: Mapping, prefix: str) -> list[int]:
    """Blocks per stage, from keys like f'{prefix(i)}.{j}.…'."""
    depths = []
    for i in range(4):
        head = prefix(i) + "."
        depths.append(1 + max((int(k[len(head):].split(".")[0]) for k in sd
                               if k.startswith(head)), default=-1))
    return depths


def infer_timm_kwargs(sd: Mapping) -> dict:
    """Builder arguments a timm pvt_v2 state dict was made with, as far as shapes tell."""
    kw = {}
    try:
        kw["embed_dims"] = [int(sd["patch_embed.proj.weight"].shape[0])] + [
            int(sd[f"stages.{i}.downsample.proj.weight"].shape[0]) for i in range(1, 4)]
        kw["in_channels"] = int(sd["patch_embed.proj.weight"].shape[1])
        kw["depths"] = _block_depths(sd, lambda i: f"stages.{i}.blocks")
        kw["num_classes"] = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
        kw["linear"] = "stages.3.blocks.0.attn.sr.weight" in sd
    except (KeyError, IndexError, AttributeError):
        pass
    return kw


def _mismatch_message(name, cfg, missing, unexpected, wrong_shape, inferred: dict) -> str:
    def listing(title, items):
        items = sorted(items)
        more = f" ... and {len(items) - 12} more" if len(items) > 12 else ""
        return f"\n  {title} ({len(items)}): {', '.join(items[:12])}{more}" if items else ""

    fits = []
    for key, value in inferred.items():
        ours = getattr(cfg, key, None)
        if (list(ours) if isinstance(ours, tuple) else ours) != value:
            fits.append(f"{key}={value!r}")
    hint = ""
    if fits:
        hint = f"\nThis checkpoint fits {name}({', '.join(fits)})."
        if "flavor='paper'" in fits:
            hint += " (It has attention output projections: build with flavor='paper'.)"
        if "flavor='lucid'" in fits:
            hint += " (It has no attention output projections: build with flavor='lucid'.)"
    shapes = [f"{k}: checkpoint {theirs}, model {ours}" for k, theirs, ours in wrong_shape]
    return (
        f"state dict does not match {name}"
        + (f" (flavor={cfg.flavor!r})" if hasattr(cfg, "flavor") else "") + ":"
        + listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("shape mismatches", shapes)
        + hint
    )


# layout -> (key of one of our leaves, what builder arguments a state dict implies, family)
_LAYOUTS = {
    "lucid": (_lucid_key, infer_lucid_kwargs, "PVTConfig"),
    "timm": (_timm_key, infer_timm_kwargs, "PVTv2Config"),
}


def detect_layout(sd: Mapping) -> str:
    if "pos_emb1" in sd or "patch_emb1.proj.weight" in sd:
        return "lucid"
    if "patch_embed.proj.weight" in sd and any(k.startswith("stages.") for k in sd):
        return "timm"
    sample = ", ".join(list(sd)[:5])
    raise ValueError(
        f"unrecognised state-dict layout (first keys: {sample}). Supported: Lucid's PVT v1 "
        f"layout (pos_emb1, patch_emb1.proj.weight, block1.0.attn.q.weight, ...) and timm's "
        f"pvt_v2 layout (patch_embed.proj.weight, stages.0.blocks.0.attn.q.weight, ...)."
    )


def from_state_dict(state_dict: Mapping, name: str, **builder_kwargs) -> dict:
    """Params for ``registry[name](**builder_kwargs)`` from a state dict of another layout.

    Every tensor is checked: missing keys, unexpected keys and shape mismatches are reported
    together in one ``ValueError`` that also says which builder arguments would fit.
    """
    sd = {k: _to_numpy(v) for k, v in _unwrap(state_dict).items()}
    layout = detect_layout(sd)
    key_fn, infer, family = _LAYOUTS[layout]
    model = registry[name](**builder_kwargs)
    if type(model.config).__name__ != family:
        raise ValueError(
            f"this state dict is in the {layout} layout, which holds "
            f"{'PVT v1' if layout == 'lucid' else 'PVT v2'} weights; {name} is not that "
            f"family. Build a {'pvt_*' if layout == 'lucid' else 'pvt_v2_*'} model instead."
        )
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    expected = _expected(shapes, key_fn)

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong_shape = [
        (k, tuple(sd[k].shape), theirs)
        for k, (_, _, theirs) in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(theirs)
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            _mismatch_message(name, model.config, missing, unexpected, wrong_shape, infer(sd))
        )

    by_path: dict[tuple, dict] = {}
    for key, (path, j, _) in expected.items():
        by_path.setdefault(path, {})[j] = _to_ours(sd[key], len(sd[key].shape), path[-1])

    def leaf(keypath, _):
        path = tuple(k.key for k in keypath)
        parts = by_path[path]
        array = np.stack([parts[j] for j in range(len(parts))]) if None not in parts else parts[None]
        return jnp.asarray(array, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)
