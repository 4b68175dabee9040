"""The training loop: ``fit(config)`` trains, evaluates, checkpoints, logs and plots.

    from lucid_fn.train import fit, load_config
    result = fit(load_config("configs/digits.toml", ["optim.lr=3e-4"]))

Outputs in ``train.workdir``: ``config.toml`` (the resolved config), ``metrics.jsonl``
(one JSON object per log step and per evaluation), ``checkpoints/<step>/`` (orbax),
``model.safetensors`` (final params, EMA when on, loadable with ``lucid_fn.weights.load``)
and ``curves.png``; ``.lock`` is held while a run is in it. A run only writes into a folder
that is new, empty or its own (``lucid_fn.train.workdir``; docs/reliability.md).
``metrics.jsonl``, ``curves.png`` and the progress bar are ``lucid_fn.train.metrics``'s.

The host never waits for the device inside the loop except every ``log_every`` steps,
when the pending metrics are fetched in one transfer, and before each checkpoint, whose
steps must all have had a finite loss before it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn import registry, weights
from lucid_fn.train import config as config_lib
from lucid_fn.train import data as data_lib
from lucid_fn.train import datasets as datasets_lib
from lucid_fn.train import distributed
from lucid_fn.train import seg_augment, segmentation
from lucid_fn.train import step as step_lib
from lucid_fn.train import workdir as workdir_lib
from lucid_fn.train.checkpoint import Checkpointer, NonFiniteStateError
from lucid_fn.train.evaluation import check_eval_protocol, eval_plan, run_eval
from lucid_fn.train.metrics import MetricsLog, plot_curves, progress_bar

# Config keys that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = {"train.log_every", "train.eval_every", "train.eval_batch_size",
                     "train.checkpoint_every", "train.keep_checkpoints", "data.workers",
                     "train.workdir"}


class NonFiniteLossError(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    pass


# ------------------------------------------------------------------------ set-up


def model_kwargs(cfg, dataset) -> dict:
    """Builder keywords: the config's, with num_classes / in_channels / img_size taken from
    the data unless given, and checked against it when given."""
    kw = dict(cfg.model.kwargs)
    for key in ("num_classes", "in_channels", "img_size"):  # compared with the data's below
        if key in kw and (isinstance(kw[key], bool) or not isinstance(kw[key], int)):
            raise config_lib.ConfigError(f"model.kwargs.{key} must be an integer, got "
                                         f"{type(kw[key]).__name__} {kw[key]!r}")
    for key, value in (("num_classes", dataset.num_classes), ("in_channels", dataset.channels),
                       ("img_size", dataset.img_size)):
        if kw.setdefault(key, value) != value and key != "num_classes":
            raise config_lib.ConfigError(
                f"model.kwargs.{key}={kw[key]} does not match the data ({key} {value}); "
                f"remove it from model.kwargs or set data.{'channels' if key == 'in_channels' else key}")
    if kw["num_classes"] < dataset.num_classes:
        raise config_lib.ConfigError(
            f"model.kwargs.num_classes={kw['num_classes']} but the data has "
            f"{dataset.num_classes} classes")
    return kw


def compute_dtype(cfg) -> dict:
    return dict(dtype=jnp.bfloat16) if cfg.train.dtype == "bfloat16" else {}


def build_model(cfg, dataset):
    kw = model_kwargs(cfg, dataset)
    return registry[cfg.model.name](**kw, **compute_dtype(cfg)), kw


SEGMENTATION_OFF = ("augment.mixup_alpha", "augment.cutmix_alpha", "augment.label_smoothing",
                    "augment.crop_scale", "augment.pad_crop")


SEGMENTATION_ONLY = {"augment.scale_range": [], "augment.cat_max_ratio": 1.0,
                     "augment.photometric": False}  # and their values when off


def check_task(cfg, model, dataset) -> None:
    """The model and the data must predict the same thing (a class per image, or one per
    pixel), and the augmentation settings must be the task's, before anything compiles."""
    task = step_lib.task_of(model)
    if task != dataset.task:
        if task == "segment":
            raise config_lib.ConfigError(
                f"{model.name} segments images (a class per pixel) but data.name="
                f"{cfg.data.name!r} has one label per image; use segmentation data: "
                f"digit_scenes, seg_folder, or an npz with masks")
        raise config_lib.ConfigError(
            f"the {dataset.name} data holds segmentation masks but {model.name} classifies "
            f"whole images; use a segmentation model, e.g. model.name = \"semantic_fpn\"")
    if task == "segment":
        for path in SEGMENTATION_OFF:
            if config_lib._get(cfg, path):
                raise config_lib.ConfigError(
                    f"{path} is an image-classification augmentation; segmentation uses "
                    f"augment.scale_range, augment.hflip and the random crop. Remove {path}")
    else:
        for path, off in SEGMENTATION_ONLY.items():
            if config_lib._get(cfg, path) != off:
                raise config_lib.ConfigError(
                    f"{path} is a segmentation augmentation; classifiers use "
                    f"augment.crop_scale, augment.hflip, mixup and cutmix. Remove {path}")
    check_eval_protocol(cfg.data, task)


def check_classes(model, dataset, what) -> None:
    """A model evaluated on data must have a class score for every label."""
    c = model.config
    if not c.num_classes:
        raise config_lib.ConfigError(
            f"{what} is a headless {model.name} (num_classes=0): it outputs features, not "
            f"class scores, so it has no accuracy. Evaluate a model with a head (fine-tune "
            f"one with model.init_from and model.head='reset')")
    if dataset.num_classes > c.num_classes:
        raise datasets_lib.DataError(
            f"{what} has {c.num_classes} classes but the data ({dataset.name}) has "
            f"{dataset.num_classes}: labels {c.num_classes}..{dataset.num_classes - 1} could "
            f"never be predicted. Evaluate it on data of its own classes")


def check_trainable(dataset, batch_size: int) -> None:
    """What the data must hold before anything compiles: two classes (one class is
    always right) and a batch of training examples."""
    if dataset.num_classes < 2:
        raise datasets_lib.DataError(
            f"the {dataset.name} data has {dataset.num_classes} class; a classifier needs at "
            f"least 2 (one class is always right)")
    if len(dataset.train) < batch_size:
        raise datasets_lib.DataError(
            f"the training split has {len(dataset.train)} examples, fewer than one batch of "
            f"{batch_size}; lower train.batch_size")


def step_spec(cfg, model, kw, dataset) -> step_lib.StepSpec:
    """What the compiled steps of a run close over: model, optimizer, normalisation,
    augmentation."""
    mean, std = data_lib.mean_std(cfg.data, dataset.channels)
    tx, schedule = step_lib.make_optimizer(cfg.optim, cfg.train.steps)
    return step_lib.StepSpec(model.apply, tx, schedule, kw["num_classes"], tuple(mean),
                             tuple(std), cfg.augment, cfg.optim.accum_steps,
                             cfg.optim.ema_decay, step_lib.task_of(model))


def augment_fn(cfg, model, img_size: int):
    if step_lib.task_of(model) == "segment":
        return seg_augment.augment_fn(cfg.augment, img_size)
    return data_lib.augment_fn(cfg.augment, img_size)


def check_init_from(cfg) -> None:
    path = cfg.model.init_from
    if path and not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"model.init_from: {path!r} does not exist (or is not a file); "
                                f"give the path of a .safetensors or .pth checkpoint, or \"\" "
                                f"for a random init")


def initial_params(cfg, model, kw, key):
    """Random init, or a checkpoint (fine-tuning) with its head kept or reset."""
    if not cfg.model.init_from:
        return jax.jit(model.init)(key)
    path = cfg.model.init_from
    check_init_from(cfg)
    if step_lib.task_of(model) == "segment":
        from lucid_fn.models import semantic_fpn

        if weights.is_own_file(path) and weights.load(path)[1].name == model.name:
            params, _ = weights.load(path)  # a segmentation run's: checked against the model
            from lucid_fn.models.common import check_params

            check_params(params, jax.eval_shape(model.init, key), model.name)
        else:  # a classifier's checkpoint initialises the backbone
            params = dict(jax.jit(model.init)(key))
            params["backbone"] = semantic_fpn.load_backbone(path, model.config)
        return jax.tree_util.tree_map(jnp.asarray, params)
    params = weights.load_torch_checkpoint(path, cfg.model.name, head=cfg.model.head,
                                           rng=key, **kw)
    return jax.tree_util.tree_map(jnp.asarray, params)


def check_resume(resume, ckpt: Checkpointer) -> bool:
    """Whether to resume. ``resume``: True (there must be a checkpoint), False (there must
    be none: a new run never overwrites an old one) or "auto" (resume if there is one).
    That the checkpoints belong to this config was checked by ``workdir.check_owned``."""
    latest = ckpt.latest_step()
    if resume == "auto":
        resume = latest is not None
    if not resume:
        if latest is not None:
            raise config_lib.ConfigError(
                f"{ckpt.directory.parent} already holds checkpoints (step {latest}); pass "
                f"--resume to continue that run, or choose another train.workdir")
        return False
    if latest is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.directory}")
    return True


# ------------------------------------------------------------------------ evaluation


# ------------------------------------------------------------------------ the loop


def _eval_batch(batch: int, n_devices: int) -> int:
    return -(-batch // n_devices) * n_devices


def on_process_0(fn) -> None:
    """Run ``fn`` on process 0 only, and let every process fail if it failed: a process
    that went on alone would wait forever in the first collective. One process: ``fn()``."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    message = np.zeros(1024, np.uint8)
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, after the others are told)
            error = e
            text = (f"{type(e).__name__}: {error_line(e)}" or "failed").encode()[:1024]
            message[:len(text)] = np.frombuffer(text, np.uint8)
    message = np.asarray(multihost_utils.broadcast_one_to_all(message))
    if error is not None:
        raise error
    if message.any():
        raise config_lib.ConfigError("process 0 stopped the run: " + bytes(
            message[message != 0]).decode(errors="replace"))


def error_line(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def describe(mesh, tc) -> str:
    """Where a run computes: the line to check that every device is used."""
    devices = mesh.devices.ravel()
    pc, n = jax.process_count(), devices.size
    kinds = sorted({d.device_kind for d in devices})
    return (f"training on {n} device{'s' * (n > 1)} ({', '.join(kinds)}) in {pc} "
            f"process{'es' * (pc > 1)}: global batch {tc.batch_size}, "
            f"{tc.batch_size // pc} per process, {tc.batch_size // n} per device; params "
            f"{tc.param_sharding}")


def fit(cfg, *, resume=False, progress: bool = True, callbacks=(), mesh=None,
        cluster: distributed.Cluster | None = None) -> dict:
    """Train as ``cfg`` says. ``resume``: False (new run; the workdir must hold no
    checkpoints), True (continue from the latest checkpoint) or "auto" (either).
    ``callbacks`` are called as ``fn(step, row)`` after each log row. Returns a summary:
    final test accuracy, steps, seconds, workdir, devices.

    ``cluster``: the multi-process job to join (``lucid_fn.train.distributed``); None
    reads it from the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``, or SLURM / Open MPI). ``cfg.train.batch_size`` is the global batch,
    split evenly over the processes, each reading its own part of every batch.

    The workdir is locked for the run (a second run on it is refused) and must be new,
    empty, or this config's run (``lucid_fn.train.workdir``)."""
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto'; got {resume!r}")
    # A Config built or changed in Python skipped load_config's checks: check it whole.
    cfg = config_lib.from_dict(cfg.to_dict())
    distributed.initialize(cluster or distributed.Cluster.from_environ())
    t_start = time.perf_counter()
    mesh = mesh or step_lib.make_mesh()
    n_dev = mesh.devices.size
    if cfg.train.batch_size % (n_dev * cfg.optim.accum_steps):
        raise config_lib.ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by the {n_dev} "
            f"devices times optim.accum_steps={cfg.optim.accum_steps}")
    workdir = workdir_lib.prepare(cfg.train.workdir)
    # Released in reverse order whatever happens: the checkpointer, then the lock.
    with contextlib.ExitStack() as cleanup:
        def lock_and_check():  # one lock per run, however many hosts it spans
            cleanup.enter_context(workdir_lib.WorkdirLock(workdir))
            workdir_lib.check_owned(workdir, cfg)  # before anything in it is written

        on_process_0(lock_and_check)
        return _fit(cfg, workdir, resume, progress, callbacks, mesh, t_start, cleanup)


def _fit(cfg, workdir, resume, progress, callbacks, mesh, t_start, cleanup) -> dict:
    n_dev, tc = mesh.devices.size, cfg.train
    pc, pi = jax.process_count(), jax.process_index()
    if not workdir_lib.has_checkpoints(workdir):
        check_init_from(cfg)  # before the data is read and the steps compile

    dataset = datasets_lib.load(cfg.data, cfg.model.kwargs.get("num_classes"))
    check_trainable(dataset, tc.batch_size)
    model, kw = build_model(cfg, dataset)
    check_task(cfg, model, dataset)
    spec = step_spec(cfg, model, kw, dataset)
    ckpt = Checkpointer(workdir / "checkpoints", tc.keep_checkpoints)
    cleanup.callback(ckpt.close)
    resume = check_resume(resume, ckpt)
    # Written first: a folder holding checkpoints always holds their config.
    on_process_0(lambda: workdir_lib.write_config(workdir, config_lib.to_toml(cfg)))

    key = jax.random.key(tc.seed)
    abstract = jax.eval_shape(lambda k: step_lib.init_state(spec, model.init(k), tc.seed), key)
    img_shape = (dataset.img_size, dataset.img_size, dataset.channels)
    eval_batch = _eval_batch(tc.eval_batch_size, n_dev)
    plan = eval_plan(cfg.data, model)
    train_step, evaluate, shardings, compile_s = step_lib.compile_steps(
        spec, abstract, mesh, tc.param_sharding, tc.batch_size, eval_batch, img_shape,
        whole_images=cfg.data.eval_protocol == "mmseg")
    data_sh = step_lib.batch_sharding(mesh)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    train_it = data_lib.train_iterator(
        dataset.train, batch_size=tc.batch_size, seed=tc.seed,
        augment=augment_fn(cfg, model, dataset.img_size), workers=cfg.data.workers,
        process_index=pi, process_count=pc)
    if resume:
        state, data_state = ckpt.restore(abstract)
        train_it.set_state(data_state)
    else:
        # From host values: every process holds the same ones, and each places its part.
        params = jax.device_get(initial_params(cfg, model, kw, jax.random.fold_in(key, 1)))
        state = jax.jit(lambda p: step_lib.init_state(spec, p, tc.seed),
                        out_shardings=shardings)(params)
    start = int(jax.device_get(state["step"]))
    log = MetricsLog(workdir / "metrics.jsonl", start, writer=pi == 0)
    if progress and pi == 0:
        print(describe(mesh, tc), file=sys.stderr, flush=True)
    bar = progress_bar(tc.steps, start, progress and pi == 0)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    handlers = {}
    if threading_main():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, on_signal)

    pending, window_start, window_steps = [], time.perf_counter(), 0
    last_good = ckpt.latest_step()
    # The model a checkpoint is for, so that `lucid-fn eval` rebuilds it whatever --data.
    meta = {"model": cfg.model.name, "builder_kwargs": weights.encode_builder_kwargs(kw)}
    eval_params = (lambda s: s["ema"]) if cfg.optim.ema_decay else (lambda s: s["params"])

    def check_finite(step: int) -> list:
        """Fetch the pending metrics (a host sync) and stop on a non-finite loss."""
        fetched = jax.device_get(pending)  # arrays cache their host copy: fetched once
        first_step = step - len(fetched) + 1
        for i, m in enumerate(fetched):
            if not math.isfinite(float(m["loss"])):
                raise NonFiniteLossError(
                    f"the loss became {float(m['loss'])} at step {first_step + i}; training "
                    f"stopped. The last good checkpoint is step {last_good} in "
                    f"{ckpt.directory} (untouched). Lower optim.lr, set optim.clip_norm, or "
                    f"use train.dtype=float32, then continue with --resume")
        return fetched

    def flush(step: int) -> dict | None:
        """One log row from the pending metrics, which it clears."""
        nonlocal pending, window_start, window_steps
        if not pending:
            return None
        fetched = check_finite(step)
        elapsed = time.perf_counter() - window_start
        images = window_steps * tc.batch_size
        row = {"step": step,
               "loss": float(np.mean([m["loss"] for m in fetched])),
               "accuracy": float(sum(m["correct"] for m in fetched))
               / max(1, int(sum(m["count"] for m in fetched))),
               "lr": float(fetched[-1]["lr"]),
               "grad_norm": float(fetched[-1]["grad_norm"]),
               "img_per_s": images / elapsed if elapsed > 0 else 0.0,
               "elapsed_s": time.perf_counter() - t_start}
        pending, window_start, window_steps = [], time.perf_counter(), 0
        return row

    result, shown = {}, None
    try:
        step = start
        while step < tc.steps:
            images, labels = next(train_it)
            state, metrics = train_step(state, *step_lib.put_batch((images, labels), data_sh))
            pending.append(metrics)
            step += 1
            window_steps += 1
            last = step == tc.steps
            row = None
            if step % tc.log_every == 0 or last:
                row = flush(step)
                if bar is not None:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}",
                                    img_s=f"{row['img_per_s']:.0f}")
            if (tc.eval_every and step % tc.eval_every == 0) or last:
                flush_row = flush(step)  # a finite check before trusting these params
                row = row or flush_row
                shown = [] if last and spec.task == "segment" else None
                ev = run_eval(evaluate, eval_params(state), dataset.test, eval_batch, data_sh,
                              cfg.data.workers, shown, plan)
                row = {**(row or {"step": step}), **ev}
                window_start = time.perf_counter()  # evaluation time is not training speed
            if row is not None:
                log.write(row)
                for fn in callbacks:
                    fn(step, row)
            # Several processes stop together, at a log step: a checkpoint is a collective.
            stopping = (any_process(stop["signal"] is not None)
                        if pc == 1 or step % tc.log_every == 0 or last else False)
            if step % tc.checkpoint_every == 0 or last or stopping:
                check_finite(step)  # only states reached through finite losses are saved
                try:
                    ckpt.save(step, state, train_it.get_state(), meta)  # refuses non-finite
                except NonFiniteStateError as e:
                    raise NonFiniteLossError(str(e)) from None
                last_good = step
            if stopping:
                ckpt.wait()
                raise Interrupted(f"interrupted at step {step}; checkpoint saved in "
                                  f"{ckpt.directory}; continue with --resume")
        ckpt.wait()
        final = log.rows[-1] if log.rows else {}  # none: metrics.jsonl was deleted
        result = {"test_accuracy": final.get("test_accuracy"), "steps": tc.steps,
                  **({"test_miou": final.get("test_miou"),
                      "test_pixel_accuracy": final.get("test_pixel_accuracy")}
                     if spec.task == "segment" else {}),
                  "start_step": start,
                  "seconds": time.perf_counter() - t_start, "compile_seconds": compile_s,
                  "workdir": str(workdir), "devices": n_dev, "processes": pc}
        # A finished run run again keeps its files (the state was only restored).
        if start < tc.steps or not (workdir / "model.safetensors").exists():
            # Gathered by every process (FSDP leaves are split over hosts), written by one.
            whole = eval_params(state) if pc == 1 else jax.jit(
                lambda p: p, out_shardings=step_lib.replicated(mesh))(eval_params(state))

            def export():
                params = jax.device_get(whole)  # finite: checked when saved
                weights.save(workdir / "model.safetensors", params, cfg.model.name, **kw)
                plot_curves(log.rows, workdir / "curves.png")
                if shown:
                    segmentation.plot_predictions(*shown[0], kw["num_classes"],
                                                  workdir / "predictions.png")

            on_process_0(export)
    finally:
        data_lib.close(train_it)
        if bar is not None:
            bar.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return result


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _data_config(base, fields: dict, **model_fields):
    """``base`` with ``fields`` (``--data``) and the model's image size and channels,
    every key and value checked."""
    data_cfg = config_lib.from_dict({**dataclasses.asdict(base), **fields, **model_fields},
                                    config_lib.DataConfig, "data")
    config_lib.validate_section(data_cfg, "data")
    return data_cfg


def evaluate_file(path, data=None, *, batch_size: int = 256, use_ema: bool = True) -> dict:
    """Accuracy of a checkpoint on a dataset's test split. ``path``: a ``.safetensors``
    written by ``lucid_fn.weights.save`` (e.g. a run's model.safetensors), or a run's
    workdir (its latest orbax checkpoint, EMA params when the run kept them). ``data``:
    data config fields (at least ``name``, e.g. ``{"name": "npz", "path": ...}``); a
    workdir defaults to its own data. Images are read at the model's size and channels."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    path = pathlib.Path(path)
    data = dict(data or {})
    if path.is_dir():
        if not (path / "config.toml").is_file():
            raise FileNotFoundError(f"{path} is not a training workdir (no config.toml)")
        cfg = config_lib.load_config(path / "config.toml")
        ckpt = Checkpointer(path / "checkpoints", cfg.train.keep_checkpoints, create=False)
        try:
            meta = ckpt.meta()
            if meta is None:  # a checkpoint of an older version: the model from the data
                data_cfg = _data_config(cfg.data, data)
                dataset = datasets_lib.load(data_cfg, cfg.model.kwargs.get("num_classes"))
                model, kw = build_model(cfg, dataset)
            else:
                kw = weights.decode_builder_kwargs(meta["builder_kwargs"])
                model = registry[meta["model"]](**kw, **compute_dtype(cfg))
                data_cfg = _data_config(cfg.data, data, img_size=model.config.img_size,
                                        channels=model.config.in_channels)
                dataset = datasets_lib.load(data_cfg)  # check_classes bounds the labels
            check_classes(model, dataset, f"the run in {path}")
            spec = step_spec(cfg, model, kw, dataset)
            abstract = jax.eval_shape(lambda k: step_lib.init_state(spec, model.init(k), 0),
                                      jax.random.key(0))
            state, _ = ckpt.restore(abstract)
        finally:
            ckpt.close()
        params = state["ema"] if use_ema and "ema" in state else state["params"]
        step = int(state["step"])
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        params, model = weights.load(path)
        if "name" not in data:
            raise config_lib.ConfigError("evaluating a .safetensors file needs a dataset "
                                         "(--data digits, --data /path/to/folder, ...)")
        c = model.config
        data_cfg = _data_config(config_lib.DataConfig(), data, img_size=c.img_size,
                                channels=c.in_channels)
        dataset = datasets_lib.load(data_cfg)  # check_classes bounds the labels
        check_classes(model, dataset, str(path))
        mean, std = data_lib.mean_std(data_cfg, dataset.channels)
        spec = step_lib.StepSpec(model.apply, None, None, c.num_classes, tuple(mean),
                                 tuple(std), None, task=step_lib.task_of(model))
        step = None
    if spec.task != dataset.task:
        raise config_lib.ConfigError(
            f"{model.name} {'segments' if spec.task == 'segment' else 'classifies'} images "
            f"but the {dataset.name} data is for "
            f"{'segmentation' if dataset.task == 'segment' else 'classification'}; "
            f"evaluate it on data of its task")
    check_eval_protocol(data_cfg, spec.task)
    mesh = step_lib.make_mesh()
    batch = _eval_batch(batch_size, mesh.devices.size)
    evaluate = jax.jit(lambda p, x, y, v, *s: step_lib.eval_step(spec, p, x, y, v, *s))
    out = run_eval(evaluate, params, dataset.test, batch, step_lib.batch_sharding(mesh),
                   plan=eval_plan(data_cfg, model))
    return {**out, "model": model.name, "step": step}
