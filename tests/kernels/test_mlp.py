"""lucid_fn.kernels.mlp: PVT v1's fused MLP kernel (run here in interpret mode) against
the XLA ops it replaces; where it is used, and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_xla_path_off_gpu, model_cuda_hlo

from lucid_fn import registry
from lucid_fn.kernels import mlp


def _params(c_in, hidden, c_out, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return ({"kernel": jax.random.normal(k[0], (c_in, hidden)) * c_in**-0.5,
             "bias": jax.random.normal(k[1], (hidden,)) * 0.1},
            {"kernel": jax.random.normal(k[2], (hidden, c_out)) * hidden**-0.5,
             "bias": jax.random.normal(k[3], (c_out,)) * 0.1})


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("shape,c_in,hidden,c_out", [
    ((2, 200), 64, 512, 64),     # rows not a multiple of the tile: padded, then cut
    ((1, 128), 128, 256, 32),    # widths differ in and out
])
def test_kernel_matches_xla_in_float32_and_beats_bf16_rounding(approximate, shape, c_in,
                                                                hidden, c_out):
    fc1, fc2 = _params(c_in, hidden, c_out)
    x = jax.random.normal(jax.random.key(9), (*shape, c_in))
    ref32 = mlp.reference(fc1, fc2, x, approximate=approximate, dtype=jnp.float32)
    out = mlp.pallas_mlp(fc1, fc2, x, approximate=approximate, dtype=jnp.bfloat16,
                         interpret=True)
    assert out.shape == (*shape, c_out) and out.dtype == jnp.bfloat16
    ref16 = mlp.reference(fc1, fc2, x, approximate=approximate, dtype=jnp.bfloat16)
    err = float(jnp.abs(out.astype(jnp.float32) - ref32).max())
    err16 = float(jnp.abs(ref16.astype(jnp.float32) - ref32).max())
    # the hidden layer stays in float32 on chip: no worse than XLA's bf16 path
    assert err <= err16 * 1.1, (err, err16)
    assert err < 0.02 * float(jnp.abs(ref32).max())


def test_supported_widths_and_dtypes():
    bf16 = jnp.bfloat16
    x = jnp.zeros((4, 64))
    assert mlp.supported(*_params(64, 512, 64), x, bf16)
    assert not mlp.supported(*_params(64, 512, 64), x, jnp.float32)   # f32: XLA
    assert not mlp.supported(*_params(320, 1280, 320), x, bf16)       # not a power of 2
    assert not mlp.supported(*_params(256, 1024, 256), x, bf16)       # too wide
    assert not mlp.supported(*_params(64, 96, 64), x, bf16)           # hidden % chunk


def test_off_gpu_it_is_the_xla_path_with_its_gradient():
    fc1, fc2 = _params(64, 256, 64)
    x = jax.random.normal(jax.random.key(3), (3, 50, 64))

    def loss(fn, a, b, v):
        return fn(a, b, v, approximate=False, dtype=jnp.bfloat16).astype(jnp.float32).sum()

    assert_xla_path_off_gpu(lambda *a: loss(mlp.mlp_gelu, *a),
                            lambda *a: loss(mlp.reference, *a), fc1, fc2, x)


def test_pvt_v1_uses_the_kernel_on_cuda_in_bf16_only():
    """At inference and in training at a dropout rate of 0 (the builders' default);
    a dropout between its ops, float32, or the kernels off keep XLA."""
    arch = dict(img_size=64, num_classes=10, flavor="paper", depths=(1, 1, 1, 1))
    hlo = model_cuda_hlo(registry["pvt_small"](dtype=jnp.bfloat16, **arch))
    # stages 1 and 2 (64 and 128 wide); 320 and 512 stay with XLA
    assert hlo.count("lucid_fn_fused_mlp") >= 2 and "xla.gpu.triton" in hlo
    train = dict(train=True, rng=jax.random.key(1))
    assert "lucid_fn_fused_mlp" in model_cuda_hlo(
        registry["pvt_small"](dtype=jnp.bfloat16, **arch), **train)
    assert "lucid_fn_fused_mlp" not in model_cuda_hlo(
        registry["pvt_small"](dtype=jnp.bfloat16, drop_rate=0.1, **arch), **train)
    assert "xla.gpu.triton" not in model_cuda_hlo(registry["pvt_small"](**arch))
    for off in ("off", "mlp=off"):
        assert "lucid_fn_fused_mlp" not in model_cuda_hlo(
            registry["pvt_small"](dtype=jnp.bfloat16, kernels=off, **arch))
