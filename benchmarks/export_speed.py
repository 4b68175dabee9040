"""Inference speed of an exported model on the CPU: the ONNX graph under onnxruntime beside
our jitted ``apply``, the StableHLO artifact, and torch eager (timm's model, untrained).

    .venv/bin/python benchmarks/export_speed.py                  # pvt_v2_b0 at 224, batch 1 and 8
    .venv/bin/python benchmarks/export_speed.py --smoke          # a tiny model, a few calls

float32 throughout. torch and timm are not dependencies: without them the torch row is
left out with a message. Results go to ``--out`` as JSON named by date, device, versions
and model (``--smoke`` writes to a temporary folder: its timings mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from bench import device_name, versions  # benchmarks/ is the script's folder
from lucid_fn import export, registry

SMOKE = dict(img_size=64, embed_dims=[16, 32, 40, 64], depths=[1, 1, 1, 1])


def per_batch_seconds(run, x, iters: int, repeats: int) -> float:
    """The median over ``repeats`` of the mean time of ``iters`` calls (after a warm-up)."""
    run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            run(x)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def ours(model, params):
    apply = jax.jit(model.apply)
    return lambda x: apply(params, x).block_until_ready()


def stablehlo(model, params):
    exported = export.to_stablehlo(model, params, platforms=("cpu",))
    call = jax.jit(exported.call)
    return lambda x: call(x).block_until_ready()


def onnxruntime_session(model, params):
    import onnxruntime

    proto = export.to_onnx(model, params)
    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})


def torch_eager(name: str, kwargs: dict):
    """timm's model of the same name and shape, untrained, in eval mode: NCHW input."""
    import timm
    import torch

    timm_kw = {k: v for k, v in kwargs.items() if k in ("embed_dims", "depths")}
    net = timm.create_model(name, pretrained=False, num_classes=kwargs.get("num_classes", 1000),
                            **timm_kw).eval()

    def run(x):
        with torch.no_grad():
            return net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return run


def device_slug() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu{os.cpu_count()}core"
    return d.device_kind.replace(" ", "")


def result_name(model: str, vs: dict) -> str:
    torch_part = f"_torch{vs['torch']}" if vs.get("torch") else ""
    return (f"{datetime.date.today().isoformat()}_{device_slug()}_jax{vs['jax']}"
            f"_ort{vs['onnxruntime']}{torch_part}_{model}_export_infer_f32")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pvt_v2_b0")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 2 calls: checks it runs")
    ap.add_argument("--out", default=None, help="folder for the JSON (default "
                    "benchmarks/results; a temporary folder with --smoke)")
    args = ap.parse_args(argv)
    kwargs = dict(SMOKE) if args.smoke else {"img_size": args.img_size}
    iters, repeats = (2, 1) if args.smoke else (args.iters, args.repeats)
    model = registry[args.model](**kwargs)
    params = model.init(jax.random.key(0))
    impls = {"lucid_fn jit(apply)": lambda: ours(model, params),
             "jax.export artifact": lambda: stablehlo(model, params),
             "onnxruntime (ONNX)": lambda: onnxruntime_session(model, params),
             "torch eager (timm)": lambda: torch_eager(args.model, kwargs)}
    vs = versions()
    try:
        import onnxruntime
        vs["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        raise SystemExit(f"onnxruntime is not installed: {export.EXPORT_EXTRA}") from None
    rows, notes = [], []
    size = model.config.img_size
    for impl, make in impls.items():
        try:
            run = make()
        except ImportError as e:
            notes.append(f"{impl} left out: {e.name} is not installed (pip install torch timm)")
            print(notes[-1])
            continue
        for b in args.batches:
            x = np.random.default_rng(0).uniform(size=(b, size, size, 3)).astype(np.float32)
            s = per_batch_seconds(run, x, iters, repeats)
            rows.append({"impl": impl, "batch": b, "ms_per_batch": round(s * 1e3, 3),
                         "img_s": round(b / s, 2)})
            print(f"{impl:<22} batch {b:>3}: {s * 1e3:9.2f} ms  {b / s:9.1f} img/s", flush=True)
    result = {"meta": {"model": args.model, "builder_kwargs": kwargs, "dtype": "float32",
                       "device": device_name(), "versions": vs, "iters": iters,
                       "repeats": repeats, "smoke": args.smoke, "onnx_opset": export.OPSET,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat()},
              "rows": rows, "notes": notes}
    out = args.out or (tempfile.mkdtemp(prefix="export_speed_") if args.smoke
                       else os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, result_name(args.model, vs) + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
