"""Every bad input is a ValueError (KeyError for names) that names the argument, what was
given and what is allowed, raised by Python before any XLA work (also under jit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, jitted

from lucid_fn import registry

BAD_BUILDS = [
    (dict(embed_dim=[64, 128, 320, 512]), r"unknown keyword argument 'embed_dim'.*embed_dims"),
    (dict(norm_layer=object), r"'norm_layer'.*norm_eps"),
    (dict(depths=[2, 2, 2]), r"depths must have 4 entries.*got 3"),
    (dict(num_heads=[1, 2, 5]), r"num_heads must have 4 entries"),
    (dict(mlp_ratios=[8, 8, 4, 4, 4]), r"mlp_ratios must have 4 entries.*got 5"),
    (dict(sr_ratios=8), r"sr_ratios must be a list of 4"),
    (dict(embed_dims=[64, 128, 320, 500]), r"embed_dims\[3\]=500 is not divisible by "
                                           r"num_heads\[3\]=8.*heads that divide 500"),
    (dict(img_size=100), r"img_size=100 is not divisible by the total stride 32.*96"),
    (dict(img_size=40_000_000_001), r"img_size=40000000001 .* e.g. 39999999968, 40000000000"),
    (dict(img_size=224, patch_size=8), r"total stride 64"),
    (dict(sr_ratios=[8, 4, 2, 2]), r"sr_ratios\[3\] must be 1"),
    (dict(flavor="official"), r"flavor must be one of 'lucid', 'paper'; got 'official'"),
    (dict(dtype=jnp.int32), r"dtype must be a floating-point dtype"),
    (dict(drop_path_rate=1.5), r"drop_path_rate must be a probability"),
    (dict(num_classes=-1), r"num_classes must be an integer >= 0"),
    (dict(depths=[2, 0, 2, 2]), r"depths must hold positive whole numbers"),
    (dict(scan_blocks="yes"), r"scan_blocks must be one of None, True, False"),
    (dict(qk_scale=float("nan")), r"qk_scale must be a positive finite number"),
    (dict(mlp_ratios=[0.01, 8, 4, 4]), r"mlp_ratios\[0\]=0.01 gives stage 1's MLP .* 0 "
                                       r"hidden units; use mlp_ratios\[0\] >= 0.015625"),
    (dict(kernels="attention.block_q=100"), r"AttentionSettings.block_q must be a power of two"),
]


@pytest.mark.parametrize("kwargs,message", BAD_BUILDS)
def test_builder_rejects_bad_arguments_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        registry["pvt_small"](**kwargs)


@pytest.fixture(scope="module")
def model():
    m = registry["pvt_tiny"](**TINY)
    return m, jitted(m)[0](jax.random.key(0))


BAD_IMAGES = [
    (np.zeros((64, 64, 3), np.float32), r"shape \(64, 64, 3\).*x\[None\]"),
    (np.zeros((2, 3, 64, 64), np.float32), r"looks like NCHW.*x.transpose\(0, 2, 3, 1\)"),
    (np.zeros((2, 64, 64, 1), np.float32), r"in_channels=3.*1 channels.*in_channels=1"),
    (np.zeros((2, 70, 64, 3), np.float32), r"divisible by its total stride 32; got 70x64.*96x64"),
    (np.zeros((2, 64, 64, 3), np.uint8), r"floating-point images; got dtype uint8.*255"),
    (np.zeros((2, 64, 64, 3), np.int32), r"floating-point images; got dtype int32"),
    (np.zeros((0, 64, 64, 3), np.float32), r"empty batch.*\(0, 64, 64, 3\).*at least one"),
]


@pytest.mark.parametrize("x,message", BAD_IMAGES)
@pytest.mark.parametrize("jit", [False, True])
def test_apply_rejects_bad_images_with_the_fix(model, x, message, jit):
    (_, apply), params = model
    fn = jax.jit(apply) if jit else apply
    with pytest.raises(ValueError, match=message):
        fn(params, x)


def _params_of(**changes):
    return jax.eval_shape(registry["pvt_tiny"](**{**TINY, **changes}).init, jax.random.key(0))


MISFIT_PARAMS = [
    # built for another configuration: the first leaf that differs is named
    (lambda: _params_of(embed_dims=[32, 32, 40, 64]),
     r"params\['stage1'\]\['blocks'\]\['attn'\]\['kv'\]\['bias'\] has shape \(1, 64\), "
     r"expected \(1, 32\)"),
    (lambda: _params_of(flavor="paper"), r"unexpected params\['stage1'\]\['blocks'\]\['attn'\]"
                                         r"\['proj'\]\['bias'\] and 7 more"),
    (lambda: _params_of(img_size=128), r"params\['stage1'\]\['pos_embed'\] has shape "
                                       r"\(1, 1024, 16\), expected \(1, 256, 16\)"),
    (lambda: _params_of(depths=[1, 1, 1, 1]), r"params\['stage2'\]\['blocks'\]\['attn'\]"
                                              r"\['kv'\]\['bias'\] has shape \(1, 64\), "
                                              r"expected \(2, 64\)"),
    (lambda: {k: v for k, v in _params_of().items() if k != "norm"},
     r"params\['norm'\] is missing"),
]


@pytest.mark.parametrize("make,message", MISFIT_PARAMS)
def test_apply_names_params_that_do_not_fit_the_model(model, make, message):
    (_, apply), _ = model
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(apply, make(), x)
