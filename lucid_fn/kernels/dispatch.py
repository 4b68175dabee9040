"""How every fused kernel is called: the Pallas kernel on CUDA, its XLA reference
elsewhere, and a gradient chosen the same way (a custom VJP)."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl


def on_cuda(kernel, reference, *args, interpret: bool = False, grad_kernel=None,
            keep=None, xla_grad=None):
    """``kernel(*args)`` on CUDA, ``reference(*args)`` elsewhere (with ``interpret``: the
    kernel everywhere, in Pallas' interpret mode). The gradient is the reference's,
    recomputed from the inputs, unless ``grad_kernel(*args, g)`` (a cotangent for each
    argument) is given: then that kernel's on CUDA. ``keep(args, out)``: what the backward
    gets in place of the inputs, for ``grad_kernel(*kept, g)`` on CUDA and
    ``xla_grad(*kept, g)`` elsewhere."""
    if interpret:
        kernel = kernel if kernel is reference else _interpreted(kernel)
        grad_kernel = grad_kernel and _interpreted(grad_kernel)

    def platform(*a, cuda, default):
        if interpret:
            return cuda(*a)
        return jax.lax.platform_dependent(*a, cuda=cuda, default=default)

    @jax.custom_vjp
    def f(*a):
        return platform(*a, cuda=kernel, default=reference)

    def f_fwd(*a):
        out = f(*a)
        return out, (a if keep is None else keep(a, out))

    def reference_grad(*a):
        return tuple(jax.vjp(reference, *a[:-1])[1](a[-1]))

    def f_bwd(res, g):
        if grad_kernel is None:
            return reference_grad(*res, g)
        return tuple(platform(*res, g, cuda=grad_kernel, default=xla_grad or reference_grad))

    f.defvjp(f_fwd, f_bwd)
    return f(*args)


def _interpreted(kernel):
    return lambda *a: kernel(*a, interpret=True)


def whole(a) -> pl.BlockSpec:
    """A block spec that hands every program the whole array."""
    return pl.BlockSpec(a.shape, lambda *_: (0,) * len(a.shape))


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def largest_pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)
