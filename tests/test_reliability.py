"""Nothing runs that should not, nothing is overwritten, every bad value is named: the
workdir lock and ownership rules, checked checkpoints, and the CLI's one-line errors.

One small run (test_train's config, so its compiled step is shared) is copied and damaged
in the ways a user's files get damaged; everything else fails before any compilation.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from test_train import small_config

from lucid_fn import registry, weights
from lucid_fn.cli import main
from lucid_fn.train import ConfigError, fit
from lucid_fn.train import workdir as workdir_lib
from lucid_fn.train.checkpoint import Checkpointer, CheckpointError, NonFiniteStateError


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run's workdir, to copy (never to change)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    fit(small_config(workdir), progress=False)
    return workdir


def copy_run(finished, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    cfg_path = workdir / "config.toml"  # the copy's config names its own folder
    cfg_path.write_text(cfg_path.read_text().replace(str(finished), str(workdir)))
    return workdir


# A TensorStore read that fails leaves orbax's other reads of that restore as coroutines
# never awaited; they are reported when collected. Collected here, inside the tests that
# damage checkpoints on purpose, they are expected, not noise in other tests' reports.
ABANDONED_READS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def collect_abandoned_reads():
    import gc

    gc.collect()


def one_line_error(capsys, argv, *fragments):
    """``main(argv)`` exits 2 with one line on stderr holding every fragment."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ------------------------------------------------------------------------ the lock


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    with workdir_lib.WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(workdir_lib.WorkdirError,
                           match=rf"is in use by another lucid-fn run \(pid {os.getpid()} on "):
            fit(small_config(tmp_path), progress=False)
    assert (tmp_path / ".lock").read_text() == ""  # released: no holder
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing else written


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    """The OS drops a lock with its process (SIGKILL included): the file's old holder
    text means nothing once nobody holds the lock."""
    (tmp_path / ".lock").write_text(json.dumps({"pid": 999999999, "host": "gone",
                                                "started": "then", "argv": ["lucid-fn"]}))
    with workdir_lib.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


# ------------------------------------------------------------------------ ownership


@pytest.mark.parametrize("name,content", [
    ("config.toml", "[optim]\nlr = 0.5\n"),  # the user's own config
    ("metrics.jsonl", '{"step": 1}\n'),
    ("model.safetensors", "not ours"),
    ("notes.txt", "a folder in use for something else"),
])
def test_a_workdir_holding_files_no_run_wrote_is_refused_untouched(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(workdir_lib.WorkdirError, match=rf"not empty and holds no lucid-fn run "
                                                       rf"\({name}\).*choose another"):
        fit(small_config(tmp_path), progress=False)
    assert (tmp_path / name).read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, ".lock"])


def test_checkpoints_without_their_config_are_not_resumed(finished, tmp_path):
    """A run whose config.toml was missing resumed silently under the new config."""
    workdir = copy_run(finished, tmp_path)
    (workdir / "config.toml").unlink()
    with pytest.raises(workdir_lib.WorkdirError, match=r"holds checkpoints but not the "
                                                       r"config\.toml of their run.*Put that "
                                                       r"run's config back as"):
        fit(small_config(workdir, "optim.lr=0.01"), resume="auto", progress=False)


def test_a_run_of_another_config_is_not_overwritten(finished, tmp_path):
    workdir = copy_run(finished, tmp_path)
    with pytest.raises(ConfigError, match=r"differs from the run in .* in optim\.lr"):
        fit(small_config(workdir, "optim.lr=0.01"), resume="auto", progress=False)
    shutil.rmtree(workdir / "checkpoints")  # what is left is still that run's result
    with pytest.raises(workdir_lib.WorkdirError, match=r"holds a run of another config "
                                                       r"\(it differs in optim\.lr\)"):
        fit(small_config(workdir, "optim.lr=0.01"), progress=False)


def test_bad_workdirs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    one_line_error(capsys, ["train", "--workdir", str(tmp_path / "file")],
                   "is a file, not a folder")
    one_line_error(capsys, ["train", "--workdir", str(tmp_path / "file" / "sub")],
                   "cannot create train.workdir", "Not a directory")
    if pathlib.Path("/proc/self").is_dir():  # a folder nobody may write, even root
        one_line_error(capsys, ["train", "--workdir", "/proc/self"],
                       "cannot write in train.workdir '/proc/self'")
    one_line_error(capsys, ["train", "--resume", "--new"], "exclude each other")


# ------------------------------------------------------------------------ checkpoints


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


@ABANDONED_READS
@pytest.mark.parametrize("damage", ["bit", "bytes"])
def test_damaged_checkpoints_are_named_and_nothing_is_overwritten(
        finished, tmp_path, capsys, damage):
    """eval reported a NaN loss with rc 0, and re-running the finished run replaced the
    good model.safetensors with NaN params. What damaged bytes decode to depends on the
    storage (compressed chunks): NaNs, other finite values (the CRC) or nothing readable;
    each is a CheckpointError naming the checkpoint."""
    workdir = copy_run(finished, tmp_path)
    model_before = (workdir / "model.safetensors").read_bytes()
    data = _largest_array_file(workdir / "checkpoints" / "6")
    blob = bytearray(data.read_bytes())
    middle = len(blob) // 2
    if damage == "bit":
        blob[middle] ^= 0x01
    else:
        blob[middle:middle + 64] = b"\xff" * 64
    data.write_bytes(bytes(blob))
    message = r"checkpoints/6(: state\[.*\] does not hold the bytes that were saved| holds NaN " \
              r"or infinity in state\[| cannot be read)"
    with pytest.raises(CheckpointError, match=message + r".*Delete .*/6 to go back to step 3"):
        fit(small_config(workdir), resume="auto", progress=False)
    assert (workdir / "model.safetensors").read_bytes() == model_before
    one_line_error(capsys, ["eval", str(workdir)], "checkpoints/6")
    collect_abandoned_reads()


@ABANDONED_READS
def test_a_truncated_checkpoint_is_one_line(finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path)
    data = _largest_array_file(workdir / "checkpoints" / "6")
    data.write_bytes(data.read_bytes()[:100])
    one_line_error(capsys, ["eval", str(workdir)], "checkpoints/6 cannot be read",
                   "damaged or incomplete")
    collect_abandoned_reads()


def test_a_checkpoint_whose_values_changed_is_named_by_its_crc(tmp_path):
    """Finite values that are not the ones saved (a flipped bit in an uncompressed chunk)."""
    state = {"params": {"w": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}}
    ckpt = Checkpointer(tmp_path / "c", keep=3)
    try:
        ckpt.save(1, state, {})
        ckpt.wait()
        altered = {"params": {"w": np.array([1, 1.0000001, 1], np.float32),
                              "b": state["params"]["b"]}}
        ocp = ckpt._ocp  # written as if by save, but with step 1's CRCs
        ckpt.manager.save(2, args=ocp.args.Composite(
            state=ocp.args.StandardSave(altered), data=ocp.args.JsonSave({}),
            meta=ocp.args.JsonSave(ckpt.meta(1))))
        ckpt.wait()
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        with pytest.raises(CheckpointError, match=r"c/2: state\['params'\]\['w'\] does not hold "
                                                  r"the bytes that were saved \(CRC-32 differs\)"):
            ckpt.restore(abstract)
        ckpt.restore(abstract, step=1)
    finally:
        ckpt.close()


def test_non_finite_states_are_never_saved_and_never_restored(tmp_path):
    state = {"params": {"w": np.ones(3, np.float32)}, "step": np.int32(1)}
    bad = {"params": {"w": np.array([1, np.nan, 1], np.float32)}, "step": np.int32(2)}
    ckpt = Checkpointer(tmp_path / "c", keep=3)
    try:
        ckpt.save(1, state, {})
        with pytest.raises(NonFiniteStateError, match=r"state\['params'\]\['w'\] holds NaN"):
            ckpt.save(2, bad, {})
        ckpt.wait()
        assert ckpt.all_steps() == [1]
        # A checkpoint from elsewhere (no CRCs) that holds NaN: refused on restore.
        ocp = ckpt._ocp
        ckpt.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(bad),
                                                     data=ocp.args.JsonSave({})))
        ckpt.wait()
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        with pytest.raises(CheckpointError, match=r"3 holds NaN or infinity in "
                                                  r"state\['params'\]\['w'\].*go back to step 1"):
            ckpt.restore(abstract)
        restored, _ = ckpt.restore(abstract, step=1)
        np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    finally:
        ckpt.close()


def test_a_finished_run_run_again_rewrites_nothing(finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path)
    kept = ("model.safetensors", "curves.png")
    stamps = {name: (workdir / name).stat().st_mtime_ns for name in kept}
    metrics = (workdir / "metrics.jsonl").read_bytes()
    result = fit(small_config(workdir), resume="auto", progress=False)
    assert result["start_step"] == result["steps"] == 6
    assert {name: (workdir / name).stat().st_mtime_ns for name in kept} == stamps
    assert (workdir / "metrics.jsonl").read_bytes() == metrics


# ------------------------------------------------------------------------ eval


def test_eval_refuses_models_that_cannot_score_the_data(tmp_path, capsys):
    kw = dict(img_size=32, in_channels=1, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4],
              depths=[1, 1, 1, 1])
    for classes, fragments in ((5, ["has 5 classes but the data (digits) has 10",
                                    "labels 5..9 could never be predicted"]),
                               (0, ["headless pvt_tiny (num_classes=0)"])):
        path = tmp_path / f"m{classes}.safetensors"
        params = registry["pvt_tiny"](num_classes=classes, **kw).init(jax.random.key(0))
        weights.save(path, params, "pvt_tiny", num_classes=classes, **kw)
        one_line_error(capsys, ["eval", str(path), "--data", "digits"], *fragments)


def test_eval_of_a_run_whose_data_is_a_crafted_pickle_runs_no_code(finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    import pickle

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    text = (workdir / "config.toml").read_text().replace('name = "digits"', 'name = "cifar10"')
    (workdir / "config.toml").write_text(text.replace('path = ""', f'path = "{cifar}"'))
    one_line_error(capsys, ["eval", str(workdir)], "refusing to read", "data_batch_1")
    assert not marker.exists()


# ------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("argv,fragments", [
    (["train", "--set", 'model.kwargs.num_classes="10"'],
     ["model.kwargs: num_classes must be an integer >= 0; got '10'"]),
    (["train", "--set", "optim.lr=-1e-3"], ["optim.lr must be > 0, got -0.001"]),
    (["train", "--set", "train.checkpoint_every=0"], ["train.checkpoint_every must be in [1, "]),
    (["train", "--model", "pvt_tni"], ["model.name: unknown model 'pvt_tni'. Did you mean"]),
    (["eval", "nowhere"], ["nowhere does not exist"]),
])
def test_cli_expected_failures_are_one_line_with_rc_2(capsys, argv, fragments):
    one_line_error(capsys, argv, *fragments)


def test_argument_ranges_are_checked_by_the_parser(capsys):
    for argv in (["summary", "pvt_tiny", "--batch-size", "0"], ["train", "--steps", "0"],
                 ["eval", "x", "--batch-size", "-1"], ["summary", "pvt_tiny", "--img-size", "x"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("must be at least" in err or "expected an integer"
                                           in err), err


def test_convert_never_replaces_its_input_or_writes_where_it_cannot(tmp_path, capsys):
    kw = dict(img_size=64, num_classes=3, embed_dims=[16, 32, 40, 64], depths=[1, 1, 1, 1])
    src = tmp_path / "m.safetensors"
    weights.save(src, registry["pvt_tiny"](**kw).init(jax.random.key(0)), "pvt_tiny", **kw)
    before = src.read_bytes()
    args = ["--model", "pvt_tiny", "--img-size", "64", "--num-classes", "3"]
    one_line_error(capsys, ["convert", str(src), str(src), *args], "is the input")
    os.symlink(src, tmp_path / "link.safetensors")
    one_line_error(capsys, ["convert", str(src), str(tmp_path / "link.safetensors"), *args],
                   "is the input")
    assert src.read_bytes() == before
    one_line_error(capsys, ["convert", str(src), str(tmp_path / "m.pth"), *args],
                   "must end in .safetensors")
    one_line_error(capsys, ["convert", str(src), str(tmp_path / "no" / "m.safetensors"), *args],
                   "does not exist; create it first")
    if pathlib.Path("/proc/self").is_dir():
        one_line_error(capsys, ["convert", str(src), "/proc/self/m.safetensors", *args],
                       "/proc/self")


# ------------------------------------------------------------------------ the sweep


def test_a_metrics_row_cut_short_by_a_kill_is_dropped(tmp_path):
    from lucid_fn.train import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\ngarbage\n{"step": 3, "loss": 1.8}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2, is not a metrics row"):
        read_metrics(path)


def test_a_finished_run_without_metrics_is_reported_not_crashed(finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path)
    (workdir / "metrics.jsonl").unlink()
    assert main(["train", str(workdir / "config.toml"), "--no-progress"]) == 0
    assert "already finished (6 steps" in capsys.readouterr().out


def test_fit_checks_a_config_changed_in_python(tmp_path):
    cfg = small_config(tmp_path / "run")
    cfg.optim.lr = -1e-3  # dataclasses are mutable: load_config's checks are bypassed
    with pytest.raises(ConfigError, match=r"optim\.lr must be > 0"):
        fit(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("labels,batch,message", [
    (np.zeros(40, int), 16, "has 1 class; a classifier needs at least 2"),
    (np.arange(40) % 2, 64, "training split has 32 examples, fewer than one batch of 64"),
])
def test_data_that_cannot_train_is_refused_before_compiling(tmp_path, labels, batch, message):
    np.savez(tmp_path / "d.npz", images=np.zeros((40, 32, 32), np.uint8), labels=labels)
    cfg = small_config(tmp_path / "run", "data.name=npz", f'data.path="{tmp_path / "d.npz"}"',
                       f"train.batch_size={batch}")
    with pytest.raises(ValueError, match=message):
        fit(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_npz_integer_images_are_exact_and_channels_first_is_named(tmp_path):
    from lucid_fn.train import DataError, datasets

    from test_data import data_cfg

    x = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3))  # int64
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(10) % 2)
    ds = datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "a.npz"}"',
                                "data.img_size=8"))
    np.testing.assert_array_equal(np.concatenate([ds.train.images, ds.test.images]).sum(),
                                  x.sum())
    np.savez(tmp_path / "b.npz", images=x - 10, labels=np.arange(10) % 2)
    with pytest.raises(DataError, match=r"integer images range over \[-10, "):
        datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "b.npz"}"'))
    np.savez(tmp_path / "c.npz", images=x.transpose(0, 3, 1, 2), labels=np.arange(10) % 2)
    with pytest.raises(DataError, match=r"looks like NCHW.*transpose\(0, 2, 3, 1\)"):
        datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "c.npz"}"'))


def test_a_config_path_that_is_a_folder_is_named(tmp_path, capsys):
    one_line_error(capsys, ["train", str(tmp_path)], "is a folder; give a .toml file")


def test_a_torch_file_torch_cannot_read_is_one_line(tmp_path, capsys, monkeypatch):
    import sys
    import types

    def refuse(*args, **kwargs):
        raise RuntimeError("Weights only load failed. This file can still be loaded...\nmore")

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=refuse))
    (tmp_path / "m.pth").write_bytes(b"\x80\x04not really")
    one_line_error(capsys, ["convert", str(tmp_path / "m.pth"), str(tmp_path / "o.safetensors"),
                            "--model", "pvt_tiny"],
                   "cannot be read as a PyTorch checkpoint of tensors (Weights only load failed")


def test_ctrl_c_outside_training_is_one_line(capsys, monkeypatch):
    import lucid_fn

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lucid_fn, "list_models", interrupted)
    assert main(["list"]) == 130
    assert capsys.readouterr().err.strip() == "lucid-fn list: interrupted"


def test_eval_data_without_its_path_is_named():
    """`lucid-fn eval m.safetensors --data cifar10` looked for 'data_batch_1' in the
    current folder; the data section is checked on its own as in a training config."""
    from lucid_fn.train import config as config_lib

    with pytest.raises(ConfigError, match=r"data.name='cifar10' needs data.path.*--data "
                                          r"cifar10:/path/to/data"):
        config_lib.validate_section(config_lib.DataConfig(name="cifar10"), "data")


# JAX warns that its threads do not survive a fork; this child only sleeps.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_a_forked_child_does_not_keep_the_workdir_locked(tmp_path):
    """Data workers are forked processes: one that outlives its run must not hold the lock."""
    import signal

    lock = workdir_lib.WorkdirLock(tmp_path)
    lock.acquire()
    ready, started = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (fork hooks have run): outlive the parent's lock for a while
        import time

        os.write(started, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        os.read(ready, 1)
        lock.release()
        with workdir_lib.WorkdirLock(tmp_path):  # free although the child still runs
            pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)
        os.close(started)


def test_api_arguments_are_checked_by_name(tmp_path):
    from lucid_fn.train import DataError, datasets, evaluate_file

    from test_data import data_cfg

    with pytest.raises(ValueError, match=r"resume must be True, False or 'auto'; got 'yes'"):
        fit(small_config(tmp_path / "run"), resume="yes", progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1; got 0"):
        evaluate_file(tmp_path, batch_size=0)
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError, match=r"image folder .* is a file, not a folder"):
        datasets.load(data_cfg("data.name=folder", f'data.path="{tmp_path / "f"}"'))
