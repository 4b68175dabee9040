"""Data-parallel scaling of the training step over the GPUs of one host: lucid_fn's step
(what ``lucid-fn train`` compiles: ``lucid_fn.train.step``) replicated and FSDP, in one
process per host or one per GPU, against torch DDP (``torchrun``) on the same machine.

    PYTHONUNBUFFERED=1 python benchmarks/scaling.py --out OUT --name h100x8

For each model, sharding, GPU count (default 1, 2, 4, 8 up to what ``nvidia-smi`` lists) and
launch, a fresh set of processes trains on a fixed synthetic batch (``--feed host`` puts a new
host batch every step instead, as training does) at ``--per-device-batch`` images per GPU
(global batch = that times the GPUs), bf16 compute with float32 params, AdamW:

- ``host``: one process that sees the n GPUs (``CUDA_VISIBLE_DEVICES``); ``gpu``: n processes
  of one GPU each, joined by ``jax.distributed`` through ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, as docs/training.md launches them.
- Throughput: the global batch over the median step time (``--repeats`` of ``--iters``
  steps); scaling efficiency: img/s on n GPUs over n times img/s on one GPU (same model and
  sharding). Peak memory per GPU: the largest ``peak_bytes_in_use`` of the process's GPUs, and
  XLA's memory analysis of the compiled step. Collectives: from a ``jax.profiler`` trace of
  3 steps on process 0, the device time of all-reduce / all-gather / reduce-scatter ops (and
  NCCL kernels) per step and GPU, beside the device time of all ops; overlapped with
  compute or not, it is their duration.
- torch DDP (``--torch``): HF transformers' PvtForImageClassification (v1, the paper's
  network) or timm's pvt_v2, ``torch.compile``d (``--torch-eager`` also eager), bf16 autocast,
  fused AdamW, launched with ``torchrun --nproc_per_node n`` (NCCL).

On a CPU, ``--small`` smoke-runs every path at tiny shapes with forced host devices
(``--xla_force_host_platform_device_count``; gloo across processes)::

    python benchmarks/scaling.py --device cpu --small --gpus 1 2 --out /tmp/scaling

Results go to ``<out>/<name>.json`` and ``.md``, rewritten after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import bench  # benchmarks/ is the script's folder: its result writer

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("pvt_v2_b2", "pvt_small")
GIB = 2**30
COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|"
                        r"allreduce|allgather|reducescatter|nccl", re.I)


# ------------------------------------------------------------------ the child: ours


def ours_job(job: dict) -> dict:
    """One measurement in this process (one of ``JAX_NUM_PROCESSES`` when launched per
    GPU); process 0 returns the row."""
    from lucid_fn.train import distributed

    distributed.initialize(distributed.Cluster.from_environ())
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, HERE)
    import bench
    from lucid_fn.train import config as config_lib
    from lucid_fn.train import step as step_lib

    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in job["arch"].items()}
    dtype = jnp.bfloat16 if job["dtype"] == "bfloat16" else jnp.float32
    model = bench.build_ours(job["model"], arch, {}, dtype)
    cfg = model.config
    mesh = step_lib.make_mesh()
    n, pc, pi = mesh.devices.size, jax.process_count(), jax.process_index()
    batch = job["per_device_batch"] * n
    tx, schedule = step_lib.make_optimizer(config_lib.OptimConfig(), 10**6)
    spec = step_lib.StepSpec(model.apply, tx, schedule, cfg.num_classes, (0.5,) * 3,
                             (0.5,) * 3, config_lib.AugmentConfig())
    abstract = jax.eval_shape(lambda k: step_lib.init_state(spec, model.init(k), 0),
                              jax.random.key(0))
    img_shape = (cfg.img_size, cfg.img_size, cfg.in_channels)
    train, _, shardings, compile_s = step_lib.compile_steps(
        spec, abstract, mesh, job["sharding"], batch, n, img_shape)
    params = jax.device_get(jax.jit(model.init)(jax.random.key(0)))
    state = jax.jit(lambda p: step_lib.init_state(spec, p, 0), out_shardings=shardings)(params)
    del params
    rng = np.random.default_rng(pi)
    local = batch // pc
    host = (rng.integers(0, 256, (local,) + img_shape, dtype=np.uint8),
            rng.integers(0, cfg.num_classes, (local,), dtype=np.int32))
    data = step_lib.batch_sharding(mesh)
    fixed = step_lib.put_batch(host, data)

    def step(state):
        x, y = fixed if job["feed"] == "device" else step_lib.put_batch(host, data)
        return train(state, x, y)

    for _ in range(job["warmup"]):
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        for _ in range(job["iters"]):
            state, metrics = step(state)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / job["iters"])
    s = statistics.median(times)
    row = {"impl": "lucid_fn", "model": job["model"], "sharding": job["sharding"],
           "launch": job["launch"], "gpus": n, "processes": pc,
           "batch_per_gpu": job["per_device_batch"], "global_batch": batch,
           "feed": job["feed"], "dtype": job["dtype"], "compile_s": round(compile_s, 2),
           "step_ms": round(s * 1e3, 3), "img_s": round(batch / s, 1),
           "step_ms_repeats": [round(t * 1e3, 3) for t in times]}
    row.update(memory(train, jax))
    if job["profile"]:
        logdir = tempfile.mkdtemp(prefix="lucid_scaling_") if pi == 0 else None
        with jax.profiler.trace(logdir) if pi == 0 else contextlib.nullcontext():
            for _ in range(3):
                state, metrics = step(state)
            jax.block_until_ready(metrics)
        if pi == 0:
            row["profile"] = collective_time(logdir, 3, jax.local_device_count())
            shutil.rmtree(logdir, ignore_errors=True)
    row["versions"] = bench.versions()
    row["device"] = bench.device_name()
    return row if pi == 0 else None


def memory(compiled, jax) -> dict:
    out = {}
    try:
        m = compiled.memory_analysis()
        out["xla_peak_gib"] = round((m.argument_size_in_bytes + m.output_size_in_bytes
                                     - m.alias_size_in_bytes + m.temp_size_in_bytes) / GIB, 3)
    except Exception as e:  # noqa: BLE001 - not every backend has it
        out["memory_note"] = f"memory_analysis: {type(e).__name__}"
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    if all(p is not None for p in peaks):
        out["peak_gib_per_gpu"] = round(max(peaks) / GIB, 3)
    return out


def collective_time(logdir: str, steps: int, local_devices: int) -> dict:
    """Device time per step and device: all ops, and collective ops among them."""
    import glob

    try:
        from jax.profiler import ProfileData

        files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(files[0])
        total = coll = 0.0
        names = {}
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                # XLA's op line where there is one; NCCL kernels appear on the stream lines.
                if line.name not in ("XLA Ops",) and not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    us = ev.duration_ns / 1e3
                    if line.name == "XLA Ops":
                        total += us
                    if COLLECTIVE.search(ev.name) and (line.name == "XLA Ops"
                                                       or "nccl" in ev.name.lower()):
                        coll += us
                        key = ev.name.split(".")[0][:40]
                        names[key] = names.get(key, 0.0) + us
        if not total:
            return {"note": "no device ops in the trace (CPU?)"}
        per = steps * local_devices
        return {"device_us_per_step": round(total / per, 1),
                "collective_us_per_step": round(coll / per, 1),
                "collective_share": round(coll / total, 4),
                "collectives": {k: round(v / per, 1) for k, v in
                                sorted(names.items(), key=lambda kv: -kv[1])[:8]}}
    except Exception as e:  # noqa: BLE001 - a profile is a bonus, never a failure
        return {"note": f"profile failed: {type(e).__name__}: {e}"[:300]}


# ------------------------------------------------------------------ the child: torch DDP


def torch_job(job: dict) -> dict:
    """One rank of torch DDP under torchrun; rank 0 returns the row."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, HERE)
    import bench
    import jax.numpy as jnp

    on_gpu = torch.cuda.is_available() and job["device"] == "gpu"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dev = torch.device(f"cuda:{local_rank}" if on_gpu else "cpu")
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in job["arch"].items()}
    cfg = bench.build_ours(job["model"], arch, {}, jnp.float32).config
    torch.manual_seed(0)
    model = bench.torch_reference(job["model"], cfg).to(dev).train()
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if on_gpu else None)
    fwd = torch.compile(ddp) if job["compiled"] else ddp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05,
                            fused=on_gpu or None)
    b = job["per_device_batch"]
    x = torch.randn(b, 3, cfg.img_size, cfg.img_size, device=dev)
    y = torch.randint(0, cfg.num_classes, (b,), device=dev)
    amp = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
           if job["dtype"] == "bfloat16" else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            out = fwd(x)
            loss = torch.nn.functional.cross_entropy(getattr(out, "logits", out), y)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(job["warmup"]):
        step()
    sync()
    times = []
    for _ in range(job["repeats"]):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(job["iters"]):
            step()
        sync()
        times.append((time.perf_counter() - t0) / job["iters"])
    s = statistics.median(times)
    row = {"impl": "torch DDP" + (" compiled" if job["compiled"] else " eager"),
           "model": job["model"], "sharding": "replicated", "launch": "gpu", "gpus": world,
           "processes": world, "batch_per_gpu": b, "global_batch": b * world,
           "dtype": f"autocast {job['dtype']}", "first_call_s": round(first, 2),
           "step_ms": round(s * 1e3, 3), "img_s": round(b * world / s, 1),
           "step_ms_repeats": [round(t * 1e3, 3) for t in times],
           "reference": type(model).__name__, "torch": torch.__version__}
    if on_gpu:
        row["peak_gib_per_gpu"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    dist.destroy_process_group()
    return row if rank == 0 else None


# ------------------------------------------------------------------ the parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(args, devices: list[int], n_local: int) -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.device == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    else:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + f" --xla_force_host_platform_device_count={n_local}").strip()
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "JAX_LOCAL_DEVICE_IDS"):
        env.pop(name, None)
    return env


def collect(procs, logs, timeout: float) -> dict:
    """Wait for all; the row printed by process 0 (or what went wrong)."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return {"note": f"timed out after {timeout:.0f} s"}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = []
    for out, err in logs:
        out.seek(0), err.seek(0)
        texts.append((out.read(), err.read()))
        out.close(), err.close()
    for out, _ in texts:
        for line in reversed(out.splitlines()):
            if line.startswith('{"impl"'):
                return json.loads(line)
    bad = next((err for p, (_, err) in zip(procs, texts) if p.returncode), texts[0][1])
    return {"note": one_line(f"failed (exit {[p.returncode for p in procs]}): {bad[-400:]}")}


def one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "/")[:400]


def spawn(cmd, env):
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    # Files, not pipes: a rank blocked on a full pipe would stall every other rank.
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True), (out, err)


def run_ours(args, model, sharding, n, launch) -> dict:
    job = {"model": model, "sharding": sharding, "launch": launch, "arch": args.arch,
           "dtype": args.dtype, "per_device_batch": args.per_device_batch, "feed": args.feed,
           "iters": args.iters, "repeats": args.repeats, "warmup": args.warmup,
           "profile": args.profile}
    cmd = [sys.executable, os.path.abspath(__file__), "--job", json.dumps(job)]
    if launch == "host":
        started = [spawn(cmd, child_env(args, list(range(n)), n))]
    else:
        address = f"localhost:{free_port()}"
        started = []
        for i in range(n):
            env = child_env(args, [i], 1)
            env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(n),
                       JAX_PROCESS_ID=str(i))
            started.append(spawn(cmd, env))
    return collect([p for p, _ in started], [f for _, f in started], args.job_timeout_s)


def run_torch(args, model, n, compiled) -> dict:
    job = {"model": model, "arch": args.arch, "dtype": args.dtype, "device": args.device,
           "per_device_batch": args.per_device_batch, "compiled": compiled,
           "iters": args.iters, "repeats": args.repeats, "warmup": args.warmup}
    env = child_env(args, list(range(n)), 1)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", os.path.abspath(__file__), "--torch-job", json.dumps(job)]
    p, files = spawn(cmd, env)
    return collect([p], [files], args.job_timeout_s)


def add_efficiency(rows: list) -> None:
    """img/s on n GPUs over n times img/s on one, per (impl, model, sharding)."""
    one = {(r["impl"], r["model"], r["sharding"]): r["img_s"]
           for r in rows if r.get("gpus") == 1 and "img_s" in r}
    replicated = {(r["impl"], r["model"], r["launch"], r["gpus"]): r["img_s"]
                  for r in rows if r.get("sharding") == "replicated" and "img_s" in r}
    for r in rows:
        base = one.get((r["impl"], r["model"], r["sharding"]))
        if "img_s" in r and base:
            r["efficiency"] = round(r["img_s"] / (r["gpus"] * base), 3)
        ref = replicated.get((r["impl"], r["model"], r["launch"], r.get("gpus")))
        if "img_s" in r and r["sharding"] == "fsdp" and ref:
            r["fsdp_vs_replicated"] = round(r["img_s"] / ref, 3)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"Device: {m['device']}; {', '.join(f'{k} {v}' for k, v in m['versions'].items() if v)}.",
             f"{m['per_device_batch']} images per GPU at {m['img_size']}x{m['img_size']}, "
             f"{m['dtype']}, feed {m['feed']}; median of {m['repeats']} x {m['iters']} steps. "
             f"Command: `{m['command']}`", "",
             "| model | impl | sharding | launch | GPUs | img/s | efficiency | FSDP / repl. | "
             "ms/step | peak GiB/GPU | collectives us/step (share) | compile s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, spec="{:,.0f}": "-" if v is None else spec.format(v)  # noqa: E731
    for r in result["rows"]:
        if "img_s" not in r:
            lines.append(f"| {r['model']} | {r['impl']} | {r.get('sharding', '')} | "
                         f"{r.get('launch', '')} | {r.get('gpus', '')} | {r.get('note', '')} "
                         "| | | | | | |")
            continue
        p = r.get("profile") or {}
        coll = (f"{p['collective_us_per_step']:,.0f} ({p['collective_share']:.0%})"
                if "collective_us_per_step" in p else p.get("note", "-"))
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['sharding']} | {r['launch']} | {r['gpus']} | "
            f"{f(r['img_s'])} | {f(r.get('efficiency'), '{:.2f}')} | "
            f"{f(r.get('fsdp_vs_replicated'), '{:.2f}')} | {f(r['step_ms'], '{:.1f}')} | "
            f"{f(r.get('peak_gib_per_gpu', r.get('xla_peak_gib')), '{:.2f}')} | {coll} | "
            f"{f(r.get('compile_s', r.get('first_call_s')), '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), default=None,
                    help="default: gpu if nvidia-smi lists one")
    ap.add_argument("--small", action="store_true",
                    help="tiny widths, 64x64, 2 images per device, few steps: a smoke run")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--gpus", type=int, nargs="+", default=None,
                    help="device counts (default 1 2 4 8, up to the GPUs listed)")
    ap.add_argument("--sharding", nargs="+", choices=("replicated", "fsdp"),
                    default=["replicated", "fsdp"])
    ap.add_argument("--launch", nargs="+", choices=("host", "gpu"), default=["host", "gpu"],
                    help="host: one process for all GPUs; gpu: one process per GPU")
    ap.add_argument("--per-device-batch", type=int, default=None)
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    ap.add_argument("--feed", choices=("device", "host"), default="device",
                    help="device: one batch put once; host: a host batch put every step")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="trace 3 steps on process 0 for the time in collectives")
    ap.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                    help="torch DDP (torch.compile) on the same GPU counts, if torch imports")
    ap.add_argument("--torch-eager", action="store_true", help="also torch DDP eager")
    ap.add_argument("--job-timeout-s", type=float, default=900)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--torch-job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file stem of the results")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.job or args.torch_job:
        return args
    available = gpu_count()
    args.device = args.device or ("gpu" if available else "cpu")
    small = args.small
    if args.gpus is None:
        top = available if args.device == "gpu" else 2
        args.gpus = [n for n in (1, 2, 4, 8) if n <= max(top, 1)]
    if args.device == "gpu" and max(args.gpus) > available:
        raise SystemExit(f"--gpus {max(args.gpus)}, but nvidia-smi lists {available} GPUs")
    if 1 not in args.gpus:
        args.gpus = [1] + args.gpus  # the base of the efficiency
    args.per_device_batch = args.per_device_batch or (2 if small else 128)
    args.img_size = args.img_size or (64 if small else 224)
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    args.iters = args.iters or (2 if small else 10)
    args.repeats = args.repeats or (1 if small else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    args.name = args.name or ("scaling_small" if small else f"scaling_{args.device}")
    sys.path.insert(0, HERE)
    from bench import SMALL_ARCH

    args.arch = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in (dict(SMALL_ARCH, num_classes=10) if small else {}).items()}
    args.arch["img_size"] = args.img_size
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.job or args.torch_job:
        row = (ours_job if args.job else torch_job)(json.loads(args.job or args.torch_job))
        if row is not None:
            print(json.dumps(row), flush=True)
        return row
    torch_ok = False
    if args.torch:
        try:
            import torch  # noqa: F401

            torch_ok = True
        except ImportError:
            pass
    result = {"meta": {
        "device": None, "versions": {}, "command": " ".join(["python", *sys.argv])
        if args.argv is None else f"scaling.main({args.argv!r})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "per_device_batch": args.per_device_batch, "img_size": args.img_size,
        "dtype": args.dtype, "feed": args.feed, "iters": args.iters, "repeats": args.repeats,
        "gpus": args.gpus, "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "rows": [], "notes": [] if torch_ok or not args.torch else
        ["torch is not installed: the DDP anchor was skipped"]}

    def record(row, **base):
        row = {**base, **row}
        if "versions" in row and not result["meta"]["versions"]:
            result["meta"]["versions"] = row["versions"]
            result["meta"]["device"] = row.get("device")
        row.pop("versions", None), row.pop("device", None)
        result["rows"].append(row)
        add_efficiency(result["rows"])
        bench.write(result, args, render=markdown)
        short = {k: row.get(k) for k in ("impl", "model", "sharding", "launch", "gpus", "img_s",
                                          "efficiency", "peak_gib_per_gpu", "note")}
        print(json.dumps({k: v for k, v in short.items() if v is not None}), flush=True)

    for model in args.models:
        for n in sorted(set(args.gpus)):
            for sharding in args.sharding:
                for launch in (["host"] if n == 1 else args.launch):
                    base = dict(impl="lucid_fn", model=model, sharding=sharding,
                                launch=launch, gpus=n)
                    record(run_ours(args, model, sharding, n, launch), **base)
            for compiled in ([True] + ([False] if args.torch_eager else [])) if torch_ok else []:
                base = dict(impl="torch DDP" + (" compiled" if compiled else " eager"),
                            model=model, sharding="replicated", launch="gpu", gpus=n)
                record(run_torch(args, model, n, compiled), **base)
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
