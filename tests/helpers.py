"""Helpers shared by test modules (importable as ``helpers``: pyproject.toml puts tests/ on
pytest's path): lowering for CUDA on a machine without a GPU, and the check that a fused
entry point off the GPU is its XLA form, gradient included."""

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn.kernels.backend import abstract_gpu, lower_for_cuda  # noqa: F401


def cuda_hlo(fn, *args) -> str:
    """``jax.jit(fn)`` lowered for CUDA on ``args`` (arrays or ShapeDtypeStructs), as text:
    the kernels it runs show by name."""
    return lower_for_cuda(fn, *args).as_text()


def model_cuda_hlo(model, batch: int = 2, grad: bool = False, **apply_kw) -> str:
    """A model's jitted apply (or, with ``grad``, the gradient of its training logits' sum)
    lowered for CUDA, at 64x64."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch, 64, 64, 3), jnp.float32)
    if grad:
        def fn(p, v):
            return jax.grad(lambda p: model.apply(p, v, train=True, rng=jax.random.key(1))
                            .astype(jnp.float32).sum())(p)
    else:
        def fn(p, v):
            return model.apply(p, v, **apply_kw)
    return cuda_hlo(fn, params, x)


def assert_xla_path_off_gpu(loss, loss_ref, *args):
    """Off GPU a fused entry point is its XLA form: the same ``loss`` bit for bit, and the
    same gradient with respect to every argument."""
    np.testing.assert_array_equal(np.asarray(jax.jit(loss)(*args)),
                                  np.asarray(jax.jit(loss_ref)(*args)))
    argnums = tuple(range(len(args)))
    g = jax.jit(jax.grad(loss, argnums=argnums))(*args)
    g_ref = jax.jit(jax.grad(loss_ref, argnums=argnums))(*args)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
