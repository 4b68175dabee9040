"""The Pallas backend the kernels are written for, and whether it works here.

The kernels use Pallas' Triton backend (``jax.experimental.pallas.triton``), which JAX
deprecated in 0.11 and means to remove. Where that module cannot be imported, or (on a GPU
machine) a kernel family fails to lower for CUDA, :func:`usable` turns the families that
cannot run off each time a model's ``apply`` is traced (models/common.py): each then takes
its XLA form, the same function up to rounding, and one warning names what is missing.
Importing ``lucid_fn`` never needs the backend: the kernel modules touch ``plt`` only while
tracing a kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

try:
    from jax.experimental.pallas import triton as plt
    MISSING = None
except ImportError as e:  # removed from JAX, or a jaxlib without it
    plt = None
    MISSING = (f"jax.experimental.pallas.triton cannot be imported in jax {jax.__version__} "
               f"({type(e).__name__}: {e})")

FAMILIES = ("mlp", "conv_mlp", "attention", "norm")

_warned: set[str] = set()


def usable(settings, platform: str | None = None):
    """``settings`` with every family that cannot run here off. ``platform``: where the
    model will run (default: JAX's default backend); the lowering is checked on ``"gpu"``
    only, the one place the kernels lower (elsewhere each family takes its XLA form)."""
    on = [name for name in FAMILIES if getattr(settings, name).enabled]
    if not on:
        return settings
    if plt is None:
        _warn_once(f"{MISSING}: the fused kernels are off and every model runs its XLA "
                   f"path (the same functions, slower on a GPU). Install a JAX with the "
                   f"Pallas Triton backend (see the README, Install) to use them.")
        return _without(settings, on, interpret=False)
    if settings.interpret or (platform or jax.default_backend()) != "gpu":
        return settings
    failed = lowering_failures(settings)
    if failed:
        reasons = "; ".join(f"{name}: {why}" for name, why in failed.items())
        _warn_once(f"Pallas could not lower these fused kernels for CUDA in jax "
                   f"{jax.__version__}, so they are off and their XLA forms run instead: "
                   f"{reasons}")
        return _without(settings, list(failed))
    return settings


def _without(settings, families, **flags):
    return dataclasses.replace(settings, **flags, **{
        name: dataclasses.replace(getattr(settings, name), enabled=False) for name in families})


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def lowering_failures(settings) -> dict[str, str]:
    """For each enabled family whose probe (a small case that runs its kernels, forward
    and backward) does not lower for CUDA, the first line of the error. Cached: a
    family's settings are lowered once per process."""
    return {name: why for name in FAMILIES if getattr(settings, name).enabled
            and (why := _lowering_failure(name, getattr(settings, name)))}


@functools.cache
def _lowering_failure(family: str, family_settings) -> str | None:
    fn, args = probe(family, family_settings)
    try:
        lower_for_cuda(fn, *args)
    except Exception as e:  # noqa: BLE001  (whatever the lowering raises, the kernel is out)
        first_line = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first_line}"
    return None


def lower_for_cuda(fn, *args):
    """``jax.jit(fn)`` lowered for CUDA on ``args`` (arrays or ShapeDtypeStructs), on any
    machine: without a GPU, newer JAX (0.12) asks for one's description as an abstract
    device (older JAX ignores the abstract mesh)."""
    with abstract_gpu() if jax.default_backend() != "gpu" else contextlib.nullcontext():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@contextlib.contextmanager
def abstract_gpu():
    """A GPU's description, for lowering where there is none (an H100's)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=device)):
        yield


def probe(family: str, family_settings):
    """``(fn, args)``: a small case of ``family`` under ``family_settings`` whose CUDA
    lowering runs the family's kernels, forward and backward (shapes the kernels take:
    bf16, power-of-two widths, hidden sizes a multiple of the tiles)."""
    from lucid_fn.kernels import KernelSettings, attention, conv_mlp, layer_norm, mlp
    from lucid_fn.nn import layers

    bf16, f32 = jnp.bfloat16, jnp.float32
    kernels = KernelSettings().replace(**{family: family_settings})

    def spec(*shape, dtype=f32):
        return jax.ShapeDtypeStruct(shape, dtype)

    def linear(c_in, c_out):
        return {"kernel": spec(c_in, c_out), "bias": spec(c_out)}

    def summed(f):
        return jax.value_and_grad(lambda *a: layers.add_bias(f(*a)).astype(f32).sum(),
                                  argnums=tuple(range(len(args))))

    if family == "attention":
        def reference(q, k, v):
            p = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(f32), axis=-1)
            return jnp.einsum("bhnm,bmhd->bnhd", p.astype(bf16), v)
        args = (spec(2, 30, 2, 32, dtype=bf16), spec(2, 9, 2, 32, dtype=bf16),
                spec(2, 9, 2, 32, dtype=bf16))
        return summed(lambda q, k, v: attention.attention(
            q, k, v, scale=None, dtype=bf16, reference=reference, kernels=kernels)), args
    if family == "mlp":
        hidden = 2 * family_settings.block_h
        args = (linear(64, hidden), linear(hidden, 64), spec(3, 50, 64))
        return summed(lambda a, b, x: mlp.mlp_gelu(a, b, x, approximate=False, dtype=bf16,
                                                   kernels=kernels)), args
    if family == "conv_mlp":
        hidden = 2 * family_settings.block_h
        dw = {"kernel": spec(3, 3, 1, hidden), "bias": spec(hidden)}
        args = (linear(32, hidden), dw, linear(hidden, 32), spec(2, 20, 32))
        return summed(lambda a, d, b, x: conv_mlp.conv_mlp(a, d, b, x, hw=(4, 5), dtype=bf16,
                                                           kernels=kernels)), args
    if family == "norm":
        p = {"scale": spec(64), "bias": spec(64)}
        args = (p, p, spec(2, 16, 64, dtype=bf16), spec(2, 16, 64, dtype=bf16))

        def both(p_a, p, x, y):
            s, n = layer_norm.add_layer_norm(p, x, y, eps=1e-6, kernels=kernels)
            t, m = layer_norm.norm_layer_norm(p_a, p, x, eps_a=1e-6, eps=1e-6, kernels=kernels)
            return s + n + t + m
        return summed(both), args
    raise ValueError(f"unknown kernel family {family!r}; families: {', '.join(FAMILIES)}")
