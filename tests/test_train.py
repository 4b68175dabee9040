"""Training: configs, the optax step, the loop's outputs, checkpoints and resume, failures.

Runs use a 4-block PVT on the embedded digits at 32x32 for a handful of steps; what is
checked is behaviour (files, exact resume, errors), not accuracy, except in the slow test
that runs the README's default job.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lucid_fn import registry, weights
from lucid_fn.train import (ConfigError, NonFiniteLossError, fit, load_config, read_metrics)
from lucid_fn.train import config as config_lib
from lucid_fn.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["model.kwargs={embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], "
         "depths=[1, 1, 1, 1]}",
         "train.steps=6", "train.batch_size=16", "train.log_every=2",
         "train.checkpoint_every=3", "train.eval_batch_size=128"]


def small_config(workdir, *extra):
    return load_config(None, SMALL + [f'train.workdir="{workdir}"', *extra])


def final_params(workdir):
    params, _ = weights.load(pathlib.Path(workdir) / "model.safetensors")
    return params


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """One uninterrupted small run, shared by the tests that read its outputs."""
    workdir = tmp_path_factory.mktemp("run_a")
    result = fit(small_config(workdir), progress=False)
    return workdir, result


# ------------------------------------------------------------------------ configs


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert cfg.train.steps > 0, path


def test_digits_config_is_the_default():
    """`lucid-fn train` with no config must be the run configs/digits.toml describes."""
    assert load_config(ROOT / "configs" / "digits.toml") == load_config(None)


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"optim\.weight_decy.*did you mean weight_decay"):
        load_config(None, ["optim.weight_decy=1e-3"])
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*allowed in \[optim\]: lr,"):
        load_config(None, ["optim.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer, got str"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"optim\.lr must be a number"):
        load_config(None, ['optim.lr="fast"'])
    with pytest.raises(ConfigError, match=r"train\.dtype must be one of"):
        load_config(None, ["train.dtype=float16"])
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(None, ["data.name=cifar10"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.lr"])


def test_overrides_take_toml_literals(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "train.steps=10", "augment.hflip=true",
                             "augment.crop_scale=[0.5, 1.0]", "model.name=pvt_v2_b0"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.augment.hflip) == (3e-4, 10, True)
    assert cfg.augment.crop_scale == [0.5, 1.0] and cfg.model.name == "pvt_v2_b0"
    # An integer where a float is expected is accepted; the resolved config round-trips.
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0
    (tmp_path / "c.toml").write_text(config_lib.to_toml(cfg))
    assert load_config(tmp_path / "c.toml") == cfg


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[train\nsteps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


BAD_VALUES = [
    ("optim.lr=-1e-3", r"optim\.lr must be > 0, got -0\.001"),  # gradient ascent, rc 0
    ("optim.lr=nan", r"optim\.lr must be > 0, got nan"),
    ("optim.b1=1.0", r"optim\.b1 must be in \[0, 1\)"),
    ("optim.b2=1.5", r"optim\.b2 must be in \[0, 1\)"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay must be >= 0"),
    ("optim.final_lr_ratio=-1", r"optim\.final_lr_ratio must be in \[0, 1\]"),
    ("optim.clip_norm=inf", r"optim\.clip_norm must be >= 0, got inf"),
    ("train.checkpoint_every=0", r"train\.checkpoint_every must be in \[1, "),  # crashed late
    ("train.steps=3000000000", r"train\.steps must be in \[1, 2147483647\]"),
    ("train.eval_every=-1", r"train\.eval_every must be in \[0, "),
    ("train.seed=-1", r"train\.seed must be >= 0"),
    ("augment.mixup_alpha=-1", r"augment\.mixup_alpha must be >= 0"),
    ("augment.cutmix_alpha=-0.5", r"augment\.cutmix_alpha must be >= 0"),
    ("augment.mix_prob=5", r"augment\.mix_prob must be in \[0, 1\], got 5\.0"),
    ("augment.pad_crop=-2", r"augment\.pad_crop must be >= 0"),
    ("augment.pad_crop=40", r"augment\.pad_crop=40 is larger than the image"),
    ('augment.crop_scale=["a", 1]', r"augment\.crop_scale must hold numbers in \(0, 1\]"),
    ("data.split_seed=-3", r"data\.split_seed must be >= 0"),
    ("data.workers=-1", r"data\.workers must be >= 0"),
    ("data.std=[0.0]", r"data\.std must hold numbers > 0, got \[0\.0\]"),
    ('data.mean=["a"]', r"data\.mean must hold numbers, got \['a'\]"),
    ("train.workdir=' '", r"train\.workdir is empty"),
    ('model.kwargs.num_classes="10"', r"model\.kwargs: num_classes must be an integer"),
    ("model.kwargs.depths=[1, 1]", r"model\.kwargs: depths must have 4 entries"),
    ("model.kwargs.dtype=bfloat16", r"model\.kwargs\.dtype is set by train\.dtype"),
    ("model.name=pvt_tni", r"model\.name: unknown model 'pvt_tni'. Did you mean: pvt_tiny"),
    ("optim.lr.max=1", r"--set optim\.lr\.max=1: optim\.lr is not a table"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_every_bad_value_is_named_before_anything_runs(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_numeric_setting_has_a_valid_range():
    """A numeric field added without a range would accept any value: this keeps them in
    step with the dataclasses."""
    import typing

    for section, cls in config_lib.SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            path = f"{section}.{name}"
            if hint in (int, float):
                assert path in config_lib.RANGES or path in config_lib.CHOICES, path
            if path in config_lib.RANGES:
                assert hint in (int, float), path
    for path in config_lib.LIST_RANGES:
        section, name = path.split(".")
        assert typing.get_type_hints(config_lib.SECTIONS[section])[name] is list


def test_set_changes_one_key_for_the_built_in_config_and_for_a_file():
    """`--set model.kwargs.drop_path_rate=0.1` adds that keyword; the built-in run used to
    lose its narrow embed_dims (a full-width pvt_tiny trained) where the file merged."""
    for path in (None, ROOT / "configs" / "digits.toml"):
        cfg = load_config(path, ["model.kwargs.drop_path_rate=0.1", "data.img_size=64"])
        assert cfg.model.kwargs == {"embed_dims": [32, 64, 96, 128],
                                    "num_heads": [1, 2, 3, 4], "drop_path_rate": 0.1}, path
        assert cfg.augment.pad_crop == 2 and cfg.data.img_size == 64
    # A whole table set at once replaces the table, in a file or with --set.
    cfg = load_config(None, ["model.kwargs={depths=[1, 1, 1, 1]}"])
    assert cfg.model.kwargs == {"depths": [1, 1, 1, 1]}


# ------------------------------------------------------------------------ optimizer


def test_weight_decay_skips_norms_biases_pos_embed_and_cls_token():
    params = jax.eval_shape(registry["pvt_tiny"](img_size=32, num_classes=3).init,
                            jax.random.key(0))
    mask = step_lib.decay_mask(params)
    assert mask["stage1"]["blocks"]["attn"]["q"]["kernel"] is True
    assert mask["head"]["kernel"] is True
    assert mask["stage1"]["blocks"]["attn"]["q"]["bias"] is False
    assert mask["stage1"]["blocks"]["norm1"]["scale"] is False
    assert mask["stage1"]["pos_embed"] is False
    assert mask["stage4"]["cls_token"] is False


def test_schedule_warms_up_then_decays():
    cfg = load_config(None, ["optim.warmup_steps=10", "train.steps=100", "optim.lr=1e-3",
                             "optim.final_lr_ratio=0.1"])
    _, schedule = step_lib.make_optimizer(cfg.optim, cfg.train.steps)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)
    assert float(schedule(5)) == pytest.approx(5e-4)


def linear_model(num_classes=10, pixels=32 * 32):
    """The step is model-agnostic; a linear classifier keeps these tests' compiles short."""

    def init(key):
        return {"head": {"kernel": 0.01 * jax.random.normal(key, (pixels, num_classes)),
                         "bias": jnp.zeros(num_classes)}}

    def apply(params, x, train=False, rng=None):
        return x.reshape(x.shape[0], -1) @ params["head"]["kernel"] + params["head"]["bias"]

    return init, apply


def _spec(apply, accum=1, ema=0.0, num_classes=10):
    cfg = load_config(None, ["optim.weight_decay=0.1"])
    tx, schedule = step_lib.make_optimizer(cfg.optim, 10)
    return step_lib.StepSpec(apply, tx, schedule, num_classes, (0.5,), (0.5,), cfg.augment,
                             accum, ema)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


def test_gradient_accumulation_matches_one_big_batch():
    init, apply = linear_model()
    params = init(jax.random.key(0))
    images, labels = _batch()
    outs = []
    for accum in (1, 4):
        spec = _spec(apply, accum)
        state = step_lib.init_state(spec, params, 0)
        new, m = jax.jit(lambda s, x, y: step_lib.train_step(spec, s, x, y))(
            state, images, labels)
        outs.append((new["opt_state"], float(m["loss"]), float(m["grad_norm"])))
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-6)
    assert outs[0][2] == pytest.approx(outs[1][2], rel=1e-5)
    # Adam's first moment after one step is (1 - b1) * gradient: the gradients agree, up to
    # float32 rounding of sums taken in another order (relative to each leaf's scale: an
    # entry near zero is a difference of large terms).
    for a, b in zip(jax.tree_util.tree_leaves(outs[0][0]), jax.tree_util.tree_leaves(outs[1][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def test_ema_follows_the_params():
    init, apply = linear_model()
    params = init(jax.random.key(0))
    spec = _spec(apply, ema=0.9)
    state = step_lib.init_state(spec, params, 0)
    new, _ = jax.jit(lambda s, x, y: step_lib.train_step(spec, s, x, y))(state, *_batch())
    for e, p0, p1 in zip(*(jax.tree_util.tree_leaves(t)
                           for t in (new["ema"], params, new["params"]))):
        assert not np.allclose(p0, p1)
        np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, rtol=1e-6, atol=1e-7)


def test_mixup_and_cutmix_targets_are_distributions():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 1)), jnp.float32)
    t = step_lib.soft_targets(jnp.arange(8) % 4, 4, 0.1)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    assert float(t.max()) == pytest.approx(0.9 + 0.1 / 4)
    for kind in ({"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0}):
        cfg = load_config(None, [f"augment.{k}={v}" for k, v in kind.items()]).augment
        mixed, targets = step_lib.mix(jax.random.key(3), x, t, cfg)
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
        assert not np.allclose(mixed, x)
        if "cutmix_alpha" in kind:
            # Each pixel comes from the image or its partner, and the label weight of the
            # image equals the share of its pixels.
            from_self = np.isclose(mixed, x).all(-1).mean(axis=(1, 2))
            lam = (targets - t[::-1]) / (t - t[::-1])
            np.testing.assert_allclose(lam[0, 0], from_self[0], atol=1e-6)


def test_shardings_replicated_or_fsdp():
    mesh = step_lib.make_mesh()
    n = mesh.devices.size
    assert step_lib.fsdp_spec((64, 1024), 8) == jax.sharding.PartitionSpec(None, "data")
    assert step_lib.fsdp_spec((64,), 8) == jax.sharding.PartitionSpec()
    assert step_lib.fsdp_spec((3, 3, 7, 1025), 8) == jax.sharding.PartitionSpec()
    abstract = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
    spec = step_lib.state_shardings(abstract, mesh, "fsdp")["w"].spec
    assert spec == (jax.sharding.PartitionSpec() if n == 1 else
                    jax.sharding.PartitionSpec("data"))


# ------------------------------------------------------------------------ the loop


def test_fit_writes_its_outputs(run_a):
    workdir, result = run_a
    rows = read_metrics(workdir / "metrics.jsonl")
    logs = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6]
    for r in logs:
        assert {"step", "loss", "lr", "img_per_s", "accuracy"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["img_per_s"] > 0
    assert "test_accuracy" in rows[-1] and rows[-1]["test_examples"] == 359
    assert result["test_accuracy"] == rows[-1]["test_accuracy"]
    assert load_config(workdir / "config.toml") == small_config(workdir)
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Checkpoints at 3 and 6 (keep 2); the exported params load as a model.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["3", "6"]
    params, model = weights.load(workdir / "model.safetensors")
    assert model.config.img_size == 32 and model.config.num_classes == 10
    assert model.config.in_channels == 1


def test_interrupted_run_resumes_exactly(run_a, tmp_path):
    """A run that crashes after step 4 (checkpoint at 3), resumed, ends where an
    uninterrupted run ends: same params bit for bit, same logged losses."""
    workdir_a, _ = run_a

    def crash(step, row):
        if step == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(small_config(tmp_path), progress=False, callbacks=[crash])
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="--resume"):
        fit(small_config(tmp_path), progress=False)  # would silently overwrite
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        fit(small_config(tmp_path, "optim.lr=0.1"), resume=True, progress=False)
    fit(small_config(tmp_path), resume=True, progress=False)

    for a, b in zip(jax.tree_util.tree_leaves(final_params(workdir_a)),
                    jax.tree_util.tree_leaves(final_params(tmp_path))):
        np.testing.assert_array_equal(a, b)
    # Log rows average the steps since the previous row; after the resume at step 3 the
    # step-4 row covers step 4 alone, so compare the rows whose windows agree.
    rows_a = {r["step"]: r["loss"] for r in read_metrics(workdir_a / "metrics.jsonl")
              if "loss" in r}
    rows_b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")
              if "loss" in r}
    assert sorted(rows_b) == [2, 4, 6]
    assert (rows_a[2], rows_a[6]) == (rows_b[2], rows_b[6])


def test_sigint_saves_a_checkpoint_and_resume_finishes_the_same(run_a, tmp_path):
    """Ctrl-C: the loop finishes the current step, checkpoints it, and stops; resuming
    gives the uninterrupted run's params."""
    import signal

    def ctrl_c(step, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    from lucid_fn.train import Interrupted

    with pytest.raises(Interrupted, match="interrupted at step 2; checkpoint saved"):
        fit(small_config(tmp_path), progress=False, callbacks=[ctrl_c])
    assert (tmp_path / "checkpoints" / "2").is_dir()
    fit(small_config(tmp_path), resume="auto", progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(final_params(run_a[0])),
                    jax.tree_util.tree_leaves(final_params(tmp_path))):
        np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
    cfg = small_config(tmp_path, "optim.lr=1e30", "train.log_every=1",
                       "train.checkpoint_every=1")
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+).*last good checkpoint is step"):
        fit(cfg, progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert steps and steps[-1] == rows[-1]["step"]  # saved only after its loss was checked
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_fine_tune_from_a_run_with_a_new_head(run_a, tmp_path):
    """model.init_from takes a run's model.safetensors; head="reset" re-initialises the
    classifier (any class count) and keeps everything else."""
    from lucid_fn.train import datasets, loop

    workdir_a, _ = run_a
    source = final_params(workdir_a)
    init_from = f'model.init_from="{workdir_a / "model.safetensors"}"'
    for classes in (10, 12):
        cfg = small_config(tmp_path, init_from, "model.head=reset")
        cfg.model.kwargs["num_classes"] = classes
        model, kw = loop.build_model(cfg, datasets.load(cfg.data))
        params = loop.initial_params(cfg, model, kw, jax.random.key(5))
        assert params["head"]["kernel"].shape == (64, classes)
        assert not np.allclose(params["head"]["kernel"][:, :10], source["head"]["kernel"])
        np.testing.assert_array_equal(params["stage2"]["blocks"]["mlp"]["fc1"]["kernel"],
                                      source["stage2"]["blocks"]["mlp"]["fc1"]["kernel"])
    # Through the loop (same shapes as run_a: its compiled step is reused).
    result = fit(small_config(tmp_path, init_from, "model.head=reset"), progress=False)
    assert result["test_accuracy"] is not None
    keep = small_config(tmp_path / "keep", init_from)
    keep.model.kwargs["num_classes"] = 12
    with pytest.raises(ValueError, match="head"):
        fit(keep, progress=False)


def test_cli_train_and_eval(run_a, tmp_path, capsys):
    from lucid_fn.cli import main

    workdir_a, result = run_a
    assert main(["eval", str(workdir_a)]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {result['test_accuracy']:.4f}" in out and "step 6" in out
    assert main(["eval", str(workdir_a / "model.safetensors"), "--data", "digits"]) == 0
    assert f"test accuracy {result['test_accuracy']:.4f}" in capsys.readouterr().out
    assert main(["eval", str(workdir_a / "model.safetensors")]) == 2
    assert "needs a dataset" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a training workdir" in capsys.readouterr().err
    assert main(["train", "--set", "optim.lr_max=1"]) == 2
    assert "optim.lr_max" in capsys.readouterr().err
    args = ["train", "--no-progress", "--workdir", str(tmp_path), "--steps", "2"]
    # Every training option at once, through the CLI: they compile and run together.
    everything = ["augment.crop_scale=[0.5, 1.0]", "augment.hflip=true",
                  "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0",
                  "augment.label_smoothing=0.1", "optim.warmup_steps=1",
                  "optim.clip_norm=1.0", "optim.ema_decay=0.9", "optim.accum_steps=2",
                  "train.dtype=bfloat16", "data.workers=1"]
    for item in SMALL + everything:
        if not item.startswith("train.steps"):
            args += ["--set", item]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    # Running the same command again reports the finished run instead of failing or
    # overwriting it; --new refuses to touch it.
    assert main(args) == 0
    assert "already finished (2 steps" in capsys.readouterr().out
    assert main(args + ["--new"]) == 2
    assert "--resume" in capsys.readouterr().err


SHARDED_SCRIPT = """
import json, sys
import jax
from lucid_fn.train import fit, load_config, read_metrics
from lucid_fn.train.step import make_mesh
assert jax.device_count() == 8, jax.devices()
out = {}
for mode in ("replicated", "fsdp"):
    cfg = load_config(None, json.loads(sys.argv[1]) + [
        f'train.workdir="{sys.argv[2]}/{mode}"', f'train.param_sharding="{mode}"'])
    fit(cfg, progress=False, mesh=make_mesh(jax.devices()))
    out[mode] = [r["loss"] for r in read_metrics(f"{sys.argv[2]}/{mode}/metrics.jsonl")
                 if "loss" in r]
print(json.dumps(out))
"""


def test_sharded_over_8_devices_matches_one_device(run_a, tmp_path):
    """Data parallel over 8 (CPU) devices, params replicated or FSDP-sharded, gives the
    loss trajectory of one device: run_a's, the same config on this process's one device."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, json.dumps(SMALL),
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    one = [r["loss"] for r in read_metrics(run_a[0] / "metrics.jsonl") if "loss" in r]
    assert len(one) == 3
    # FSDP really splits this model: its larger kernels are sharded 8 ways.
    shapes = jax.eval_shape(registry["pvt_tiny"](
        img_size=32, num_classes=10, in_channels=1, **small_config(tmp_path).model.kwargs).init,
        jax.random.key(0))
    sharded = [a.shape for a in jax.tree_util.tree_leaves(shapes)
               if step_lib.fsdp_spec(a.shape, 8) != jax.sharding.PartitionSpec()]
    assert len(sharded) >= 3, sharded
    np.testing.assert_allclose(losses["replicated"], one, rtol=2e-5)
    np.testing.assert_allclose(losses["fsdp"], one, rtol=2e-5)


def test_batch_not_divisible_by_micro_batches_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="batch_size=15 must be divisible by optim.accum"):
        small_config(tmp_path, "train.batch_size=15", "optim.accum_steps=2")


@pytest.mark.slow
def test_default_job_reaches_97_percent(tmp_path):
    """The README's main job, `lucid-fn train`, as shipped (about 2 minutes on 2 cores)."""
    cfg = load_config(None, [f'train.workdir="{tmp_path}"'])
    result = fit(cfg, progress=False)
    assert result["test_accuracy"] >= 0.97
