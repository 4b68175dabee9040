"""The ``lucid-fn`` command.

    lucid-fn list [PATTERN]                 registered models, with parameter counts
    lucid-fn summary NAME [--forward] ...   parameter groups, total, output shape
    lucid-fn convert IN OUT --model NAME    a checkpoint of any known layout -> safetensors
    lucid-fn train [CONFIG] [--set k=v]     train (default: the embedded digits, ~2 min on CPU)
    lucid-fn eval CHECKPOINT [--data ...]   test accuracy of a run or a .safetensors file
    lucid-fn predict MODEL IMAGE ...        top-5 ImageNet classes with published weights
    lucid-fn export MODEL_OR_FILE OUT --format stablehlo|onnx   a model out of Python
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (argparse then names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _builder_kwargs(args) -> dict:
    kw = {} if args.flavor is None else {"flavor": args.flavor}
    if args.num_classes is not None:
        kw["num_classes"] = args.num_classes
    if args.img_size is not None:
        kw["img_size"] = args.img_size
    return kw


def cmd_list(args) -> int:
    import jax

    from lucid_fn import count_params, list_models, registry

    names = list_models(args.pattern)
    if not names:
        print(f"no registered model matches {args.pattern!r}; try 'lucid-fn list'",
              file=sys.stderr)
        return 2
    def count(name, **kw):
        return count_params(jax.eval_shape(registry[name](**kw).init, jax.random.key(0)))

    rows = []
    for name in names:
        # v1 has two flavors (README, "Lucid vs the paper"); v2 one.
        has_flavors = hasattr(registry[name]().config, "flavor")
        paper = f"{count(name, flavor='paper'):,}" if has_flavors else "-"
        rows.append((not has_flavors, count(name), name, paper))
    print(f"{'model':<14} {'params':>16} {'params (paper)':>16}")
    for _, params, name, paper in sorted(rows):  # v1 first, each family by size
        print(f"{name:<14} {params:>16,} {paper:>16}")
    return 0


def cmd_summary(args) -> int:
    import jax
    import jax.numpy as jnp

    from lucid_fn import registry, summary

    model = registry[args.model](**_builder_kwargs(args))
    print(summary(model, batch_size=args.batch_size))
    if args.forward:
        cfg = model.config
        params = jax.jit(model.init)(jax.random.key(args.seed))
        x = jax.random.uniform(jax.random.key(args.seed + 1),
                               (args.batch_size, cfg.img_size, cfg.img_size, cfg.in_channels))
        apply = jax.jit(model.apply)
        t0 = time.perf_counter()
        out = apply(params, x).block_until_ready()
        t1 = time.perf_counter()
        out = apply(params, x).block_until_ready()
        t2 = time.perf_counter()
        finite = bool(jnp.isfinite(out).all())
        print(f"forward on {jax.devices()[0].platform}: output {tuple(out.shape)} "
              f"{out.dtype}, finite={finite}; first call (compile + run) {t1 - t0:.2f} s, "
              f"second call {t2 - t1:.3f} s ({args.batch_size / (t2 - t1):.1f} img/s)")
        if not finite:
            return 1
    return 0


def cmd_convert(args) -> int:
    import jax
    import jax.numpy as jnp

    from lucid_fn import count_params, weights

    kw = _builder_kwargs(args)
    _check_convert_paths(args.input, args.output)
    sd = weights.read_state_dict(args.input)
    layout = weights.detect_layout(weights.unwrap(sd))
    params = weights.from_state_dict(sd, args.model, head=args.head, **kw)
    weights.save(args.output, params, args.model, **kw)
    _, model = weights.load(args.output)
    cfg = model.config
    x = jax.random.uniform(jax.random.key(0), (2, cfg.img_size, cfg.img_size, cfg.in_channels))
    out = jax.jit(model.apply)(params, x)
    finite = bool(jnp.isfinite(out).all())
    print(f"read {args.input}: {layout.name} layout of PVT {layout.family}")
    print(f"wrote {args.output}: {args.model}, {count_params(params):,} parameters")
    print(f"self-check: reloaded and ran a forward pass, output {tuple(out.shape)}, "
          f"finite={finite}")
    return 0 if finite else 1


def _check_convert_paths(source: str, target: str) -> None:
    """The output is a new .safetensors file in a folder we can write, never the input."""
    from lucid_fn import weights

    if not target.endswith(".safetensors"):
        raise ValueError(f"the output {target!r} must end in .safetensors (that is the format "
                         f"written); e.g. {os.path.splitext(target)[0]}.safetensors")
    if os.path.exists(target) and os.path.exists(source) and os.path.samefile(source, target):
        raise ValueError(f"the output {target!r} is the input: converting would replace the "
                         f"checkpoint being read; write to another file")
    if os.path.isdir(target):
        raise ValueError(f"the output {target!r} is a folder; give a file name, e.g. "
                         f"{os.path.join(target, 'model.safetensors')}")
    weights.check_writable(target)


def _batch_or_dynamic(text: str):
    """An argparse type: ``dynamic`` or an integer >= 1."""
    return text if text == "dynamic" else _at_least(1)(text)


_batch_or_dynamic.__name__ = "'dynamic' or an integer >= 1"


def cmd_export(args) -> int:
    from lucid_fn import export

    kw = {k: v for k, v in _builder_kwargs(args).items() if k != "img_size"}
    src, artifact = export.export_source(
        args.source, format=args.format, path=args.output, batch=args.batch,
        img_size=args.img_size, features=args.features, bake_params=not args.params_input,
        opset=args.opset, **kw)
    export.write(artifact, args.output)
    cfg = src.model.config
    side = "symbolic sides" if args.img_size == "dynamic" else f"{cfg.img_size}x{cfg.img_size}"
    what = (f"ONNX opset {args.opset}, params as initialisers" if args.format == "onnx" else
            f"jax.export for {', '.join(artifact.platforms)}, params "
            f"{'an input' if args.params_input else 'baked in'}")
    print(f"read {src.described}")
    print(f"wrote {args.output}: {src.model.name}, {what}, batch {args.batch}, {side}, "
          f"{os.path.getsize(args.output) / 1e6:.1f} MB")
    batch = 2 if args.batch == "dynamic" else args.batch
    diff, scale = export.largest_difference(src, artifact, batch_size=batch,
                                            features=args.features,
                                            bake_params=not args.params_input)
    print(f"self-check on {batch} random images at {cfg.img_size}x{cfg.img_size}: largest "
          f"|exported - apply| = {diff:.3g} (largest |apply| {scale:.3g})")
    return 0 if diff <= 1e-3 * max(scale, 1.0) else 1


def _train_config(args):
    from lucid_fn.train import config as config_lib
    from lucid_fn.train.datasets import parse_data_arg

    overrides = list(args.set or [])
    if args.data:
        overrides += [f"data.{k}={config_lib.toml_value(v)}"
                      for k, v in parse_data_arg(args.data).items()]
    for flag, key in (("workdir", "train.workdir"), ("steps", "train.steps"),
                      ("model", "model.name")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={config_lib.toml_value(getattr(args, flag))}")
    return config_lib.load_config(args.config, overrides)


def _enable_compile_cache() -> None:
    """Keep compiled steps on disk (XLA's persistent cache), so that running the same
    config again starts in seconds. LUCID_FN_COMPILE_CACHE sets the folder; "off" turns
    it off; a JAX_COMPILATION_CACHE_DIR the user set wins."""
    import os

    import jax

    folder = os.environ.get("LUCID_FN_COMPILE_CACHE",
                            os.path.join(os.path.expanduser("~"), ".cache", "lucid_fn", "xla"))
    if folder == "off" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def cmd_train(args) -> int:
    from lucid_fn.train import Interrupted, NonFiniteLossError, fit
    from lucid_fn.train.distributed import Cluster

    cfg = _train_config(args)
    cluster = Cluster.from_environ()  # a partial JAX_* set fails here, before JAX starts
    _enable_compile_cache()
    try:
        # Without --resume, a workdir holding this run's checkpoints is continued (a
        # finished run is just reported again); --new refuses to.
        resume = True if args.resume else (False if args.new else "auto")
        result = fit(cfg, resume=resume, progress=not args.no_progress, cluster=cluster)
    except Interrupted as e:
        print(f"lucid-fn train: {e}", file=sys.stderr)
        return 130
    except NonFiniteLossError as e:
        print(f"lucid-fn train: {e}", file=sys.stderr)
        return 1
    acc, start = result["test_accuracy"], result["start_step"]
    if start == result["steps"]:
        metric = "test mIoU" if "test_miou" in result else "test accuracy"
        acc = result.get("test_miou", acc)
        acc = "unknown (no metrics.jsonl)" if acc is None else f"{acc:.4f}"
        print(f"{cfg.model.name} on {cfg.data.name}: this run had already finished "
              f"({start} steps, checkpoint in {result['workdir']}): {metric} {acc}. "
              f"Use another --workdir (or --new) for a new run.")
        return 0
    resumed = f", continued from step {start}" if start else ""
    import jax

    if jax.process_index() != 0:  # one report per run, however many processes
        return 0
    n, pc = result["devices"], result["processes"]
    where = f" on {n} device{'s' * (n > 1)}" + (f" ({pc} processes)" if pc > 1 else "")
    if result.get("test_miou") is not None:
        print(f"{cfg.model.name} on {cfg.data.name}: test mIoU {result['test_miou']:.4f}, "
              f"pixel accuracy {result['test_pixel_accuracy']:.4f} after "
              f"{result['steps']} steps{where} in {result['seconds']:.1f} s "
              f"(compile {result['compile_seconds']:.1f} s{resumed}); outputs in "
              f"{result['workdir']}")
        return 0
    print(f"{cfg.model.name} on {cfg.data.name}: test accuracy {acc:.4f} after "
          f"{result['steps']} steps{where} in {result['seconds']:.1f} s "
          f"(compile {result['compile_seconds']:.1f} s{resumed}); outputs in "
          f"{result['workdir']}")
    return 0


def cmd_eval(args) -> int:
    from lucid_fn.train import evaluate_file
    from lucid_fn.train.datasets import parse_data_arg

    _enable_compile_cache()
    data = parse_data_arg(args.data) if args.data else None
    if args.eval_protocol:
        data = {**(data or {}), "eval_protocol": args.eval_protocol}
    out = evaluate_file(args.checkpoint, data, batch_size=args.batch_size)
    step = "" if out["step"] is None else f" (step {out['step']})"
    if "test_miou" in out:
        print(f"{out['model']}{step}: test mIoU {out['test_miou']:.4f}, pixel accuracy "
              f"{out['test_pixel_accuracy']:.4f} on {out['test_examples']} images, loss "
              f"{out['test_loss']:.4f}")
        return 0
    print(f"{out['model']}{step}: test accuracy {out['test_accuracy']:.4f} on "
          f"{out['test_examples']} examples, loss {out['test_loss']:.4f}")
    return 0


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read (JPEG, PNG, ...)") from None


def top_classes(probs, k: int) -> list[list[dict]]:
    """Per row of ``probs``, the ``k`` most likely ImageNet-1k classes, most likely first."""
    import numpy as np

    from lucid_fn import imagenet

    names = imagenet.class_names()
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[{"index": int(i), "name": names[i], "probability": float(row[i])} for i in idx]
            for row, idx in zip(probs, order)]


def cmd_predict(args) -> int:
    import json

    import jax
    import numpy as np

    from lucid_fn import imagenet
    from lucid_fn.pretrained import find, pretrained

    entry = find(args.model)
    if entry.labels != "imagenet-1k":
        raise ValueError(f"{entry.name} predicts {entry.labels} classes; predict names "
                         f"ImageNet-1k classes only")
    images = [_read_image(path) for path in args.images]  # before any download: fail fast
    model, params = pretrained(args.model, weights=args.weights)
    x = imagenet.preprocess(images, entry.input)
    probs = np.asarray(jax.nn.softmax(jax.jit(model.apply)(params, x), axis=-1))
    rows = top_classes(probs, args.top)
    if args.json:
        print(json.dumps([{"image": path, "model": entry.name, "top": top}
                          for path, top in zip(args.images, rows)], indent=1))
        return 0
    for path, top in zip(args.images, rows):
        print(f"{path} ({entry.name}):")
        for t in top:
            print(f"  {t['probability']:7.2%}  {t['name']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lucid-fn", description="Pyramid Vision Transformers in JAX")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered models with parameter counts (v1: both flavors)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'pvt*'")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("summary", help="parameter groups, total and output shape of a model")
    p.add_argument("model", help="registered name, e.g. pvt_small ('lucid-fn list' shows all)")
    p.add_argument("--num-classes", type=_at_least(0), default=None)
    p.add_argument("--img-size", type=_at_least(1), default=None)
    p.add_argument("--flavor", default=None, choices=["lucid", "paper"],
                   help="PVT v1 only: 'lucid' (default) or 'paper'")
    p.add_argument("--batch-size", type=_at_least(1), default=1)
    p.add_argument("--forward", action="store_true",
                   help="also initialise the model and run a jitted forward pass")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.set_defaults(fn=cmd_summary)

    p = sub.add_parser("convert", help="convert a checkpoint (Lucid, official, HF, timm "
                       "layouts; .pth/.bin with torch, or .safetensors) to our safetensors")
    p.add_argument("input")
    p.add_argument("output", help="a .safetensors path; written atomically")
    p.add_argument("--model", required=True, help="registered name, e.g. pvt_v2_b0")
    p.add_argument("--num-classes", type=_at_least(0), default=None)
    p.add_argument("--img-size", type=_at_least(1), default=None)
    p.add_argument("--flavor", default=None, choices=["lucid", "paper"],
                   help="PVT v1 only: 'lucid' (default) or 'paper'")
    p.add_argument("--head", default="keep", choices=["keep", "reset"],
                   help="'reset': drop the checkpoint's classifier, start a new one")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("train", help="train a model with optax (default: the embedded digits)")
    p.add_argument("config", nargs="?", default=None,
                   help="a TOML file (configs/*.toml); default: the built-in digits run, "
                        "the same as configs/digits.toml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--data", default=None,
                   help="digits | cifar10:PATH | cifar100:PATH | an image folder | a .npz file")
    p.add_argument("--model", default=None, help="registered name (model.name)")
    p.add_argument("--steps", type=_at_least(1), default=None, help="train.steps")
    p.add_argument("--workdir", default=None, help="train.workdir (default runs/digits)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the workdir from its latest checkpoint "
                        "(default: continue if there is one, start if not)")
    p.add_argument("--new", action="store_true",
                   help="start a new run; an error if the workdir holds checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a run's workdir or a .safetensors file")
    p.add_argument("checkpoint", help="a run's workdir (latest checkpoint) or a .safetensors")
    p.add_argument("--data", default=None, help="as for train; default: the run's data")
    p.add_argument("--batch-size", type=_at_least(1), default=256)
    p.add_argument("--eval-protocol", choices=("square", "mmseg"), default=None,
                   help="segmentation: padded squares, or whole images scored at their own "
                   "size as the PVT papers' code (default: the run's data.eval_protocol)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("predict", help="top-5 ImageNet-1k classes of images, with published "
                       "weights (lucid-fn predict pvt_v2_b0 cat.jpg)")
    p.add_argument("model", help="a model with published weights, e.g. pvt_v2_b0 or "
                   "pvt_small (README, 'Pretrained weights')")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--weights", default=None, help="a local weights file or folder instead "
                   "of the Hugging Face hub")
    p.add_argument("--top", type=_at_least(1), default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(fn=cmd_predict)

    from lucid_fn.export import FORMATS, OPSET

    p = sub.add_parser("export", help="a model out of Python: StableHLO (jax.export) or ONNX, "
                       "checked against apply")
    p.add_argument("source", metavar="MODEL_OR_FILE",
                   help="a registered name (random weights), a .safetensors that convert or "
                        "train wrote, or a training run's workdir")
    p.add_argument("output", help="the file to write (atomically)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--batch", type=_batch_or_dynamic, default="dynamic",
                   help="N, or 'dynamic' (default): a symbolic batch size")
    p.add_argument("--img-size", type=_batch_or_dynamic, default=None,
                   help="N (PVT v1: position embeddings resized), or 'dynamic': symbolic sides "
                        "(PVT v2, stablehlo); default the model's")
    p.add_argument("--features", action="store_true", help="the 4 pyramid maps, not logits")
    p.add_argument("--params-input", action="store_true",
                   help="stablehlo: params as the first input instead of baked in")
    p.add_argument("--opset", type=_at_least(1), default=OPSET, help="onnx: the opset")
    p.add_argument("--num-classes", type=_at_least(0), default=None,
                   help="with a model name only")
    p.add_argument("--flavor", default=None, choices=["lucid", "paper"],
                   help="with a PVT v1 name only: 'lucid' (default) or 'paper'")
    p.set_defaults(fn=cmd_export)
    return ap


def error_line(e: BaseException) -> str:
    """An expected failure as the one line the user sees."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])  # str(KeyError) would quote the message
    if isinstance(e, OSError) and e.strerror and e.filename:  # raised by the OS, not by us
        return f"{e.filename}: {e.strerror}"
    return str(e)


def main(argv=None) -> int:
    """Expected failures (bad names, values, files, data, checkpoints, a busy workdir) are
    one line on stderr and exit code 2; anything else keeps its traceback."""
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.resume and args.new:
        print("lucid-fn train: --resume and --new exclude each other; pass one",
              file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except (KeyError, ValueError, ImportError, OSError) as e:
        print(f"lucid-fn {args.command}: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lucid-fn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
