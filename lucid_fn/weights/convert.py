"""Checkpoints in, checkpoints out: the one place that knows other key layouts.

``from_state_dict(state_dict, name, **builder_kwargs)`` takes a mapping of key -> array
(NumPy arrays, torch tensors, anything ``np.asarray`` takes), detects its layout, checks
every tensor, and returns params for ``registry[name](**builder_kwargs)``.
``to_state_dict(params, name, layout=...)`` writes them back, so that weights trained here
run in PyTorch. Layouts (see ``LAYOUTS``):

=============  ======  ==============================================================
layout         family  keys look like
=============  ======  ==============================================================
``lucid``      v1      ``pos_emb1``, ``patch_emb1.proj.weight``, ``block1.0.attn.kv.weight``
``official``   v1      ``pos_embed1``, ``patch_embed1.proj.weight``, ``block1.0.attn.kv...``
``hf``         v1      ``pvt.encoder.block.0.0.attention.self.key.weight`` (k, v apart)
``timm``       v2      ``patch_embed.proj.weight``, ``stages.0.blocks.0.attn.kv.weight``
``hf``         v2      ``pvt_v2.encoder.layers.0.blocks.0.attention.key.weight`` (k, v apart)
``official``   v2      ``patch_embed1.proj.weight``, ``block1.0.mlp.dwconv.dwconv.weight``
=============  ======  ==============================================================

(Lucid's own PVT v2 uses the official v2 names.) Every key is derived from a parameter's
path in our pytree, so the mapping cannot drift from the model: ``stage2.blocks.attn.kv``
(stacked over blocks) is ``block2.{j}.attn.kv`` for every block ``j``, transposed from
PyTorch's (out, in) to (in, out), and conv kernels from OIHW to HWIO.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn import nn
from lucid_fn.registry import registry

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


# ------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one checkpoint family names our parameters.

    Templates take ``{s}`` (stage, 1-based), ``{i}`` (stage, 0-based) and ``{j}`` (block).
    ``renames`` maps our dotted sub-path inside a stage (``blocks.attn.q``) to theirs; a
    tuple means their tensors are concatenated along PyTorch's output axis to make ours
    (HF keeps key and value apart where everyone else fuses them into ``kv``).
    """

    name: str
    family: str  # "v1" | "v2"
    marker: Callable[[Mapping], bool]
    patch: Callable[[int], str]
    blocks: str
    pos: str = ""
    cls: str = ""
    stage_norm: str = ""
    norm: str = "norm"
    head: str = "head"
    renames: Mapping = dataclasses.field(default_factory=dict)

    def key(self, path: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
        """Their key(s) for one of our leaves, with '{j}' for the block index; and whether
        the leaf is stacked over blocks."""
        head, *rest = path
        leaf = _LEAF_NAMES.get(path[-1])
        if head == "norm":
            return (f"{self.norm}.{leaf}",), False
        if head == "head":
            return (f"{self.head}.{leaf}",), False
        i = int(head[len("stage"):]) - 1
        part = rest[0]
        fmt = dict(s=i + 1, i=i, j="{j}")
        if part == "pos_embed":
            return (self.pos.format(**fmt),), False
        if part == "cls_token":
            return (self.cls.format(**fmt),), False
        inner = ".".join(rest[:-1])
        theirs = self.renames.get(inner, inner.split(".", 1)[1] if "." in inner else "")
        prefix = {"patch_embed": self.patch(i), "blocks": self.blocks,
                  "norm": self.stage_norm}[part].format(**fmt)
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        return tuple(".".join(p for p in (prefix, n, leaf) if p) for n in names), part == "blocks"


def _numbered(prefix: str) -> Callable[[int], str]:
    return lambda i: f"{prefix}{i + 1}"


_HF_V1_RENAMES = {
    "patch_embed.proj": "projection", "patch_embed.norm": "layer_norm",
    "blocks.norm1": "layer_norm_1", "blocks.norm2": "layer_norm_2",
    "blocks.attn.q": "attention.self.query",
    "blocks.attn.kv": ("attention.self.key", "attention.self.value"),
    "blocks.attn.sr": "attention.self.sequence_reduction",
    "blocks.attn.norm": "attention.self.layer_norm",
    "blocks.attn.proj": "attention.output.dense",
    "blocks.mlp.fc1": "mlp.dense1", "blocks.mlp.fc2": "mlp.dense2",
}

_HF_V2_RENAMES = {
    "patch_embed.proj": "proj", "patch_embed.norm": "layer_norm",
    "blocks.norm1": "layer_norm_1", "blocks.norm2": "layer_norm_2",
    "blocks.attn.q": "attention.query",
    "blocks.attn.kv": ("attention.key", "attention.value"),
    "blocks.attn.sr": "attention.spatial_reduction",
    "blocks.attn.norm": "attention.layer_norm",
    "blocks.attn.proj": "attention.proj",
    "blocks.mlp.fc1": "mlp.dense1", "blocks.mlp.dwconv": "mlp.dwconv.dwconv",
    "blocks.mlp.fc2": "mlp.dense2",
}

LAYOUTS = {
    ("lucid", "v1"): Layout(
        "lucid", "v1", lambda sd: "pos_emb1" in sd, _numbered("patch_emb"), "block{s}.{j}",
        pos="pos_emb{s}", cls="cls_token"),
    ("official", "v1"): Layout(
        "official", "v1", lambda sd: "pos_embed1" in sd, _numbered("patch_embed"),
        "block{s}.{j}", pos="pos_embed{s}", cls="cls_token"),
    ("hf", "v1"): Layout(
        "hf", "v1", lambda sd: "pvt.encoder.patch_embeddings.0.projection.weight" in sd,
        lambda i: f"pvt.encoder.patch_embeddings.{i}", "pvt.encoder.block.{i}.{j}",
        pos="pvt.encoder.patch_embeddings.{i}.position_embeddings",
        cls="pvt.encoder.patch_embeddings.3.cls_token", norm="pvt.encoder.layer_norm",
        head="classifier", renames=_HF_V1_RENAMES),
    ("timm", "v2"): Layout(
        "timm", "v2", lambda sd: "patch_embed.proj.weight" in sd,
        lambda i: "patch_embed" if i == 0 else f"stages.{i}.downsample", "stages.{i}.blocks.{j}",
        stage_norm="stages.{i}.norm"),
    ("hf", "v2"): Layout(
        "hf", "v2", lambda sd: "pvt_v2.encoder.layers.0.patch_embedding.proj.weight" in sd,
        lambda i: f"pvt_v2.encoder.layers.{i}.patch_embedding",
        "pvt_v2.encoder.layers.{i}.blocks.{j}", stage_norm="pvt_v2.encoder.layers.{i}.layer_norm",
        head="classifier", renames=_HF_V2_RENAMES),
    ("official", "v2"): Layout(
        "official", "v2", lambda sd: "patch_embed1.proj.weight" in sd and "pos_embed1" not in sd,
        _numbered("patch_embed"), "block{s}.{j}", stage_norm="norm{s}",
        renames={"blocks.mlp.dwconv": "mlp.dwconv.dwconv"}),
}


def _family(cfg) -> str:
    return "v1" if hasattr(cfg, "flavor") else "v2"


def detect_layout(sd: Mapping) -> Layout:
    for layout in LAYOUTS.values():
        if layout.marker(sd):
            return layout
    sample = ", ".join(list(sd)[:5])
    known = "; ".join(f"{lay.name} PVT {lay.family} "
                      f"({lay.key(('stage1', 'patch_embed', 'proj', 'kernel'))[0][0]}, ...)"
                      for lay in LAYOUTS.values())
    raise ValueError(f"unrecognised state-dict layout (first keys: {sample}). "
                     f"Supported: {known}.")


# ---------------------------------------------------------------------- conversion


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _arrays(state_dict) -> dict:
    """The state dict's values as numpy arrays; a value that is not a numeric array
    (None, a string, a nested dict) is an error naming its key."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"a state dict is a mapping of parameter names to arrays; got "
                         f"{type(state_dict).__name__}")
    out, bad = {}, []
    for key, value in state_dict.items():
        try:
            array = None if value is None else _to_numpy(value)
        except (TypeError, ValueError):
            array = None
        if array is None or not (np.issubdtype(array.dtype, np.number)
                                 or array.dtype == np.bool_):
            bad.append(f"{key} ({type(value).__name__})")
        else:
            out[key] = array
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"state dict values must be numeric arrays; {len(bad)} are not: "
                         f"{', '.join(bad[:5])}{more}. The checkpoint is incomplete or not "
                         f"a state dict")
    return out


def unwrap(state_dict: Mapping) -> Mapping:
    """Training checkpoints often nest the weights under 'model' or 'state_dict'."""
    for key in ("model", "state_dict"):
        inner = state_dict.get(key) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping) and len(state_dict) <= 8:
            return inner
    return state_dict


def _to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Ours -> PyTorch: Linear (in, out) -> (out, in); conv HWIO -> OIHW."""
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def _from_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _torch_shape(shape: tuple, leaf: str) -> tuple:
    return _to_torch_layout(np.empty(shape, np.uint8), leaf).shape


def _expected(shapes, layout: Layout) -> dict:
    """their key -> (our path, block index or None, part index, n parts, their shape)."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in keypath)
        templates, stacked = layout.key(path)
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
        theirs = list(_torch_shape(shape, path[-1]))
        theirs[0] //= len(templates)
        for j in range(leaf.shape[0]) if stacked else [None]:
            for part, template in enumerate(templates):
                key = template.format(j=j) if stacked else template
                out[key] = (path, j, part, len(templates), tuple(theirs))
    return out


def _resize_checkpoint_pos_embeds(sd: dict, expected: dict, layout: Layout) -> None:
    """A v1 checkpoint trained at another img_size: resize its position embeddings."""
    for key, (path, _, _, _, shape) in expected.items():
        if path[-1] != "pos_embed" or key not in sd or tuple(sd[key].shape) == shape:
            continue
        has_cls = path[0] == "stage4"
        side = math.isqrt(shape[1] - has_cls)
        theirs = sd[key].shape
        # Only a (1, [1 +] S*S, C) grid of the same width is resized; any other shape is a
        # mismatch to report, never reshaped into one that fits.
        if len(theirs) == 3 and theirs[0] == 1 and theirs[-1] == shape[-1] and \
                theirs[1] > has_cls and math.isqrt(theirs[1] - has_cls) ** 2 == theirs[1] - has_cls:
            sd[key] = np.asarray(nn.resize_pos_embed(sd[key], (side, side), has_cls))


# ------------------------------------------------------------------- what would fit


def infer_kwargs(sd: Mapping, layout: Layout) -> dict:
    """Builder arguments a state dict was made with, as far as its shapes tell: for errors
    that say which build would fit."""

    def key(*path, j=0):
        templates, stacked = layout.key(path)
        return templates[0].format(j=j) if stacked else templates[0]

    kw = {}
    try:
        patch = [sd[key(f"stage{i}", "patch_embed", "proj", "kernel")] for i in range(1, 5)]
        kw["embed_dims"] = [int(p.shape[0]) for p in patch]
        kw["in_channels"] = int(patch[0].shape[1])
        kw["depths"] = [
            next(j for j in range(10_000) if key(f"stage{i}", "blocks", "norm1", "scale", j=j)
                 not in sd) for i in range(1, 5)]
        head = key("head", "kernel")
        kw["num_classes"] = int(sd[head].shape[0]) if head in sd else 0
        if layout.family == "v1":
            kw["patch_size"] = int(patch[0].shape[-1])
            kw["img_size"] = math.isqrt(sd[key("stage1", "pos_embed")].shape[1]) * kw["patch_size"]
            kw["flavor"] = ("paper" if key("stage1", "blocks", "attn", "proj", "kernel") in sd
                            else "lucid")
        else:
            kw["linear"] = key("stage4", "blocks", "attn", "sr", "kernel") in sd
    except (KeyError, IndexError, AttributeError, ValueError):
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
        if any(f.startswith("num_classes=") for f in fits):
            hint += " To fine-tune on other classes, pass head='reset'."
    shapes = [f"{k}: checkpoint {theirs}, model {ours}" for k, theirs, ours in wrong_shape]
    flavor = f" (flavor={cfg.flavor!r})" if hasattr(cfg, "flavor") else ""
    return (f"state dict does not match {name}{flavor}:" + listing("missing keys", missing)
            + listing("unexpected keys", unexpected) + listing("shape mismatches", shapes)
            + hint)


# ------------------------------------------------------------------------- import


def from_state_dict(state_dict: Mapping, name: str, *, head: str = "keep", rng=None,
                    **builder_kwargs) -> dict:
    """Params for ``registry[name](**builder_kwargs)`` from a state dict of any layout above.

    Missing keys, unexpected keys and shape mismatches are reported together in one
    ``ValueError`` that also says which builder arguments would fit. ``head="reset"``
    ignores the checkpoint's classifier and initialises a new one for ``num_classes``
    (from ``rng``, default key 0), for fine-tuning. A PVT v1 checkpoint made for another
    img_size has its position embeddings resized bilinearly (class-token row kept).
    """
    if head not in ("keep", "reset"):
        raise ValueError(f"head must be 'keep' or 'reset'; got {head!r}")
    sd = _arrays(unwrap(state_dict))
    model = registry[name](**builder_kwargs)
    family = _family(model.config)
    layout = detect_layout(sd)
    if layout.family != family:
        raise ValueError(
            f"this state dict is in the {layout.name} layout of PVT {layout.family}; "
            f"{name} is a PVT {family} model. Build a "
            f"{'pvt_*' if layout.family == 'v1' else 'pvt_v2_*'} model instead."
        )
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    expected = _expected(shapes, layout)
    if head == "reset":
        head_keys = {k for k, v in expected.items() if v[0][0] == "head"}
        checkpoint_head = {layout.key(("head", leaf))[0][0] for leaf in ("kernel", "bias")}
        sd = {k: v for k, v in sd.items() if k not in checkpoint_head}
        expected = {k: v for k, v in expected.items() if k not in head_keys}
    if family == "v1":
        _resize_checkpoint_pos_embeds(sd, expected, layout)

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong_shape = [(k, tuple(sd[k].shape), v[4]) for k, v in expected.items()
                   if k in sd and tuple(sd[k].shape) != v[4]]
    if missing or unexpected or wrong_shape:
        raise ValueError(_mismatch_message(name, model.config, missing, unexpected,
                                           wrong_shape, infer_kwargs(sd, layout)))
    non_finite = [k for k in expected if not np.isfinite(sd[k]).all()]
    if non_finite:
        raise ValueError(f"state dict tensor {non_finite[0]} holds NaN or infinity "
                         f"({len(non_finite)} such tensors): the checkpoint is damaged, or "
                         f"saved from a run that diverged")

    parts: dict[tuple, dict] = {}
    for key, (path, j, part, _, _) in expected.items():
        parts.setdefault(path, {}).setdefault(j, {})[part] = sd[key]

    def leaf(keypath, _):
        path = tuple(k.key for k in keypath)
        per_block = parts[path]

        def one(j):
            pieces = per_block[j]
            whole = np.concatenate([pieces[p] for p in range(len(pieces))], axis=0)
            return _from_torch_layout(whole, path[-1])

        array = one(None) if None in per_block else np.stack([one(j) for j in
                                                              range(len(per_block))])
        return jnp.asarray(array, jnp.float32)

    if head == "reset":
        fresh = model.init(jax.random.key(0) if rng is None else rng)
        shapes = {k: v for k, v in shapes.items() if k != "head"}
        params = jax.tree_util.tree_map_with_path(leaf, shapes)
        if "head" in fresh:
            params["head"] = fresh["head"]
        return params
    return jax.tree_util.tree_map_with_path(leaf, shapes)


# ------------------------------------------------------------------------- export


def to_state_dict(params, name: str, *, layout: str = "official", **builder_kwargs) -> dict:
    """Our params -> a state dict of numpy arrays in PyTorch's layout and ``layout``'s key
    names (v1: 'lucid', 'official', 'hf'; v2: 'timm', 'official'). ``params`` must be the
    model's (checked: the error names the first leaf that differs)."""
    model = registry[name](**builder_kwargs)
    _check_params(params, model, name)
    family = _family(model.config)
    if (layout, family) not in LAYOUTS:
        names = sorted(n for n, f in LAYOUTS if f == family)
        raise ValueError(f"layout must be one of {names} for PVT {family} model {name}; "
                         f"got {layout!r}")
    lay = LAYOUTS[(layout, family)]
    out = {}
    for keypath, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in keypath)
        templates, stacked = lay.key(path)
        value = np.asarray(value)
        for j in range(value.shape[0]) if stacked else [None]:
            torch_value = _to_torch_layout(value[j] if stacked else value, path[-1])
            for template, piece in zip(templates,
                                       np.split(torch_value, len(templates), axis=0)):
                out[template.format(j=j) if stacked else template] = np.ascontiguousarray(piece)
    return out


def _check_params(params, model, name: str) -> None:
    """``params`` against the parameter shapes of ``model`` (a ValueError or TypeError
    naming the first leaf that differs)."""
    from lucid_fn.models.common import check_params

    check_params(params, jax.eval_shape(model.init, jax.random.key(0)), name)
