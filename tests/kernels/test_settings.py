"""lucid_fn.kernels.settings: what the kernels may do is a value chosen when a model is
built, checked as it is made, and part of the model's config."""

import jax
import jax.numpy as jnp
import pytest
from helpers import abstract_gpu, model_cuda_hlo

from lucid_fn import kernels, registry
from lucid_fn.kernels import (AttentionSettings, ConvMlpSettings, KernelSettings, MlpSettings,
                              NormSettings)

ARCH = dict(img_size=64, num_classes=10, depths=(1, 1, 1, 1), dtype=jnp.bfloat16)


def test_settings_are_frozen_checked_values():
    s = KernelSettings()
    with pytest.raises(AttributeError):
        s.interpret = True  # frozen: a setting cannot change under a model
    assert hash(s) == hash(KernelSettings()) and s == KernelSettings()
    with pytest.raises(ValueError, match=r"AttentionSettings.block_q must be a power of two"):
        AttentionSettings(block_q=96)
    with pytest.raises(ValueError, match=r"ConvMlpSettings.min_programs must be an integer >= 1"):
        ConvMlpSettings(min_programs=0)
    with pytest.raises(TypeError, match=r"NormSettings.enabled must be True or False"):
        NormSettings(enabled=1)
    with pytest.raises(TypeError, match=r"KernelSettings.mlp must be a MlpSettings"):
        KernelSettings(mlp=NormSettings())
    assert KernelSettings.off() == KernelSettings(**{
        f: type(getattr(s, f))(enabled=False) for f in ("mlp", "conv_mlp", "attention", "norm")})


def test_specs_parse_replace_and_print_back():
    s = kernels.parse("attention.block_q=64, mlp=off,norm.enabled=0, interpret=1")
    assert s.attention == AttentionSettings(block_q=64)
    assert s.mlp == MlpSettings(enabled=False) and not s.norm.enabled and s.interpret
    assert kernels.parse(str(s)) == s  # str() writes the changes from the defaults
    assert str(KernelSettings()) == "default" and kernels.parse("default") == KernelSettings()
    assert kernels.parse("off") == KernelSettings.off() and kernels.parse("on") == KernelSettings()
    assert s.replace(**{"attention.block_q": 32}).attention.block_q == 32
    for bad, message in [("attention.block_q", "not key=value"),
                         ("attn.block_q=64", "unknown kernel family 'attn'"),
                         ("mlp.block_q=64", "MlpSettings has no setting 'block_q'"),
                         ("mlp.block_m=big", "must be an integer"),
                         ("mlp.enabled=yes", "must be 0 or 1")]:
        with pytest.raises(ValueError, match=message):
            kernels.parse(bad)


def test_builders_take_settings_and_keep_them_in_the_config(monkeypatch):
    spec = "conv_mlp.block_x=16,norm=off"
    model = registry["pvt_v2_b0"](kernels=spec, **ARCH)
    assert model.config.kernels == kernels.parse(spec)
    assert registry["pvt_v2_b0"](kernels=kernels.parse(spec), **ARCH).config == model.config
    assert registry["pvt_v2_b0"](**ARCH).config.kernels == KernelSettings()
    monkeypatch.setenv("LUCID_FN_FUSED", "off")  # read when the model is built
    assert registry["pvt_v2_b0"](**ARCH).config.kernels == KernelSettings.off()
    assert registry["pvt_v2_b0"](kernels="on", **ARCH).config.kernels == KernelSettings()
    with pytest.raises(ValueError, match="kernels must be None, 'on', 'off'"):
        registry["pvt_v2_b0"](kernels=["off"], **ARCH)


def test_a_jitted_apply_cannot_ignore_a_change_of_settings():
    """Settings are part of what apply closes over: a model built with other settings is a
    new function, traced anew, never a cached trace of the old one."""
    on = registry["pvt_v2_b0"](**ARCH)
    off = registry["pvt_v2_b0"](kernels="off", **ARCH)
    assert on.apply is not off.apply
    assert "lucid_fn_fused" in model_cuda_hlo(on)
    assert "lucid_fn_fused" not in model_cuda_hlo(off)
    # the same jitted function object keeps its own settings, whatever is built after it
    f = jax.jit(on.apply)
    registry["pvt_v2_b0"](kernels="off", **ARCH)
    params = jax.eval_shape(on.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    with abstract_gpu():
        hlo = f.trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "lucid_fn_fused" in hlo
