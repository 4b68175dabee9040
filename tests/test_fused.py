"""lucid_fn.nn.fused: the fused MLP kernel (Pallas, run here in interpret mode) against
the XLA ops it replaces; when it is used, and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn import registry
from lucid_fn.nn import fused


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
    ref32 = fused.reference(fc1, fc2, x, approximate=approximate, dtype=jnp.float32)
    out = fused.pallas_mlp(fc1, fc2, x, approximate=approximate, dtype=jnp.bfloat16,
                           interpret=True)
    assert out.shape == (*shape, c_out) and out.dtype == jnp.bfloat16
    ref16 = fused.reference(fc1, fc2, x, approximate=approximate, dtype=jnp.bfloat16)
    err = float(jnp.abs(out.astype(jnp.float32) - ref32).max())
    err16 = float(jnp.abs(ref16.astype(jnp.float32) - ref32).max())
    # the hidden layer stays in float32 on chip: no worse than XLA's bf16 path
    assert err <= err16 * 1.1, (err, err16)
    assert err < 0.02 * float(jnp.abs(ref32).max())


def test_supported_widths_and_dtypes():
    bf16 = jnp.bfloat16
    x = jnp.zeros((4, 64))
    assert fused.supported(*_params(64, 512, 64), x, bf16)
    assert not fused.supported(*_params(64, 512, 64), x, jnp.float32)   # f32: XLA
    assert not fused.supported(*_params(320, 1280, 320), x, bf16)       # not a power of 2
    assert not fused.supported(*_params(256, 1024, 256), x, bf16)       # too wide
    assert not fused.supported(*_params(64, 96, 64), x, bf16)           # hidden % chunk


def test_off_gpu_it_is_the_xla_path_with_its_gradient(monkeypatch):
    fc1, fc2 = _params(64, 256, 64)
    x = jax.random.normal(jax.random.key(3), (3, 50, 64))
    f = jax.jit(lambda a, b, v: fused.mlp_gelu(a, b, v, approximate=False,
                                                dtype=jnp.bfloat16))
    ref = jax.jit(lambda a, b, v: fused.reference(a, b, v, approximate=False,
                                                   dtype=jnp.bfloat16))(fc1, fc2, x)
    np.testing.assert_array_equal(np.asarray(f(fc1, fc2, x), np.float32),
                                  np.asarray(ref, np.float32))

    def loss(fn, a, b, v):
        return fn(a, b, v, approximate=False, dtype=jnp.bfloat16).astype(jnp.float32).sum()

    g = jax.jit(jax.grad(lambda *a: loss(fused.mlp_gelu, *a), argnums=(0, 1, 2)))(fc1, fc2, x)
    g_ref = jax.jit(jax.grad(lambda *a: loss(fused.reference, *a), argnums=(0, 1, 2)))(
        fc1, fc2, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _cuda_hlo(model):
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    return jax.jit(model.apply).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()


def test_pvt_v1_inference_uses_the_kernel_on_cuda_in_bf16_only(monkeypatch):
    arch = dict(img_size=64, num_classes=10, flavor="paper")
    hlo = _cuda_hlo(registry["pvt_small"](dtype=jnp.bfloat16, **arch))
    # stages 1 and 2 (64 and 128 wide); 320 and 512 stay with XLA
    assert hlo.count("lucid_fn_fused_mlp") >= 2 and "xla.gpu.triton" in hlo
    assert "xla.gpu.triton" not in _cuda_hlo(registry["pvt_small"](**arch))
    monkeypatch.setenv("LUCID_FN_FUSED_MLP", "off")
    assert "xla.gpu.triton" not in _cuda_hlo(registry["pvt_small"](dtype=jnp.bfloat16, **arch))
