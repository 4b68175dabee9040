"""Training as several processes joined by ``jax.distributed`` on the CPU (gloo
collectives), against one process with the same global batch.

Each run starts its processes with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, as a user would, and one worker script does all of a test in one launch.
Compiling is the cost (about 10 s a train step on 2 cores, and process 1 never hits the
compilation cache, which only process 0 writes), so the default suite trains once: FSDP
over 2 processes, whose checkpoint all processes then restore. The slow tests add the
CLI's replicated run and a crash and restart.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lucid_fn import weights
from lucid_fn.train import fit, load_config, read_metrics
from lucid_fn.train.distributed import Cluster, ClusterError
from test_train import SMALL

ROOT = pathlib.Path(__file__).resolve().parents[1]
# test_train's small run (4 blocks, 32x32 digits, the default config's random shifts, so
# that each host's augmentation is checked too; batch 16 over up to 4 devices), logging
# every step. The one-process reference compiles what test_train's run compiles: the
# suite's compilation cache has it.
OVERRIDES = SMALL + ["train.log_every=1"]

WORKER = """
import json, sys
import jax
import numpy as np
from lucid_fn import weights
from lucid_fn.cli import main
from lucid_fn.train import datasets, fit, load_config, loop, step
from lucid_fn.train.checkpoint import Checkpointer
overrides, root, runs = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
sets = [a for o in overrides for a in ("--set", o)]
if "replicated" in runs:  # through the CLI, which reads the JAX_* variables itself
    assert main(["train", "--no-progress", "--workdir", f"{root}/replicated", *sets]) == 0
cfg = lambda name: load_config(None, overrides + [f'train.workdir="{root}/{name}"',
                                                  'train.param_sharding="fsdp"'])
if "fsdp" in runs:
    fit(cfg("fsdp"), progress=False)
    # Every process restores the last checkpoint onto the FSDP layout (each its shards),
    # and the params gathered from it are the ones process 0 exported.
    c = cfg("fsdp")
    dataset = datasets.load(c.data)
    model, kw = loop.build_model(c, dataset)
    spec = loop.step_spec(c, model, kw, dataset)
    mesh = step.make_mesh()
    abstract = jax.eval_shape(lambda k: step.init_state(spec, model.init(k), 0),
                              jax.random.key(0))
    shardings = step.state_shardings(abstract, mesh, "fsdp")
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = Checkpointer(f"{root}/fsdp/checkpoints", 2)
    state, _ = ckpt.restore(abstract)
    ckpt.close()
    sharded = [a for a in jax.tree_util.tree_leaves(state["params"])
               if not a.is_fully_replicated]
    assert sharded and not any(a.is_fully_addressable for a in sharded), "not split"
    whole = jax.device_get(jax.jit(lambda p: p, out_shardings=step.replicated(mesh))(
        state["params"]))
    exported, _ = weights.load(f"{root}/fsdp/model.safetensors")
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(exported)):
        np.testing.assert_array_equal(a, b)
if "resumed" in runs:
    def crash(step, row):
        if step == 4:
            raise RuntimeError("simulated crash")
    try:
        fit(cfg("resumed"), progress=False, callbacks=[crash])
        raise SystemExit("the crash did not happen")
    except RuntimeError as e:
        assert "simulated crash" in str(e), e
    fit(cfg("resumed"), resume=True, progress=False)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "local": jax.local_device_count()}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(processes: int, local_devices: int, root: pathlib.Path, runs) -> list[dict]:
    """The worker as ``processes`` processes of ``local_devices`` CPU devices each."""
    address = f"localhost:{free_port()}"
    procs, logs = [], []
    for rank in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=address,
                   JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(rank),
                   XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                   + f" --xla_force_host_platform_device_count={local_devices}")
        # Files, not pipes: a process blocked on a full pipe would stall the collectives
        # of all the others while they are being read one by one.
        logs.append((open(root / f"out{rank}.txt", "w+"), open(root / f"err{rank}.txt", "w+")))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(OVERRIDES), str(root), ",".join(runs)],
            env=env, cwd=ROOT, stdout=logs[-1][0], stderr=logs[-1][1], text=True))
    outs = []
    try:
        for p, (out, err) in zip(procs, logs):
            p.wait(timeout=300)
            out.seek(0), err.seek(0)
            assert p.returncode == 0, f"process exited {p.returncode}:\n{err.read()[-3000:]}"
            outs.append(json.loads(out.read().strip().splitlines()[-1]))
    finally:
        for p, files in zip(procs, logs):
            if p.poll() is None:
                p.kill()
            for f in files:
                f.close()
    return outs


def losses(workdir) -> list[float]:
    return [r["loss"] for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
            if "loss" in r]


def leaves(workdir) -> list[np.ndarray]:
    params, _ = weights.load(pathlib.Path(workdir) / "model.safetensors")
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(params)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, one device, the same global batch."""
    workdir = tmp_path_factory.mktemp("one")
    fit(load_config(None, OVERRIDES + [f'train.workdir="{workdir}"']), progress=False,
        cluster=Cluster())
    return workdir


def check_against_one_process(root, one, runs):
    ref_losses, ref_params = losses(one), leaves(one)
    assert len(ref_losses) == 6
    for run in runs:
        # Written once, by process 0: one row per step, nothing interleaved or repeated.
        rows = read_metrics(root / run / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], run
        # The gradient is summed over the devices in another order than on one device:
        # float32 rounding, 1e-6 relative, far below a different batch's effect (another
        # draw of the batch or of its augmentation moves these losses by 1e-2 or more).
        np.testing.assert_allclose(losses(root / run), ref_losses, rtol=2e-5, err_msg=run)
        for a, b in zip(leaves(root / run), ref_params):
            # An AdamW step of lr 1e-3 moves most weights by about 1e-3, so another batch
            # would show in the median. Rounding shows only where the true gradient is
            # zero (the attention's key bias: softmax ignores it) and Adam scales noise up
            # to a step: 4e-5 measured there, 3e-7 the largest median.
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=run)
            assert np.median(np.abs(a - b)) <= 1e-6, run
        steps = sorted(int(p.name) for p in (root / run / "checkpoints").iterdir()
                       if p.name.isdigit())
        assert steps == [3, 6], (run, steps)


def test_two_processes_match_one(one_process, tmp_path):
    """2 processes of one CPU device each, params FSDP-split over both: one process's
    losses and params; the checkpoint both wrote, restored by both, holds those params."""
    outs = launch(2, 1, tmp_path, ["fsdp"])
    assert sorted(o["process"] for o in outs) == [0, 1]
    assert all(o["processes"] == 2 and o["devices"] == 2 for o in outs)
    check_against_one_process(tmp_path, one_process, ["fsdp"])


@pytest.mark.slow
@pytest.mark.parametrize("processes, local", [(2, 2), (4, 1)])
def test_many_processes_match_one(one_process, tmp_path, processes, local):
    """Replicated (through the CLI) and FSDP give one process's losses and params; with
    the process count unchanged an FSDP run that crashed after its step-3 checkpoint,
    resumed by all processes, continues bit for bit."""
    outs = launch(processes, local, tmp_path, ["replicated", "fsdp", "resumed"])
    assert sorted(o["process"] for o in outs) == list(range(processes))
    assert all(o["devices"] == processes * local and o["local"] == local for o in outs)
    check_against_one_process(tmp_path, one_process, ["replicated", "fsdp", "resumed"])
    for a, b in zip(leaves(tmp_path / "resumed"), leaves(tmp_path / "fsdp")):
        np.testing.assert_array_equal(a, b)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "fsdp")


# ------------------------------------------------------------------ the environment


def test_environment_describes_the_cluster():
    env = {"JAX_COORDINATOR_ADDRESS": "localhost:12355", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1"}
    c = Cluster.from_environ(env)
    assert (c.coordinator_address, c.num_processes, c.process_id, c.auto) == (
        "localhost:12355", 2, 1, False)
    assert c.multi_process
    assert not Cluster.from_environ({}).multi_process
    assert not Cluster.from_environ({**env, "JAX_NUM_PROCESSES": "1",
                                     "JAX_PROCESS_ID": "0"}).multi_process
    slurm = Cluster.from_environ({"SLURM_NTASKS": "8"})
    assert slurm.auto and slurm.multi_process and slurm.num_processes is None
    assert Cluster.from_environ({"SLURM_NTASKS": "8", **env}).num_processes == 2
    assert Cluster.from_environ({**env, "JAX_LOCAL_DEVICE_IDS": "0,1"}).local_device_ids == (
        0, 1)


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "localhost:12355", "JAX_NUM_PROCESSES": "2"},
     r"JAX_PROCESS_ID is not.*all three"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:12355"},
     r"JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"),
    ({"JAX_PROCESS_ID": "0"}, r"JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are not"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:12355", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 but JAX_NUM_PROCESSES=2.*0 to 1"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "0"}, r"JAX_COORDINATOR_ADDRESS='localhost' must be host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two",
      "JAX_PROCESS_ID": "0"}, r"JAX_NUM_PROCESSES='two' must be an integer >= 1"),
    ({"JAX_LOCAL_DEVICE_IDS": "gpu0"}, r"JAX_LOCAL_DEVICE_IDS='gpu0' must be"),
])
def test_a_partial_or_wrong_environment_names_the_variable(env, message):
    with pytest.raises(ClusterError, match=message):
        Cluster.from_environ(env)


def test_cli_reports_a_partial_environment(tmp_path):
    """What a user who forgot a variable sees: one line, exit 2, before JAX starts."""
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS="localhost:12355", JAX_NUM_PROCESSES="2")
    env.pop("JAX_PROCESS_ID", None)
    proc = subprocess.run([sys.executable, "-m", "lucid_fn.cli", "train", "--workdir",
                           str(tmp_path), "--steps", "1"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("lucid-fn train: JAX_COORDINATOR_ADDRESS and "
                                  "JAX_NUM_PROCESSES are set but JAX_PROCESS_ID is not")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ each host's share


def test_processes_read_slices_of_one_process_batches():
    """Of P processes each reads its slice of every batch, augmented as one process
    augments it: together they read exactly one process's batches, train and eval."""
    from lucid_fn.train import data, datasets

    cfg = load_config(None, ["augment.pad_crop=2", "augment.hflip=true",
                             "augment.crop_scale=[0.5, 1.0]"])
    ds = datasets.load(cfg.data)
    aug = data.augment_fn(cfg.augment, 32)
    one = data.train_iterator(ds.train, batch_size=16, seed=3, augment=aug)
    parts = [data.train_iterator(ds.train, batch_size=16, seed=3, augment=aug,
                                 process_index=i, process_count=4) for i in range(4)]
    for _ in range(6):
        images, labels = next(one)
        got = [next(p) for p in parts]
        assert all(len(g[1]) == 4 for g in got)
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), images)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), labels)
    whole = list(data.eval_batches(ds.test, 128))
    halves = [list(data.eval_batches(ds.test, 128, process_index=i, process_count=2))
              for i in range(2)]
    for w, a, b in zip(whole, *halves):
        for x, y, z in zip(w, a, b):
            np.testing.assert_array_equal(np.concatenate([y, z]), x)
    assert sum(int(b[2].sum()) for h in halves for b in h) == len(ds.test)
    with pytest.raises(data.DataError, match="multiple of the number of processes"):
        data.train_iterator(ds.train, batch_size=15, seed=0, process_index=0,
                            process_count=2)
