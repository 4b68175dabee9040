"""Throughput of lucid_fn's PVTs against PyTorch (HF transformers / timm, eager and
``torch.compile``), inference and an AdamW train step, in one process tree.

On a GPU, the defaults are the published table's rows (docs/performance.md): inference at
batch 256, training at batch 128 with AdamW, 224x224 images, bf16 compute with float32
params for ours and bf16 autocast for the references::

    PYTHONUNBUFFERED=1 python3 benchmarks/bench.py --out OUT --name h100

On a CPU, ``--small`` runs every code path in seconds (tiny widths, 64x64, batch 2; the
test suite runs it); ``--device cpu`` without ``--small`` is a real CPU comparison, e.g.
pvt_small in float32 against HF transformers on the same number of threads::

    python benchmarks/bench.py --device cpu --models pvt_small --modes infer \
        --infer-batch 8 --dtype float32 --refs eager --threads 2 --name cpu

What is measured, for each model (registry name) and each ``--variants`` entry:

- ``infer``: ``jax.jit(apply)`` on a (B, H, W, 3) float32 batch; ``train``: one jitted
  step (forward with ``train=True``, cross-entropy, grad, ``optax.adamw``, update) with
  params and optimizer state donated; ``latency``: the inference call at the small batches
  of ``--latency-batch`` (1 and 8), each call timed alone, host to result, as a server
  sees it: median and 90th percentile ms over ``--latency-calls`` calls. Compile seconds
  are ``lower().compile()``.
- The references build the same network from our config: PVT v1 as HF transformers'
  ``PvtForImageClassification`` (the paper's network; ours runs ``flavor="paper"``), v2 as
  timm's ``pvt_v2_*`` (``pretrained=False``), ``semantic_fpn_<v2 backbone>`` as timm's
  backbone under a plain torch FPN and head (``torch_semantic_fpn``; rows carry both
  parameter counts, which agree); eager, ``torch.compile`` (default mode) and
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; ``--refs reduce-overhead``);
  torch's "compile seconds" are the first call's wall time. Fused AdamW on CUDA. On GPU
  each reference runs in a process of its own.
- Time per step is the median over ``--repeats`` of ``--iters`` back-to-back steps,
  synchronised (``block_until_ready`` / CUDA events). Peak memory: ours from XLA's memory
  analysis of the compiled program (arguments + temporaries + outputs - aliased), also the
  process peak from ``memory_stats()``; torch from ``max_memory_allocated`` after a reset.
- MFU: matmul and conv FLOPs counted from our forward's jaxpr (x3 for a train step; the
  same count for the references, which compute the same network) over the measured peak
  of a large matmul in the compute dtype on the same device (``--peak-tflops`` overrides).

A variant is ``default`` or comma-separated ``key=value`` items, each a builder keyword or
a kernel setting, so that every variant is a model built through the public API:
``scan_blocks=1|0|none``, ``remat=1|0``, ``logits_dtype=float32|bfloat16`` (Semantic
FPN), ``kernels=on|off``, ``FAMILY=on|off`` and
``FAMILY.SETTING=N`` for the kernel families of ``lucid_fn.kernels`` (``mlp``,
``conv_mlp``, ``attention``, ``norm``; e.g. ``conv_mlp.block_x=16``,
``attention.grad_block_q=32``, ``norm=off``). Results go to ``<out>/<name>.json`` and
``.md``, rewritten after every measurement so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

# JAX must not take 75% of the GPU up front: the torch references share the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lucid_fn  # noqa: E402
import lucid_fn.kernels  # noqa: E402
from lucid_fn import registry  # noqa: E402

GIB = 2**30
DEFAULT_MODELS = ("pvt_small", "pvt_v2_b2", "pvt_v2_b0")
# A model entry ``semantic_fpn_<backbone>``: registry["semantic_fpn"] on that backbone at
# ADE20K's 150 classes (the paper's setting: 512x512, batch 16, with --img-size 512
# --infer-batch 16 --train-batch 16); its reference is timm's backbone (features_only)
# under a plain torch FPN and FPN head of the same shapes (TorchSemanticFPN).
SEG_PREFIX = "semantic_fpn_"
SEG_CLASSES = 150
# --small: a narrow neck and head too.
SMALL_SEG = dict(fpn_channels=32, head_channels=16, norm_groups=8)
# --small: every structural feature (4 stages, spatial reduction, several heads), tiny.
SMALL_ARCH = dict(img_size=64, embed_dims=(16, 32, 40, 64), num_heads=(1, 2, 5, 8),
                  depths=(1, 1, 1, 1))


# ------------------------------------------------------------------------ variants

BUILDER_KEYS = {"scan_blocks": {"1": True, "0": False, "none": None},
                "remat": {"1": True, "0": False},
                "logits_dtype": {"float32": "float32", "bfloat16": "bfloat16"}}  # semantic_fpn


def parse_variant(spec: str) -> dict:
    """``"scan_blocks=0,conv_mlp.block_x=16"`` -> builder keywords (``kernels`` a
    ``lucid_fn.kernels.KernelSettings``)."""
    kwargs, kernel_items = {}, []
    if spec in ("", "default"):
        return kwargs
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key in BUILDER_KEYS and value.lower() in BUILDER_KEYS[key]:
            kwargs[key] = BUILDER_KEYS[key][value.lower()]
        elif key == "kernels" and value in ("on", "off"):
            kernel_items.append(value)
        else:
            kernel_items.append(item)
    if kernel_items:
        try:
            kwargs["kernels"] = lucid_fn.kernels.parse(",".join(kernel_items))
        except (TypeError, ValueError) as e:
            allowed = [f"{k}={'|'.join(v)}" for k, v in BUILDER_KEYS.items()]
            raise SystemExit(f"bad variant {spec!r}: {e}; allowed: {', '.join(allowed)}, "
                             f"kernels=on|off, FAMILY=on|off, FAMILY.SETTING=N") from None
    return kwargs


# ----------------------------------------------------------------------------- helpers


def median_step_s(run_iters, repeats: int) -> tuple[float, list]:
    times = [run_iters() for _ in range(repeats)]
    return statistics.median(times), times


def latency_stats(call, batch: int, args) -> dict:
    """``call()`` (which returns once its result is on the host side's hands: synchronised)
    timed alone ``args.latency_calls`` times: median and 90th percentile ms."""
    times = []
    for _ in range(args.latency_calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    p50, p90 = np.percentile(times, [50, 90])
    return {"step_ms": round(p50 * 1e3, 3), "latency_p90_ms": round(p90 * 1e3, 3),
            "img_s": round(batch / p50, 1), "calls": len(times)}


def count_flops(closed_jaxpr) -> int:
    """Matmul and convolution FLOPs (2 per multiply-add) of a jaxpr, sub-jaxprs included
    (scan bodies times their length; of a cond's branches, which for
    ``lax.platform_dependent`` are one function computed two ways, the largest: a Pallas
    kernel's branch counts none)."""

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                a = eqn.invars[0].aval
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                    a.shape[i] for i in lc)
            elif name == "conv_general_dilated":
                rhs = eqn.invars[1].aval
                spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
                per_out = rhs.shape[spec[1]] * math.prod(rhs.shape[d] for d in spec[2:])
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_out
            if name == "cond":
                total += max(walk(b.jaxpr) for b in eqn.params["branches"])
                continue
            mult = eqn.params.get("length", 1) if name == "scan" else 1
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        total += mult * walk(inner)
        return total

    return walk(closed_jaxpr.jaxpr)


def measure_peak_tflops(dtype, n: int) -> float:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()

    def run():
        t0 = time.perf_counter()
        for _ in range(10):
            out = f(a, b)
        out.block_until_ready()
        return (time.perf_counter() - t0) / 10

    s, _ = median_step_s(run, 5)
    return 2 * n**3 / s / 1e12


def jax_memory(compiled) -> dict:
    out = {}
    try:
        m = compiled.memory_analysis()
        need = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes)
        out["peak_mem_gib"] = round(need / GIB, 3)
    except Exception as e:  # noqa: BLE001 - not every backend has it
        out["peak_mem_note"] = f"memory_analysis: {type(e).__name__}"
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["process_peak_gib"] = round(stats["peak_bytes_in_use"] / GIB, 3)
    return out


def versions() -> dict:
    v = {"python": platform.python_version(), "jax": jax.__version__,
         "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
         "optax": optax.__version__, "lucid_fn": lucid_fn.__version__}
    for mod in ("torch", "timm", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    try:
        import torch
        v["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return v


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return f"{d.platform}: {d.device_kind}"


# ------------------------------------------------------------------------------- ours


def is_seg(name: str) -> bool:
    return name.startswith(SEG_PREFIX)


def build_ours(name: str, arch: dict, variant_kw: dict, dtype):
    kw = dict(arch, **variant_kw, dtype=dtype)
    backbone = name[len(SEG_PREFIX):] if is_seg(name) else name
    if backbone.startswith("pvt_") and not backbone.startswith("pvt_v2"):
        kw["flavor"] = "paper"
    if is_seg(name):
        kw.update(backbone=backbone, num_classes=SEG_CLASSES)
        if kw.get("img_size", 0) < 224:  # --small
            kw.update(SMALL_SEG, num_classes=10)
        return registry["semantic_fpn"](**kw)
    return registry[name](**kw)


def backbone_config(cfg):
    """The PVT config of a classifier, or of a dense model's backbone."""
    return getattr(cfg, "backbone_config", cfg)


def bench_ours(name, arch, spec, mode, batch, args, dtype) -> dict:
    model = build_ours(name, arch, parse_variant(spec), dtype)
    cfg = model.config
    size = cfg.img_size
    bcfg = backbone_config(cfg)
    row = {"model": name, "impl": "lucid_fn", "variant": spec, "mode": mode, "batch": batch,
           "dtype": jnp.dtype(dtype).name, "scan_blocks": bcfg.scan_blocks, "remat": bcfg.remat}
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, size, size, 3), jnp.float32)
    params = jax.jit(model.init)(kp)
    row["params"] = lucid_fn.count_params(params)
    if mode in ("infer", "latency"):
        fn = jax.jit(model.apply)
        t0 = time.perf_counter()
        compiled = fn.lower(params, x).compile()
        row["compile_s"] = round(time.perf_counter() - t0, 2)

        def step():
            return compiled(params, x)
    else:
        labels = (batch, size, size) if is_seg(name) else (batch,)  # per pixel: masks
        y = jax.random.randint(ky, labels, 0, max(cfg.num_classes, 1))
        opt = optax.adamw(1e-3, weight_decay=0.05)
        state = {"params": params, "opt": jax.jit(opt.init)(params),
                 "rng": jax.random.key(1)}

        def train_step(params, opt_state, rng, x, y):
            rng, sub = jax.random.split(rng)

            def loss_fn(p):
                # float32, as autocast's cross_entropy: bfloat16 logits (logits_dtype) too
                logits = model.apply(p, x, train=True, rng=sub).astype(jnp.float32)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, rng, loss

        fn = jax.jit(train_step, donate_argnums=(0, 1, 2))
        t0 = time.perf_counter()
        compiled = fn.lower(state["params"], state["opt"], state["rng"], x, y).compile()
        row["compile_s"] = round(time.perf_counter() - t0, 2)

        def step():
            state["params"], state["opt"], state["rng"], loss = compiled(
                state["params"], state["opt"], state["rng"], x, y)
            return loss

    row.update(jax_memory(compiled))
    for _ in range(args.warmup):
        jax.block_until_ready(step())
    if mode == "latency":
        row.update(latency_stats(lambda: jax.block_until_ready(step()), batch, args))
        return row

    def run():
        t0 = time.perf_counter()
        for _ in range(args.iters):
            out = step()
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / args.iters

    s, all_s = median_step_s(run, args.repeats)
    row.update(step_ms=round(s * 1e3, 3), img_s=round(batch / s, 1),
               step_ms_repeats=[round(t * 1e3, 3) for t in all_s])
    if args.profile == "all" or (args.profile == "first" and spec == args.variants[0]):
        row["profile"] = profile_ops(step, args, f"{name}_{mode}_{spec}".replace("=", "-")
                                     .replace(",", "_"), compiled)
    return row


def op_category(name: str) -> str:
    """A kernel or XLA op name from the trace, by what does the work."""
    if name.startswith("lucid_fn_fused"):  # before the names' "transpose" and "gemm"
        return "lucid_fn kernels"
    if name.startswith(("nvjet", "sm90_xmma_gemm", "cutlass", "gemm")) and "fusion" not in name:
        return "cuBLAS gemm"
    if name.startswith(("gemm_fusion", "triton_gemm")):
        return "XLA gemm fusion"
    if name.startswith(("conv", "wgrad", "dgrad", "sm80_xmma", "sm90_xmma", "cudnn")):
        return "cuDNN conv"
    if name.startswith("loop_"):
        return "loop fusion (elementwise)"
    if name.startswith("input_"):
        return "input fusion (reduction)"
    if name.startswith(("fusion", "triton_softmax", "triton")):
        return "other fusion"
    if "transpose" in name or name.startswith("copy"):
        return "transpose/copy"
    return "other"


def profile_ops(step, args, tag: str, compiled) -> dict:
    """Device time per op over 3 steps (jax.profiler), by op and by category."""
    import glob
    import shutil
    import tempfile

    from jax.profiler import ProfileData

    logdir = tempfile.mkdtemp(prefix="lucid_prof_")
    try:
        with jax.profiler.trace(logdir):
            for _ in range(3):
                out = step()
            jax.block_until_ready(out)
        files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(files[0])
        per_line: dict = {}
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                agg = per_line.setdefault(line.name, {})
                for ev in line.events:
                    a = agg.setdefault(ev.name, [0.0, 0])
                    a[0] += ev.duration_ns / 1e3 / 3
                    a[1] += 1
        line_name = next((n for n in per_line if n == "XLA Ops"), None)
        if line_name is None:  # fall back to the busiest line
            line_name = max(per_line, key=lambda n: sum(v[0] for v in per_line[n].values()),
                            default=None)
        if line_name is None:
            return {"note": "no device plane in the trace"}
        ops = per_line[line_name]
        total = sum(v[0] for v in ops.values())
        rows = sorted(ops.items(), key=lambda kv: -kv[1][0])
        cats: dict = {}
        for k, v in rows:
            c = op_category(k)
            cats[c] = cats.get(c, 0.0) + v[0]
        if args.out and args.dump_hlo:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{args.name}_{tag}.hlo.txt"), "w") as f:
                f.write(compiled.as_text())
        return {"line": line_name, "total_us_per_step": round(total, 1),
                "categories": {c: round(v, 1) for c, v in sorted(cats.items(),
                                                                  key=lambda kv: -kv[1])},
                "lines": {n: round(sum(v[0] for v in a.values()), 1)
                          for n, a in per_line.items()},
                "ops": [{"op": k, "us": round(v[0], 1), "share": round(v[0] / total, 4),
                         "count": v[1] // 3} for k, v in rows if v[0] >= 1.0]}
    except Exception as e:  # noqa: BLE001 - a profile is a bonus, never a failure
        return {"note": f"profile failed: {type(e).__name__}: {e}"[:500]}
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


# ------------------------------------------------------------------------- references


def torch_semantic_fpn(cfg):
    """Semantic FPN in plain torch (mmsegmentation's FPN + FPNHead, GroupNorm for SyncBN)
    on timm's PVT v2 as a features_only backbone: the network registry["semantic_fpn"]
    builds, for timing."""
    import timm
    import torch
    from torch import nn as tnn
    from torch.nn import functional as F

    b = cfg.backbone_config
    if not cfg.backbone.startswith("pvt_v2"):
        raise ValueError("the torch reference of semantic_fpn takes a PVT v2 backbone (timm)")

    class TorchSemanticFPN(tnn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model(
                cfg.backbone, pretrained=False, features_only=True, depths=b.depths,
                embed_dims=b.embed_dims, num_heads=b.num_heads, mlp_ratios=b.mlp_ratios,
                sr_ratios=b.sr_ratios)
            c, h = cfg.fpn_channels, cfg.head_channels
            self.lateral = tnn.ModuleList(tnn.Conv2d(d, c, 1) for d in b.embed_dims)
            self.fpn = tnn.ModuleList(tnn.Conv2d(c, c, 3, padding=1) for _ in b.embed_dims)
            heads = []
            for i in range(4):
                layers = []
                for j in range(max(1, i)):
                    layers += [tnn.Conv2d(c if j == 0 else h, h, 3, padding=1, bias=False),
                               tnn.GroupNorm(cfg.norm_groups, h), tnn.ReLU(inplace=True)]
                    if i:
                        layers.append(tnn.Upsample(scale_factor=2, mode="bilinear",
                                                   align_corners=False))
                heads.append(tnn.Sequential(*layers))
            self.heads = tnn.ModuleList(heads)
            self.dropout = tnn.Dropout2d(cfg.head_dropout)
            self.cls = tnn.Conv2d(h, cfg.num_classes, 1)

        def forward(self, x):
            lat = [conv(f) for conv, f in zip(self.lateral, self.backbone(x))]
            for i in range(3, 0, -1):
                lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:],
                                                        mode="nearest")
            outs = [conv(m) for conv, m in zip(self.fpn, lat)]
            y = sum(head(m) for head, m in zip(self.heads, outs))
            y = self.cls(self.dropout(y))
            return F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    return TorchSemanticFPN()


def torch_reference(name: str, cfg):
    """The same network in PyTorch: HF transformers' PVT v1 (paper) or timm's PVT v2;
    Semantic FPN on timm's PVT v2 (torch_semantic_fpn)."""
    if is_seg(name):
        return torch_semantic_fpn(cfg)
    if name.startswith("pvt_v2"):
        import timm

        return timm.create_model(
            name, pretrained=False,
            num_classes=cfg.num_classes, depths=cfg.depths, embed_dims=cfg.embed_dims,
            num_heads=cfg.num_heads, mlp_ratios=cfg.mlp_ratios, sr_ratios=cfg.sr_ratios)
    import transformers

    hf_cfg = transformers.PvtConfig(
        image_size=cfg.img_size, num_labels=cfg.num_classes, depths=list(cfg.depths),
        hidden_sizes=list(cfg.embed_dims), num_attention_heads=list(cfg.num_heads),
        mlp_ratios=[int(r) if float(r).is_integer() else r for r in cfg.mlp_ratios],
        sequence_reduction_ratios=list(cfg.sr_ratios))
    return transformers.PvtForImageClassification(hf_cfg)


TORCH_COMPILE_MODES = {"eager": None, "compiled": "default", "reduce-overhead": "reduce-overhead"}


def bench_torch(name, arch, mode, batch, ref: str, args) -> dict:
    """One torch reference: ``ref`` is ``eager``, ``compiled`` (torch.compile's default
    mode) or ``reduce-overhead`` (torch.compile with CUDA graphs)."""
    import torch

    compile_mode = TORCH_COMPILE_MODES[ref]
    compiled = compile_mode is not None
    impl = f"torch {ref}"
    if getattr(args, "torch_tf32", "default") == "on":  # as XLA takes float32 dots on GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = build_ours(name, arch, {}, jnp.float32).config
    on_gpu = args.device == "gpu"
    dev = torch.device("cuda" if on_gpu else "cpu")
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    row = {"model": name, "impl": impl, "variant": "", "mode": mode, "batch": batch,
           "dtype": f"autocast {args.dtype}" if amp_dtype else "float32"}
    torch.manual_seed(0)
    model = torch_reference(name, cfg).to(dev)
    row["reference"] = type(model).__name__
    model.train(mode == "train")
    row["params"] = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=dev)
    labels = (batch, cfg.img_size, cfg.img_size) if is_seg(name) else (batch,)
    y = torch.randint(0, max(cfg.num_classes, 1), labels, device=dev)
    fwd = torch.compile(model, mode=compile_mode) if compiled else model

    def logits_of(out):
        return out.logits if hasattr(out, "logits") else out

    autocast = (functools.partial(torch.autocast, device_type=dev.type, dtype=amp_dtype)
                if amp_dtype else contextlib.nullcontext)
    if mode in ("infer", "latency"):
        def step():
            with torch.no_grad(), autocast():
                return logits_of(fwd(x))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05,
                                fused=on_gpu or None)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(logits_of(fwd(x)), y)
            loss.backward()
            opt.step()
            return loss

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    row["compile_s" if compiled else "first_call_s"] = round(time.perf_counter() - t0, 2)
    for _ in range(args.warmup):
        step()
    sync()
    if mode == "latency":
        row.update(latency_stats(lambda: (step(), sync()), batch, args))
        return row

    def run():
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            for _ in range(args.iters):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / args.iters
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        return (time.perf_counter() - t0) / args.iters

    s, all_s = median_step_s(run, args.repeats)
    row.update(step_ms=round(s * 1e3, 3), img_s=round(batch / s, 1),
               step_ms_repeats=[round(t * 1e3, 3) for t in all_s])
    if on_gpu:
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    del model, fwd, x, y
    if on_gpu:
        torch.cuda.empty_cache()
    return row


def bench_torch_isolated(name, arch, mode, batch, ref: str, args) -> dict:
    """bench_torch in a fresh Python process. In one process, torch training measured
    after a torch.compile ran slower and jittered (pvt_small eager 1,366 img/s against
    1,739 before any compile; benchmarks/NOTES.md), so on GPU each reference gets its own
    process; ours stay in this one."""
    import subprocess

    job = {"name": name, "arch": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in arch.items()},
           "mode": mode, "batch": batch, "ref": ref,
           "args": {k: getattr(args, k) for k in ("device", "dtype", "iters", "repeats",
                                                   "warmup", "threads", "latency_calls",
                                                   "torch_tf32")}}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--ref-job",
                           json.dumps(job)], capture_output=True, text=True,
                          timeout=args.ref_timeout_s)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('{"model"'):
            return json.loads(line)
    raise RuntimeError(f"reference process exited {proc.returncode}: "
                       f"{(proc.stderr or proc.stdout)[-400:]}")


def ref_job(spec: str) -> None:
    """The child side of bench_torch_isolated: run one reference, print its row."""
    job = json.loads(spec)
    args = argparse.Namespace(**job["args"])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in job["arch"].items()}
    row = bench_torch(job["name"], arch, job["mode"], job["batch"], job["ref"], args)
    row["isolated"] = True
    print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------ output


def add_ratios_and_mfu(rows: list, flops: dict, peak_tflops: float | None) -> None:
    refs = {(r["model"], r["mode"], r["batch"], r["impl"]): r["img_s"]
            for r in rows if r["impl"].startswith("torch") and "img_s" in r}
    for r in rows:
        if "img_s" not in r:
            continue
        gflop = flops.get(r["model"])
        if gflop:
            per_img = gflop * (3 if r["mode"] == "train" else 1)
            r["gflop_per_img"] = round(per_img, 3)
            if peak_tflops:
                r["mfu"] = round(per_img * 1e9 * r["img_s"] / (peak_tflops * 1e12), 4)
        if r["impl"] == "lucid_fn":
            for impl, key in (("torch eager", "vs_torch_eager"),
                              ("torch compiled", "vs_torch_compiled"),
                              ("torch reduce-overhead", "vs_torch_reduce_overhead")):
                ref = refs.get((r["model"], r["mode"], r["batch"], impl))
                if ref:
                    r[key] = round(r["img_s"] / ref, 3)


def one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split()).replace("|", "/")[:limit]


def fmt(v, spec="{:,.0f}"):
    return "-" if v is None else spec.format(v)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"Device: {m['device']}; {', '.join(f'{k} {v}' for k, v in m['versions'].items() if v)}.",
        f"Images {m['img_size']}x{m['img_size']}; ours {m['dtype']} compute, float32 params; "
        f"references torch {'bf16 autocast' if m['dtype'] == 'bfloat16' else 'float32'}. "
        f"Median of {m['repeats']} repeats of {m['iters']} steps. Peak for MFU: "
        f"{fmt(m['peak_tflops'], '{:.3g}')} TFLOP/s ({m['peak_source']}). "
        f"XLA_FLAGS={m['xla_flags'] or '(none)'}.",
        f"Command: `{m['command']}`",
        "",
        "| model | impl | variant | mode | batch | img/s | ms/step (latency: p50 / p90) | "
        "vs torch eager | vs torch compiled | vs reduce-overhead | compile s | peak GiB | MFU |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "img_s" not in r:
            lines.append(f"| {r['model']} | {r['impl']} | {r.get('variant', '')} | "
                         f"{r['mode']} | {r['batch']} | {r.get('note', 'not run')} "
                         "| | | | | | | |")
            continue
        comp = r.get("compile_s", r.get("first_call_s"))
        ms = fmt(r["step_ms"], "{:.2f}")
        if "latency_p90_ms" in r:
            ms += f" / {fmt(r['latency_p90_ms'], '{:.2f}')}"
        lines.append(
            f"| {r['model']} | {r['impl']} | {r.get('variant') or ''} | {r['mode']} | "
            f"{r['batch']} | {fmt(r['img_s'])} | {ms} | "
            f"{fmt(r.get('vs_torch_eager'), '{:.2f}x')} | "
            f"{fmt(r.get('vs_torch_compiled'), '{:.2f}x')} | "
            f"{fmt(r.get('vs_torch_reduce_overhead'), '{:.2f}x')} | {fmt(comp, '{:.1f}')} | "
            f"{fmt(r.get('peak_mem_gib'), '{:.2f}')} | {fmt(r.get('mfu'), '{:.1%}')} |")
    for note in result.get("notes", []):
        lines.append(f"\n- {note}")
    profiles = [(r, r["profile"]) for r in result["rows"] if r.get("profile")]
    for r, p in profiles:
        lines += ["", f"Profile, {r['model']} {r['mode']} ({r['variant']}): "
                  f"{p.get('total_us_per_step', '-')} us of device ops per step "
                  f"(line {p.get('line')}). {p.get('note', '')}", "",
                  "| op (category in italics) | us/step | share | count | |",
                  "|---|---:|---:|---:|---|"]
        for c, us in p.get("categories", {}).items():
            lines.append(f"| *{c}* | {us} | {us / p['total_us_per_step']:.1%} | | |")
        for o in p.get("ops", [])[:15]:
            lines.append(f"| {o['op'][:60]} | {o['us']} | {o['share']:.1%} | {o['count']} | |")
    return "\n".join(lines) + "\n"


def write(result: dict, args, render=None) -> None:
    """``args.out/args.name`` .json and .md (``render(result)``, by default this script's
    table); nothing without ``--out``."""
    if not args.out:
        return
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write((render or markdown)(result))


# -------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), default=None,
                    help="default: gpu if JAX sees one, else cpu")
    ap.add_argument("--small", action="store_true",
                    help="tiny widths, 64x64, batch 2, 1 iteration: a smoke run for tests")
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--modes", nargs="+", choices=("infer", "train", "latency"),
                    default=["infer", "train"])
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="ours, each a variant spec (see the module docstring)")
    ap.add_argument("--refs", nargs="*", choices=tuple(TORCH_COMPILE_MODES),
                    default=["eager", "compiled"], help="torch references to run")
    ap.add_argument("--infer-batch", type=int, nargs="+", default=None)
    ap.add_argument("--train-batch", type=int, nargs="+", default=None)
    ap.add_argument("--latency-batch", type=int, nargs="+", default=None)
    ap.add_argument("--latency-calls", type=int, default=None,
                    help="calls timed one by one in --modes latency")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--iters", type=int, default=None, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--torch-tf32", choices=("default", "on"), default="default",
                    help="float32 references: torch's own TF32 choice (convs only), or TF32 "
                    "matmuls too")
    ap.add_argument("--profile", nargs="?", const="first", choices=("first", "all"),
                    default=None, help="also trace ours (the first variant, or all) and "
                    "keep per-op device times")
    ap.add_argument("--dump-hlo", action="store_true",
                    help="with --profile: write each profiled program's optimised HLO")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip what is left once this many seconds have passed")
    ap.add_argument("--isolate-refs", action=argparse.BooleanOptionalAction, default=None,
                    help="run each torch reference in its own process (default: on GPU)")
    ap.add_argument("--ref-timeout-s", type=float, default=480)
    ap.add_argument("--ref-job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file stem of the results (default: device)")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.device is None:
        args.device = "gpu" if jax.default_backend() == "gpu" else "cpu"
    small = args.small
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    args.infer_batch = args.infer_batch or ([2] if small else [256])
    args.train_batch = args.train_batch or ([2] if small else [128])
    args.latency_batch = args.latency_batch or ([1, 2] if small else [1, 8])
    args.latency_calls = args.latency_calls or (3 if small else 200)
    args.img_size = args.img_size or (64 if small else 224)
    args.iters = args.iters or (1 if small else 10)
    args.repeats = args.repeats or (2 if small else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    args.name = args.name or ("small" if small else args.device)
    if args.isolate_refs is None:
        args.isolate_refs = args.device == "gpu"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.ref_job:
        return ref_job(args.ref_job)
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit("--device gpu, but JAX sees no GPU")
    if args.device == "cpu" and jax.default_backend() != "cpu":
        with jax.default_device(jax.devices("cpu")[0]):
            return run(args)
    return run(args)


def run(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    arch = dict(SMALL_ARCH) if args.small else {}
    arch["img_size"] = args.img_size
    if args.small:
        arch["num_classes"] = 10
    t_start = time.perf_counter()
    result = {"meta": {
        "device": device_name(), "versions": versions(), "date": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]) if args.argv is None else
        "bench.main(" + repr(list(args.argv)) + ")",
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "img_size": args.img_size,
        "dtype": args.dtype, "iters": args.iters, "repeats": args.repeats,
        "small": args.small, "refs_isolated": args.isolate_refs, "torch_tf32": args.torch_tf32,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "arch_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
    }, "rows": [], "notes": []}
    notes = result["notes"]

    if args.peak_tflops:
        peak, source = args.peak_tflops, "given"
    else:
        n = 8192 if args.device == "gpu" else (256 if args.small else 1024)
        peak = float(f"{measure_peak_tflops(dtype, n):.3g}")
        source = f"measured: {n}^3 {args.dtype} matmul in JAX"
    result["meta"].update(peak_tflops=peak, peak_source=source)

    flops = {}
    # Counted on XLA ops only: the fused kernels' bodies are per tile, and the platform
    # switch around them carries both forms.
    for name in args.models:
        m = build_ours(name, arch, {"kernels": "off"}, dtype)
        x = jax.ShapeDtypeStruct((1, args.img_size, args.img_size, 3), jnp.float32)
        params = jax.eval_shape(m.init, jax.random.key(0))
        flops[name] = count_flops(jax.make_jaxpr(m.apply)(params, x)) / 1e9
    result["meta"]["gflop_per_img_forward"] = {k: round(v, 4) for k, v in flops.items()}

    torch_ok = True
    if args.refs:
        try:
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            if args.device == "gpu" and not torch.cuda.is_available():
                notes.append("torch sees no GPU: references skipped")
                torch_ok = False
            result["meta"]["torch_threads"] = torch.get_num_threads()
        except ImportError:
            notes.append("torch is not installed: PyTorch references skipped")
            torch_ok = False

    def over_budget():
        return args.budget_s is not None and time.perf_counter() - t_start > args.budget_s

    def record(row):
        result["rows"].append(row)
        add_ratios_and_mfu(result["rows"], flops, peak)
        write(result, args)
        short = {k: row.get(k) for k in ("model", "impl", "variant", "mode", "batch", "img_s",
                                          "compile_s", "first_call_s", "peak_mem_gib",
                                          "note")}
        print(json.dumps({k: v for k, v in short.items() if v is not None}), flush=True)

    for name in args.models:
        for mode in args.modes:
            batches = {"infer": args.infer_batch, "train": args.train_batch,
                       "latency": args.latency_batch}[mode]
            for batch in batches:
                for spec in args.variants:
                    base = {"model": name, "impl": "lucid_fn", "variant": spec, "mode": mode,
                            "batch": batch}
                    if over_budget():
                        record({**base, "note": "skipped: time budget"})
                        continue
                    try:
                        record(bench_ours(name, arch, spec, mode, batch, args, dtype))
                    except Exception as e:  # noqa: BLE001 - keep the rest of the table
                        record({**base, "note": one_line(f"failed: {type(e).__name__}: {e}")})
                    jax.clear_caches()
                for ref in (args.refs if torch_ok else []):
                    base = {"model": name, "impl": f"torch {ref}", "variant": "", "mode": mode,
                            "batch": batch}
                    if over_budget():
                        record({**base, "note": "skipped: time budget"})
                        continue
                    bench_ref = bench_torch_isolated if args.isolate_refs else bench_torch
                    try:
                        record(bench_ref(name, arch, mode, batch, ref, args))
                    except Exception as e:  # noqa: BLE001
                        record({**base, "note": one_line(f"failed: {type(e).__name__}: {e}")})
    result["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    write(result, args)
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
