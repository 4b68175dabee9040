"""lucid_fn.kernels.attention: the attention core's kernel and its backward kernel (run
here in interpret mode) against XLA's; where they are used."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_xla_path_off_gpu, cuda_hlo, model_cuda_hlo

from lucid_fn import registry
from lucid_fn.kernels import attention as kernel
from lucid_fn.kernels.settings import AttentionSettings
from lucid_fn.nn import attention, layers


def _qkv(b, n, m, heads, d, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (b, n, heads, d)) * 2,   # peaked softmax rows too
            jax.random.normal(k[1], (b, m, heads, d)),
            jax.random.normal(k[2], (b, m, heads, d)))


def _bf16(*arrays):
    return tuple(a.astype(jnp.bfloat16) for a in arrays)


@pytest.mark.parametrize("b,n,m,heads,d,scale", [
    (2, 200, 49, 2, 32, None),  # 200 queries: the last tile of 128 is partial
    (1, 64, 7, 1, 64, 0.3),     # few keys (padded to 16 in the kernel), an explicit scale
    (2, 50, 50, 4, 16, None),   # PVT v1's last stage: class token, nothing reduced
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_kernel_matches_xla(b, n, m, heads, d, scale, with_bias):
    q, k, v = _bf16(*_qkv(b, n, m, heads, d))
    bias = jax.random.normal(jax.random.key(9), (heads, d)).astype(jnp.bfloat16)
    out = kernel.pallas_attention(q, k, v, bias if with_bias else None, scale=scale,
                                  dtype=jnp.bfloat16, interpret=True)
    if with_bias:  # the kernel adds it as the linear layer would have
        q = layers.add_bias(layers.Biased(q, bias))
    assert out.shape == (b, n, heads, d) and out.dtype == jnp.bfloat16
    ref32 = attention.attend_xla(*(a.astype(jnp.float32) for a in (q, k, v)), scale=scale,
                                 dtype=jnp.float32)
    ref16 = attention.attend_xla(q, k, v, scale=scale, dtype=jnp.bfloat16)
    err = float(jnp.abs(out.astype(jnp.float32) - ref32).max())
    err16 = float(jnp.abs(ref16.astype(jnp.float32) - ref32).max())
    assert err <= err16 * 1.1, (err, err16)  # no worse than XLA's bf16 path
    # every head read from and written to its own slice: a wrong head is far off
    assert err < 0.05 * float(jnp.abs(ref32).max())


@pytest.mark.parametrize("b,n,m,heads,d,scale,min_programs", [
    (2, 200, 49, 2, 32, None, 8),  # 4 tiles of 64 queries, 2 per program, the last partial
    (1, 64, 7, 1, 64, 0.3, 1),     # few keys (padded to 16), one program, an explicit scale
    (2, 50, 50, 4, 16, None, 1),   # PVT v1's last stage
    (1, 300, 49, 1, 64, None, 2),  # 5 tiles over 2 programs: one walks past the queries
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_grad_kernel_no_worse_than_xla(b, n, m, heads, d, scale, min_programs,
                                                 with_bias):
    """The backward kernel's dq, dk, dv (and the queries' bias's gradient) against the
    float32 VJP: no further off than XLA's bf16 gradient of the same attention, however
    the queries split over programs."""
    q, k, v = _bf16(*_qkv(b, n, m, heads, d))
    g, bias = _bf16(jax.random.normal(jax.random.key(8), q.shape),
                    jax.random.normal(jax.random.key(9), (heads, d)))
    args = (q, k, v, bias) if with_bias else (q, k, v)

    def ref(dtype):
        return lambda q, k, v, *qb: attention.attend_xla(
            layers.Biased(q, qb[0]) if qb else q, k, v, scale=scale, dtype=dtype)

    got = kernel.pallas_attention_grad(q, k, v, g, bias if with_bias else None, scale=scale,
                                       dtype=jnp.bfloat16, interpret=True,
                                       settings=AttentionSettings(grad_min_programs=min_programs))
    want16 = jax.vjp(ref(jnp.bfloat16), *args)[1](g)
    want32 = jax.vjp(ref(jnp.float32), *(a.astype(jnp.float32) for a in args))[1](
        g.astype(jnp.float32))
    assert len(got) == len(args)
    for a, x, w in zip(got, want16, want32):
        assert a.shape == x.shape and a.dtype == x.dtype
        err = float(jnp.abs(a.astype(jnp.float32) - w).max())
        err16 = float(jnp.abs(x.astype(jnp.float32) - w).max())
        scale_w = float(jnp.abs(w).max())
        step = 2.0 ** (np.floor(np.log2(scale_w)) - 7)  # bf16's spacing at the largest
        assert err <= max(err16 * 1.1, step), (err, err16, step)  # no worse than XLA
        assert err < 0.02 * scale_w  # a wrong head or key is far off


def test_attention_grad_tiles_fill_the_gpu_and_cover_the_queries():
    settings = AttentionSettings()
    for b, heads, n in [(128, 1, 3136), (128, 2, 784), (128, 5, 196), (128, 8, 49),
                        (1, 1, 3136), (2, 2, 200)]:
        parts, blocks = kernel.grad_tiles(b, heads, n, settings)
        tiles = -(-n // settings.grad_block_q)
        assert parts * blocks >= tiles and (parts - 1) * blocks < tiles  # none idle
        # no program walks more tiles than an even split over grad_min_programs would give
        assert blocks <= -(-tiles * b * heads // settings.grad_min_programs)


def test_attention_gradient_on_cuda_is_the_backward_kernel():
    """Lowered for CUDA, the attention's gradient is the backward kernel's; off GPU it
    stays XLA's (the test below)."""
    args = _bf16(*_qkv(2, 30, 9, 2, 32))

    def loss(*a):
        return attention.attend(*a, scale=None, dtype=jnp.bfloat16, attn_drop=0.0,
                                rng=None).astype(jnp.float32).sum()

    hlo = cuda_hlo(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args)
    assert "lucid_fn_fused_attention" in hlo.replace("lucid_fn_fused_attention_grad", "")
    assert "lucid_fn_fused_attention_grad" in hlo


def test_attention_supported_only_in_bf16_for_small_key_sets():
    bf16 = jnp.bfloat16
    qkv = _qkv(1, 8, 49, 2, 32)
    assert kernel.supported(*_bf16(*qkv), bf16)
    assert not kernel.supported(*_bf16(*qkv), jnp.float32)
    assert not kernel.supported(*qkv, bf16)                        # f32 inputs
    assert not kernel.supported(*_bf16(*_qkv(1, 8, 196, 2, 32)), bf16)  # keys
    assert not kernel.supported(*_bf16(*_qkv(1, 8, 49, 2, 40)), bf16)   # d


def test_attention_off_gpu_is_the_xla_path_with_its_gradient():
    args = _bf16(*_qkv(2, 30, 9, 2, 32))

    def loss(fn, *a):
        return fn(*a).astype(jnp.float32).sum()

    fused_fn = lambda *a: attention.attend(*a, scale=None, dtype=jnp.bfloat16,  # noqa: E731
                                           attn_drop=0.0, rng=None)
    xla_fn = lambda *a: attention.attend_xla(*a, scale=None, dtype=jnp.bfloat16)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jit(fused_fn)(*args), np.float32),
                                  np.asarray(jax.jit(xla_fn)(*args), np.float32))
    assert_xla_path_off_gpu(lambda *a: loss(fused_fn, *a), lambda *a: loss(xla_fn, *a), *args)


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b0"])
def test_kernels_run_in_training_only_where_dropout_is_off(name):
    """With dropout rates of 0 (the builders' default) the training forward uses the
    attention kernel; a dropout between its ops keeps XLA; at inference there is no
    dropout."""
    arch = dict(img_size=64, num_classes=10, depths=(1, 1, 1, 1), dtype=jnp.bfloat16)
    if name == "pvt_small":
        arch["flavor"] = "paper"
    train = dict(train=True, rng=jax.random.key(1))
    hlo = model_cuda_hlo(registry[name](**arch), **train)
    assert hlo.count("lucid_fn_fused_attention") >= 4
    dropout = registry[name](attn_drop_rate=0.1, drop_rate=0.1, **arch)
    assert "lucid_fn_fused" not in model_cuda_hlo(dropout, **train)
    assert "lucid_fn_fused_attention" in model_cuda_hlo(dropout)
    assert "lucid_fn_fused" not in model_cuda_hlo(registry[name](kernels="off", **arch),
                                                  **train)
