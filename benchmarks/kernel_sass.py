"""Registers and instruction counts of our Pallas (Triton) kernels, without a GPU.

Lowers a kernel's call for CUDA (sm_90), captures the Triton module that Pallas builds,
compiles it with Triton from PyPI and disassembles it with the ``cuobjdump`` that Triton
ships. Prints registers per thread, spills, and the instructions of the kernel's innermost
loop by opcode: what an H100 or H200 will execute, read here at no device time
(benchmarks/NOTES.md). Needs ``pip install triton`` (3.6.0 matches the GPU image)::

    PYTHONPATH=. python benchmarks/kernel_sass.py conv --shape 256 56 56 512
    PYTHONPATH=. python benchmarks/kernel_sass.py conv --kernels conv_mlp.block_x=16
    PYTHONPATH=. python benchmarks/kernel_sass.py conv_training --shape 128 56 56 512
    PYTHONPATH=. python benchmarks/kernel_sass.py norm --shape 256 196 320
    PYTHONPATH=. python benchmarks/kernel_sass.py norm_backward --shape 128 196 320

``conv`` is the inference forward, ``conv_training`` the training forward (which also
writes GELU'(z)) and the transposed-conv kernel of the backward. ``--kernels`` takes
``lucid_fn.kernels.parse`` items.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn import kernels
from lucid_fn.kernels import conv_mlp, dispatch
from lucid_fn.kernels import layer_norm as ln


def capture_triton_modules(fn, *args) -> list[str]:
    """The Triton IR text of every Pallas kernel in ``jax.jit(fn)(*args)``, lowered for
    CUDA (no GPU needed)."""
    from jax._src.pallas.triton import lowering as tl_lowering

    captured = []
    original = tl_lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    tl_lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        tl_lowering.lower_jaxpr_to_triton_module = original
    return captured


def compile_sass(ir_text: str, num_warps: int) -> tuple[str, str]:
    """(SASS, resource usage) of a Triton IR module compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir_text)
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps})
        cubin = os.path.join(d, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    return sass, res


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, line) of each SASS instruction."""
    out = []
    for line in sass.splitlines():
        m = _INSTR.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), line.strip()))
    return out


def innermost_loop(instrs) -> list[tuple[int, str, str]]:
    """The instructions of the shortest backward branch's body (the hot loop)."""
    best = None
    for addr, op, line in instrs:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", line.split("BRA", 1)[1])
            if m and int(m.group(1), 16) < addr:
                target = int(m.group(1), 16)
                if best is None or addr - target < best[1] - best[0]:
                    best = (target, addr)
    if best is None:
        return []
    return [i for i in instrs if best[0] <= i[0] <= best[1]]


def report(ir_text: str, num_warps: int, elements_per_iter: int | None = None) -> dict:
    sass, res = compile_sass(ir_text, num_warps)
    instrs = instructions(sass)
    loop = innermost_loop(instrs)
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    out = {"registers": int(regs.group(1)) if regs else None,
           "stack_bytes": int(stack.group(1)) if stack else None,
           "instructions": len(instrs), "loop_instructions": len(loop),
           "loop_opcodes": collections.Counter(op.split(".")[0] for _, op, _ in loop)}
    if elements_per_iter:
        out["loop_instructions_per_element"] = round(len(loop) / elements_per_iter, 1)
    return out


def conv_case(shape, ks: kernels.KernelSettings):
    """The conv kernel's Triton modules at a (B, H, W, hidden) map, each with its warps and
    the elements a thread handles per loop iteration; and the tiles."""
    b, hh, ww, hidden = shape
    c = 64
    fc1 = {"kernel": jnp.zeros((c, hidden)), "bias": jnp.zeros((hidden,))}
    dw = {"kernel": jnp.zeros((3, 3, 1, hidden)), "bias": jnp.zeros((hidden,))}
    fc2 = {"kernel": jnp.zeros((hidden, c)), "bias": jnp.zeros((c,))}
    x = jax.ShapeDtypeStruct((b, hh * ww, c), jnp.bfloat16)
    settings = ks.conv_mlp
    mods = capture_triton_modules(
        functools.partial(conv_mlp.pallas_conv_mlp, hw=(hh, ww), relu=False,
                          dtype=jnp.bfloat16, settings=settings), fc1, dw, fc2, x)
    tiles = conv_mlp.conv_tiles(b, (hh, ww), hidden, settings)
    # One loop iteration handles one input row of bx columns x bc channels.
    warps = settings.num_warps
    return [(m, warps, tiles["bx"] * tiles["bc"] // (32 * warps)) for m in mods], tiles


def conv_training_case(shape, ks: kernels.KernelSettings):
    """The training forward (activations and GELU'(z)) and the transposed-conv kernel of
    its backward at a (B, H, W, hidden) map, each with the elements a thread handles per
    loop iteration."""
    b, hh, ww, hidden = shape
    m = jax.ShapeDtypeStruct((b * hh * ww, hidden), jnp.bfloat16)
    taps = jax.ShapeDtypeStruct((9, hidden), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((16, hidden), jnp.float32)
    settings = ks.conv_mlp
    static = (b, (hh, ww), settings, False)
    mods = capture_triton_modules(
        lambda h, t, e, g: jax.vjp(lambda *a: conv_mlp.conv_gelu_table(*a, static),
                                   h, t, e)[1](g), m, taps, table, m)
    forward = conv_mlp.conv_tiles(b, (hh, ww), hidden, settings)
    backward = conv_mlp.conv_tiles(b, (hh, ww), hidden, settings, settings.grad_size)
    per_thread = [t["bx"] * t["bc"] // (32 * w) for t, w in
                  ((forward, settings.num_warps), (backward, settings.grad_warps))]
    return (list(zip(mods, (settings.num_warps, settings.grad_warps), per_thread)),
            {"forward": forward, "backward": backward})


def norm_case(shape, ks: kernels.KernelSettings):
    """The add+norm kernel's Triton modules on (B, N, C) tokens, and the elements each
    thread handles (its one tile, padded to a power of two)."""
    c = shape[-1]
    p = {"scale": jnp.zeros((c,)), "bias": jnp.zeros((c,))}
    x = jax.ShapeDtypeStruct(tuple(shape), jnp.bfloat16)
    mods = capture_triton_modules(
        functools.partial(ln.pallas_add_layer_norm, eps=1e-6, settings=ks.norm), p, x, x)
    rows = ln._norm_rows(int(np.prod(shape[:-1])), c, ks.norm)
    tile = dispatch.next_pow2(c)
    warps = ks.norm.num_warps
    return [(m, warps, rows * tile // (32 * warps)) for m in mods], {"rows": rows, "tile": tile}


def norm_backward_case(shape, ks: kernels.KernelSettings):
    """The add+norm's backward kernel (the sum kept, as the blocks' add+norms) on (B, N, C)
    tokens, as :func:`norm_case`."""
    c = shape[-1]
    p = {"scale": jnp.zeros((c,)), "bias": jnp.zeros((c,))}
    x = jax.ShapeDtypeStruct(tuple(shape), jnp.bfloat16)
    mods = capture_triton_modules(
        lambda p, s, gs, gn: ln.pallas_add_layer_norm_grad(p, (s,), (gs, gn), eps=1e-6,
                                                           settings=ks.norm), p, x, x, x)
    forward, tiles = norm_case(shape, ks)
    return [(m, *forward[0][1:]) for m in mods], tiles


CASES = {"conv": conv_case, "conv_training": conv_training_case, "norm": norm_case,
         "norm_backward": norm_backward_case}
DEFAULT_SHAPES = {"conv": (256, 56, 56, 512), "conv_training": (128, 56, 56, 512),
                  "norm": (256, 196, 320), "norm_backward": (128, 3136, 64)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=tuple(CASES))
    ap.add_argument("--shape", type=int, nargs="+", default=None,
                    help="conv, conv_training: B H W HIDDEN (default 256 56 56 512, "
                         "128 56 56 512); norm, norm_backward: B N C (default 256 196 320, "
                         "128 3136 64)")
    ap.add_argument("--kernels", default="",
                    help="kernel settings, e.g. conv_mlp.block_x=16 (lucid_fn.kernels.parse)")
    ap.add_argument("--dump", default=None, help="write the SASS here")
    args = ap.parse_args(argv)
    shape = tuple(args.shape or DEFAULT_SHAPES[args.kernel])
    if len(shape) != len(DEFAULT_SHAPES[args.kernel]):
        ap.error(f"--shape for {args.kernel} takes {len(DEFAULT_SHAPES[args.kernel])} "
                 f"integers, got {len(shape)}")
    try:
        ks = kernels.parse(args.kernels)
    except (TypeError, ValueError) as e:
        ap.error(str(e))
    mods, tiles = CASES[args.kernel](shape, ks)
    print("tiles", tiles)
    for text, warps, per_thread in mods:
        print("elements per thread per iteration", per_thread)
        r = report(text, warps, per_thread)
        print({k: v for k, v in r.items() if k != "loop_opcodes"})
        print(" loop:", dict(r["loop_opcodes"].most_common()))
        if args.dump:
            with open(args.dump, "w") as f:
                f.write(compile_sass(text, warps)[0])


if __name__ == "__main__":
    main()
