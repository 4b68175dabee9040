"""lucid_fn.nn.block: the residual stream (nn.Stream) computes what the blocks' equations
say, whether its adds and norms run as kernels or as XLA ops; and on CUDA it puts each
add+norm, norm+norm and branch bias where the kernels pay."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_cuda_hlo

from lucid_fn import nn, registry
from lucid_fn.kernels.settings import KernelSettings
from lucid_fn.models import pvt, pvt_v2

ARCH = dict(img_size=64, num_classes=10, depths=(2, 2, 1, 1))


def _stream(x, **kw):
    return nn.Stream(x, kernels=KernelSettings(), train=False, **kw)


def _norm(c, seed):
    k = jax.random.split(jax.random.key(seed), 2)
    return {"scale": 1 + 0.2 * jax.random.normal(k[0], (c,)),
            "bias": 0.2 * jax.random.normal(k[1], (c,))}


def test_stream_steps_are_the_plain_ops():
    """Off the GPU every step is XLA's op: the same values as writing them out."""
    k = jax.random.split(jax.random.key(0), 4)
    x, y = jax.random.normal(k[0], (2, 12, 16)), jax.random.normal(k[1], (2, 12, 16))
    pos, cls = jax.random.normal(k[2], (1, 13, 16)), jax.random.normal(k[3], (1, 1, 16))
    p_a, p, p_c = _norm(16, 1), _norm(16, 2), _norm(16, 3)
    ln = nn.layers.layer_norm
    # opening: norm, class token, position embedding; the first norm1 reads it
    s = _stream(x).layer_norm(p_a, 1e-5).prepend(cls) + pos
    t = jnp.concatenate([jnp.broadcast_to(cls, (2, 1, 16)), ln(p_a, x, 1e-5)], 1) + pos
    np.testing.assert_array_equal(nn.layer_norm(p, s, 1e-6), ln(p, t, 1e-6))
    np.testing.assert_array_equal(s.tokens(), t)
    # a branch, read by the next norm, then closed by a stage norm
    s = (s + y[:, :1].repeat(13, 1)).layer_norm(p_c, 1e-6)
    np.testing.assert_allclose(s.tokens(), ln(p_c, t + y[:, :1].repeat(13, 1), 1e-6),
                               rtol=1e-6, atol=1e-6)
    # a biased branch: its bias added first
    b = jax.random.normal(k[3], (16,))
    s = _stream(x) + nn.Biased(y, b)
    np.testing.assert_array_equal(nn.layer_norm(p, s, 1e-6), ln(p, x + (y + b), 1e-6))
    np.testing.assert_array_equal(s.tokens(), x + (y + b))
    # a stream crosses jit and scan boundaries as a pytree, its pending step intact
    s = jax.jit(lambda s: s)(_stream(x).layer_norm(p_a, 1e-5) + pos[:, 1:])
    np.testing.assert_array_equal(s.tokens(), ln(p_a, x, 1e-5) + pos[:, 1:])


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0"])
def test_a_block_on_the_stream_is_the_block_on_arrays(name):
    """The model's block applied to a plain array (its equations as written) and to the
    stream (where the adds and norms may fuse): the same tokens, at inference and in
    training."""
    family = pvt if name == "pvt_tiny" else pvt_v2
    model = registry[name](**ARCH, **({"flavor": "paper"} if name == "pvt_tiny" else {}))
    cfg = model.config
    p = jax.tree_util.tree_map(lambda a: a[0], model.init(jax.random.key(0))["stage1"]["blocks"])
    x = jax.random.normal(jax.random.key(1), (2, 256, cfg.embed_dims[0]))
    kw = dict(cfg=cfg, stage=0, hw=(16, 16))
    for rng in (None, jax.random.key(2)):
        plain = family.block(p, x, rng, 0.1, **kw)
        stream = nn.Stream(x, kernels=cfg.kernels, train=rng is not None)
        fused = family.block(p, family.block(p, stream, rng, 0.1, **kw), rng, 0.1, **kw)
        np.testing.assert_allclose(fused.tokens(), family.block(p, plain, rng, 0.1, **kw),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("pvt_tiny", dict(flavor="paper")), ("pvt_v2_b0", {})])
def test_the_kernels_schedule_off_the_gpu_is_the_kernels_off_model(name, kw):
    """With XLA's ops in the kernels' places (off the GPU), the stream's schedule is the
    kernels-off model bit for bit, at inference and in training."""
    arch = dict(img_size=32, num_classes=10, depths=(1, 2, 1, 1), dtype=jnp.bfloat16, **kw)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    off, on = registry[name](kernels="off", **arch), registry[name](**arch)
    params = off.init(jax.random.key(0))
    for kw in ({}, dict(train=True, rng=jax.random.key(2))):
        np.testing.assert_array_equal(on.apply(params, x, **kw), off.apply(params, x, **kw))


def test_the_model_through_the_kernels_is_the_model_through_xla():
    """Every kernel run (in interpret mode, on the CPU) where it would run on a GPU, in
    bf16: the logits XLA's path gives, up to bf16 rounding. PVT v2 b0 at 32x32: the
    branches' biases handed to the add+norm, a stage opened by the norm+norm kernel and
    closed with the last add (stage 2's two blocks hand a branch from block to block),
    the conv MLP and the attention with its queries' bias."""
    arch = dict(img_size=32, num_classes=10, depths=(1, 2, 1, 1), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    off = registry["pvt_v2_b0"](kernels="off", **arch)
    params = off.init(jax.random.key(0))
    want = off.apply(params, x)
    got = registry["pvt_v2_b0"](kernels=KernelSettings(interpret=True), **arch).apply(params, x)
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * float(jnp.abs(want).max()))


# ------------------------------------------------------------------ placement on CUDA


def _kernel_calls(hlo: str, name: str) -> list[int]:
    """Operand counts of the calls to the kernel ``name``, in order."""
    calls = re.findall(r"xla\.gpu\.triton\(([^)]*)\)[^\n]*name = \"" + name + '"', hlo)
    return [len(c.split(",")) for c in calls]


def _arch(name, **kw):
    return dict(ARCH, **kw, **({"flavor": "paper"} if name == "pvt_small" else {}))


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b0"])
def test_blocks_add_and_norm_in_one_kernel_at_inference_on_cuda(name):
    """Every block's two LayerNorms after the first, and v2's stage norms, read the
    residual add through the kernel at inference in bf16, at every stage whose rows fill
    its tiles, with the attention's projection bias (both families) and v2's fc2 bias
    handed in un-added (one operand more): v1's MLP kernel adds its own. Training takes
    the backward kernel instead; float32 and the kernels off keep XLA."""
    hlo = model_cuda_hlo(registry[name](dtype=jnp.bfloat16, **_arch(name)))
    # stages 1 and 2 (2 blocks): norm2, norm1, norm2; stage 3 (1 block, 320 or 160 wide
    # in a masked tile): norm2; stage 4 (1 block) only for v2_b0 (8 rows of 256; v1's
    # 10 rows with the class token fill no tile); then each of v2's four stage norms
    biased, plain = 5, 4  # operands: x, y, [the branch's bias,] scale, bias
    if name == "pvt_small":
        want = [biased, plain, biased] * 2 + [biased]
    else:
        want = ([biased] * 4) * 2 + [biased] * 2 + [biased] * 2
    assert sorted(_kernel_calls(hlo, "lucid_fn_fused_add_norm")) == sorted(want)
    assert "lucid_fn_fused_add_norm" not in model_cuda_hlo(registry[name](**_arch(name)))
    train = dict(train=True, rng=jax.random.key(1))
    assert "lucid_fn_fused_add_norm\"" not in model_cuda_hlo(
        registry[name](dtype=jnp.bfloat16, **_arch(name)), **train)
    assert "lucid_fn_fused_add_norm" not in model_cuda_hlo(
        registry[name](dtype=jnp.bfloat16, kernels="norm=off", **_arch(name)))


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b0"])
def test_queries_reach_the_attention_kernel_with_their_bias_at_inference(name):
    """At inference the query projection's bias goes to the attention kernel un-added (no
    pass of its own: one operand more); in training the queries arrive added."""
    model = registry[name](dtype=jnp.bfloat16, **_arch(name, depths=(1, 1, 1, 1)))
    assert _kernel_calls(model_cuda_hlo(model), "lucid_fn_fused_attention") == [4] * 4
    train = model_cuda_hlo(model, train=True, rng=jax.random.key(1))
    assert _kernel_calls(train, "lucid_fn_fused_attention") == [3] * 4


def test_training_on_cuda_uses_the_add_norm_grad_kernel():
    """Lowered for CUDA, v2's training step takes the add+norms' gradients from the
    backward kernel (its forward stays XLA's), every stage width included (b0: 32, 64, the
    masked 160 and 256)."""
    model = registry["pvt_v2_b0"](dtype=jnp.bfloat16, **dict(ARCH, depths=(1, 1, 1, 1)))
    hlo = model_cuda_hlo(model, grad=True)
    assert set(re.findall(r"lucid_fn_fused_add_norm\w*", hlo)) == {"lucid_fn_fused_add_norm_grad"}
    # per stage (one block each): norm2's and the closing norm's
    assert hlo.count('name = "lucid_fn_fused_add_norm_grad"') == 8


@pytest.mark.parametrize("name, opened", [("pvt_v2_b0", 4), ("pvt_small", 3)])
def test_stages_open_with_the_norm_norm_kernel_at_inference_on_cuda(name, opened):
    """Each stage's patch-embedding norm (v1: and its position embedding) and its first
    norm1 are one kernel at inference in bf16; v1's last stage, whose class token comes
    between them, training, scanned blocks and remat normalise first, through XLA."""
    arch = _arch(name, dtype=jnp.bfloat16)
    kernel = 'name = "lucid_fn_fused_norm_norm"'
    assert model_cuda_hlo(registry[name](**arch)).count(kernel) == opened
    assert kernel not in model_cuda_hlo(registry[name](**arch), train=True,
                                        rng=jax.random.key(1))
    for other in (dict(scan_blocks=True), dict(remat=True)):
        assert kernel not in model_cuda_hlo(registry[name](**arch, **other))


def _convolutions(hlo: str) -> int:
    """Dense convolutions (the embeddings' and the SR's): the depthwise convs are grouped
    on CUDA and shifted multiply-adds on the CPU (nn.layers.depthwise_conv3x3)."""
    return len(re.findall(r"stablehlo.convolution.*feature_group_count = 1 ", hlo))


def test_spatial_reduction_is_cudnns_conv_on_cuda_at_inference_only():
    """At inference on CUDA each reducing block's SR is a kernel = stride convolution (no
    transpose pass); elsewhere, and in training, reshape + matmul. Both compute the same
    function: at a map its windows do not divide, too."""
    # kernels off: the SR is the difference in dense convolutions
    model = registry["pvt_v2_b0"](dtype=jnp.bfloat16, kernels="off", **ARCH)
    params = jax.eval_shape(model.init, jax.random.key(0))
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    train = dict(train=True, rng=jax.random.key(1))

    def on_cpu(**kw):
        return _convolutions(jax.jit(lambda p, v: model.apply(p, v, **kw)).trace(
            params, images).lower().as_text())

    # five blocks in stages 1-3 reduce (sr 8, 4, 2); stage 4's does not
    assert _convolutions(model_cuda_hlo(model)) - on_cpu() == 5
    assert _convolutions(model_cuda_hlo(model, **train)) == on_cpu(**train)
    k = jax.random.split(jax.random.key(3), 3)
    p = {"kernel": jax.random.normal(k[0], (4, 4, 8, 8)), "bias": jax.random.normal(k[1], (8,))}
    m = jax.random.normal(k[2], (2, 13, 11, 8))
    conv = nn.conv(p, m, stride=4, padding=0)
    np.testing.assert_allclose(conv, nn.patchify_conv(p, m), rtol=1e-5, atol=1e-5)
    assert conv.shape == (2, 3, 2, 8)
