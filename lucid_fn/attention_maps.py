"""What spatial-reduction attention looks at: attention probabilities of one block per stage.

    from lucid_fn import registry
    from lucid_fn.attention_maps import attention_maps, key_map

    model = registry["pvt_tiny"]()
    params = model.init(jax.random.key(0))
    stages = attention_maps(model, params, images, block=-1)   # one StageAttention per stage
    stages[0].probs                  # (B, heads, N_q, N_kv) float32, rows sum to 1
    key_map(stages[0], (112, 80), images.shape[1:3])   # (B, heads, kv_h, kv_w) for one query

Works for every PVT v1 model (both flavors; stage 4 carries the class token as query and
key 0) and every PVT v2 model (``linear=True`` too, whose keys come from a 7x7 pool).

The probabilities come from the model's own ``apply(..., attention=blocks)``: each stage
hands the stream entering the chosen block to the family's ``attention_probs``, built
from the same ``queries_keys_values`` and ``attention_probs`` that ``nn.sra`` is made of.
``tests/test_attention_maps.py`` rebuilds every stage from these probabilities and checks
it against ``apply(..., features=True)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from lucid_fn.models import pvt, pvt_v2
from lucid_fn.nn import attention as sra_lib
from lucid_fn.registry import Model

__all__ = ["StageAttention", "attention_maps", "key_map", "resolve_blocks"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["probs"],
                   meta_fields=["block", "q_hw", "kv_hw", "cls_token"])
@dataclasses.dataclass(frozen=True)
class StageAttention:
    """One stage's attention probabilities and how to read them as maps.

    probs:     (B, heads, N_q, N_kv) float32; ``probs[b, h, n]`` is query token ``n``'s
               distribution over the keys (sums to 1 over the last axis).
    block:     which block of the stage (0-based, resolved from a negative index).
    q_hw:      the query token map (h, w); N_q = h * w (+ 1 with a class token).
    kv_hw:     the (spatially reduced) key map (h, w); N_kv = h * w (+ 1 with a class token).
    cls_token: token 0 of queries and keys is the class token (PVT v1's stage 4).
    """

    probs: jax.Array
    block: int
    q_hw: tuple
    kv_hw: tuple
    cls_token: bool


# ------------------------------------------------------------------------ public API


def attention_maps(model: Model, params, images, *, block=-1) -> list[StageAttention]:
    """Attention probabilities of block ``block`` of each of the 4 stages, at inference.

    ``model`` is what a registry builder returns (``registry["pvt_tiny"](...)``), ``params``
    its parameters, ``images`` a batch of NHWC float images as ``model.apply`` takes them.
    ``block`` is one index for every stage (Python-style, ``-1``: each stage's last block)
    or a sequence of 4 indices, one per stage. Returns 4 ``StageAttention``, whose
    ``probs`` are float32 whatever the compute dtype (the model takes the same softmax in
    float32, then casts). Compiled once per model and block; composes with ``jax.jit``.
    """
    _family(model)  # the clear error for a model we do not know, before any tracing
    blocks = resolve_blocks(model, block)
    return _compiled(model, blocks)(params, images)


def resolve_blocks(model: Model, block) -> tuple[int, ...]:
    """``block`` (an int, or one int per stage) as 4 non-negative block indices; an index
    out of range for a stage is a ValueError naming the stage's valid range."""
    depths = model.config.depths
    per_stage = _per_stage_blocks(block, len(depths))
    out = []
    for i, (j, depth) in enumerate(zip(per_stage, depths)):
        if not -depth <= j < depth:
            raise ValueError(
                f"block={block!r}: index {j} is out of range for stage {i + 1} of "
                f"{model.name}, which has {depth} block{'s' * (depth > 1)}; valid indices "
                f"there are {-depth}..{depth - 1} (depths={list(depths)}). Pass one index "
                f"per stage, e.g. block={tuple(min(d - 1, max(j, 0)) for d in depths)}"
            )
        out.append(j % depth)
    return tuple(out)


def key_map(stage: StageAttention, query_yx, image_hw) -> jax.Array:
    """The attention of one query over the key map: (B, heads, kv_h, kv_w).

    ``query_yx`` is a pixel (row, column) of the input image, whose size is ``image_hw``;
    the query is the token whose patch contains it. With a class token, its key column is
    left out of the map (so the map sums to 1 minus the class token's weight, which is
    ``stage.probs[:, :, n, 0]``).
    """
    (y, x), (img_h, img_w) = query_yx, image_hw
    if not (0 <= y < img_h and 0 <= x < img_w):
        raise ValueError(f"query_yx={tuple(query_yx)} lies outside the {img_h}x{img_w} image; "
                         f"pass a pixel (row, column) with 0 <= row < {img_h}, "
                         f"0 <= column < {img_w}")
    q_h, q_w = stage.q_hw
    offset = int(stage.cls_token)
    n = offset + (int(y) * q_h // img_h) * q_w + int(x) * q_w // img_w
    row = stage.probs[:, :, n, offset:]
    return row.reshape(*row.shape[:2], *stage.kv_hw)


# --------------------------------------------------------------------------- per family


def _family(model) -> str:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, pvt.PVTConfig):
        return "v1"
    if isinstance(cfg, pvt_v2.PVTv2Config):
        return "v2"
    raise TypeError(
        f"attention_maps takes a PVT v1 or v2 model as registry builders return it, e.g. "
        f"registry['pvt_tiny']() or registry['pvt_v2_b0'](); got {model!r}"
    )


def _per_stage_blocks(block, stages: int) -> tuple[int, ...]:
    if isinstance(block, bool):
        raise ValueError(f"block must be an int or {stages} ints; got {block!r}")
    if isinstance(block, int):
        return (block,) * stages
    try:
        values = tuple(block)
    except TypeError:
        values = ()
    if len(values) != stages or not all(isinstance(v, int) and not isinstance(v, bool)
                                        for v in values):
        raise ValueError(f"block must be an int (the same block in every stage) or "
                         f"{stages} ints, one per stage; got {block!r}")
    return values


def _kv_hw(p_attn, hw, linear: bool) -> tuple:
    """The key map reduce_tokens makes from an ``hw`` token map."""
    if "sr" not in p_attn:
        return tuple(hw)
    if linear:
        return (sra_lib.LINEAR_POOL, sra_lib.LINEAR_POOL)
    r_h, r_w = p_attn["sr"]["kernel"].shape[:2]
    return (hw[0] // r_h, hw[1] // r_w)  # a VALID conv drops partial windows


@functools.lru_cache(maxsize=32)
def _compiled(model: Model, blocks: tuple):
    """One jitted function per (model, blocks): eager op-by-op dispatch would take seconds."""
    cfg = model.config
    family = _family(model)
    linear = getattr(cfg, "linear", False)
    first_stride = cfg.patch_size if family == "v1" else pvt_v2.STRIDES[0]

    @jax.jit
    def run(params, images):
        _, probs = model.apply(params, images, features=True, attention=blocks)
        out = []
        for i, (j, p) in enumerate(zip(blocks, probs)):
            stride = first_stride * 2**i
            hw = (images.shape[1] // stride, images.shape[2] // stride)
            attn = jax.tree_util.tree_map(lambda a, j=j: a[j],
                                          params[f"stage{i + 1}"]["blocks"]["attn"])
            out.append(StageAttention(p, block=j, q_hw=hw, kv_hw=_kv_hw(attn, hw, linear),
                                      cls_token=family == "v1" and i == 3))
        return out

    return run
