"""The builders' and apply's contract, over random arguments (hypothesis): valid builder
arguments give a model whose init and apply have the right shapes; an invalid argument is
a ValueError or TypeError that names it, raised by the builder; params that do not fit
the model are an error that names the first leaf that differs, never a shape error inside
XLA or a silent result. Shapes only (jax.eval_shape): nothing is compiled."""

import math

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lucid_fn import registry

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_arguments(draw):
    """(builder name, keyword arguments) of a small model the builder must accept."""
    name = draw(st.sampled_from(["pvt_tiny", "pvt_v2_b0"]))
    v1 = name == "pvt_tiny"
    heads = draw(st.lists(st.integers(1, 2), min_size=4, max_size=4))
    kw = dict(
        img_size=draw(st.sampled_from([32, 64])),
        num_classes=draw(st.integers(0, 5)),
        in_channels=draw(st.integers(1, 4)),
        embed_dims=[h * draw(st.sampled_from([8, 16])) for h in heads],
        num_heads=heads,
        depths=draw(st.lists(st.integers(1, 2), min_size=4, max_size=4)),
        mlp_ratios=draw(st.lists(st.sampled_from([0.5, 1, 2, 4]), min_size=4, max_size=4)),
        qkv_bias=draw(st.booleans()),
        qk_scale=draw(st.none() | st.floats(0.01, 2.0)),
        drop_rate=draw(st.floats(0, 0.5)),
        attn_drop_rate=draw(st.floats(0, 0.5)),
        drop_path_rate=draw(st.floats(0, 0.5)),
        norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        scan_blocks=draw(st.sampled_from([None, True, False])),
        remat=draw(st.booleans()),
        kernels=draw(st.sampled_from([None, "off", "norm=off,attention.block_q=64"])),
    )
    # each stage's token map must hold one reduction window: img/4, /8, /16, /32
    sides = [kw["img_size"] // (4 * 2**i) for i in range(4)]
    kw["sr_ratios"] = [draw(st.sampled_from([r for r in (1, 2, 4, 8) if r <= s]))
                       for s in sides]
    if v1:
        kw["sr_ratios"][3] = 1  # stage 4 carries the class token
        kw["flavor"] = draw(st.sampled_from(["lucid", "paper"]))
    else:
        kw["linear"] = draw(st.booleans())
    return name, kw


@SETTINGS
@given(valid_arguments(), st.integers(1, 3), st.booleans())
def test_valid_arguments_build_a_model_with_the_right_shapes(case, batch, features):
    name, kw = case
    model = registry[name](**kw)
    params = jax.eval_shape(model.init, jax.random.key(0))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    size = kw["img_size"]
    x = jax.ShapeDtypeStruct((batch, size, size, kw["in_channels"]), jnp.float32)
    out = jax.eval_shape(lambda p, v: model.apply(p, v, features=features), params, x)
    if features:
        assert [o.shape for o in out] == [
            (batch, size // (4 * 2**i), size // (4 * 2**i), d)
            for i, d in enumerate(kw["embed_dims"])]
    else:
        width = kw["num_classes"] or kw["embed_dims"][3]
        assert out.shape == (batch, width) and out.dtype == jnp.float32


# One bad value per argument, in the user's terms: the error must name the argument.
BAD = {
    "img_size": [0, -32, 33, 64.0, "64", None],
    "num_classes": [-1, 2.5, "10", None, True],
    "in_channels": [0, 1.5, "3"],
    "embed_dims": [[16, 32, 40], [16, 32, 40, 0], "16,32", [16, 32, 40, 64.5], 64],
    "num_heads": [[1, 2, 5], [0, 1, 1, 1], [3, 3, 3, 3]],
    "depths": [[1, 1, 1], [1, 1, 1, 0], [1, -1, 1, 1]],
    "mlp_ratios": [[4, 4, 4], [0, 4, 4, 4], [-1, 4, 4, 4], [4, 4, 4, "4"], [0.001, 4, 4, 4]],
    "qk_scale": [0, -1.0, math.nan, math.inf, "0.1", True],
    "drop_rate": [-0.1, 1.0, math.nan, "0"],
    "attn_drop_rate": [1.5, math.nan],
    "drop_path_rate": [-1, 2.0, math.inf],
    "norm_eps": [0, -1e-6, math.nan, 1.0],
    "sr_ratios": [[8, 4, 2], [0, 1, 1, 1], [64, 1, 1, 1]],
    "dtype": ["int32", jnp.int8, "half-precision", None],
    "scan_blocks": ["yes", 2],
    "remat": ["no", None],
    "kernels": [5, "attention.block_q=3", "mlp.no_such=1", "conv_mlp.block_x=0", "fast"],
    "not_an_argument": [1],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, values in BAD.items() for v in values],
                         ids=lambda v: repr(v)[:20])
@settings(max_examples=3, deadline=None, derandomize=True)
@given(case=valid_arguments())
def test_an_invalid_argument_is_named_by_the_builder(key, value, case):
    name, kw = case
    kw[key] = value
    if key == "sr_ratios":
        kw.pop("linear", None)  # linear SRA pools to 7x7 and reads no ratio
    with pytest.raises((ValueError, TypeError)) as info:
        registry[name](**kw)
    words = {"kernels": ("kernel", "Settings", "settings")}.get(key, (key,))
    assert any(w in str(info.value) for w in words), (key, value, str(info.value))


# ------------------------------------------------------------------ param trees

_MODELS = {name: registry[name](img_size=32, num_classes=3, embed_dims=[8, 16, 16, 32],
                                num_heads=[1, 1, 2, 2], depths=[1, 2, 1, 1], **kw)
           for name, kw in (("pvt_tiny", {"flavor": "paper"}), ("pvt_v2_b0", {}))}


def _paths(tree):
    return [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _get(tree, path):
    for k in path[:-1]:
        tree = tree[k]
    return tree


@st.composite
def broken_params(draw):
    """(model, params with one thing wrong, the keys of the leaf or subtree that is)."""
    name = draw(st.sampled_from(sorted(_MODELS)))
    model = _MODELS[name]
    params = jax.eval_shape(model.init, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda a: a, params)  # a copy we may edit
    path = draw(st.sampled_from(_paths(params)))
    leaf = _get(params, path)[path[-1]]
    how = draw(st.sampled_from(["drop_leaf", "drop_subtree", "grow", "shrink_depth",
                                "extra", "int", "none", "scalar"]))
    parent, last = _get(params, path), path[-1]
    if how == "drop_leaf":
        del parent[last]
    elif how == "drop_subtree":
        del params[path[0]]
        path = path[:1]
    elif how == "grow":
        shape = list(leaf.shape)
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] += 1
        parent[last] = jax.ShapeDtypeStruct(tuple(shape), leaf.dtype)
    elif how == "shrink_depth":  # one block too few
        if "blocks" not in path or leaf.shape[0] < 2:
            parent[last] = jax.ShapeDtypeStruct(leaf.shape[:-1], leaf.dtype)
        else:
            parent[last] = jax.ShapeDtypeStruct((leaf.shape[0] - 1, *leaf.shape[1:]),
                                                leaf.dtype)
    elif how == "extra":
        parent[last + "_extra"] = leaf
        path = path[:-1] + (last + "_extra",)
    elif how == "int":
        parent[last] = jax.ShapeDtypeStruct(leaf.shape, jnp.int32)
    elif how == "none":
        parent[last] = None
    else:
        parent[last] = 0.5
    return model, params, path


@settings(max_examples=40, deadline=None, derandomize=True)
@given(broken_params())
def test_params_that_do_not_fit_are_named_at_trace_time(case):
    model, params, path = case
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    with pytest.raises((ValueError, TypeError)) as info:
        jax.eval_shape(model.apply, params, x)
    message = str(info.value)
    assert "params[" in message and all(repr(k) in message for k in path[:1]), message
