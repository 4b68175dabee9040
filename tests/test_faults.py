"""Fault injection: `lucid-fn train` killed with SIGKILL at seeded random moments (one of
them in the middle of writing a checkpoint) and run again until it finishes ends with the
params of an uninterrupted run, bit for bit; of two runs started together on one workdir,
exactly one runs and the other is refused naming it.

The runs are test_train's small config with a checkpoint every step; their train step
compiles once in this session (the persistent cache conftest sets up) and the
subprocesses load it from there.
"""

import os
import pathlib
import random
import subprocess
import sys
import time

import jax
import numpy as np
from test_train import SMALL, final_params, small_config

from lucid_fn.train import fit

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTRA = ["train.steps=8", "train.checkpoint_every=1"]
TIMEOUT = 120  # seconds any one wait may take before the test fails instead of hanging


def train_command(workdir) -> list[str]:
    argv = [sys.executable, "-m", "lucid_fn.cli", "train", "--no-progress",
            "--workdir", str(workdir)]
    for item in SMALL + EXTRA:
        argv += ["--set", item]
    return argv


def start(workdir) -> subprocess.Popen:
    return subprocess.Popen(train_command(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen) -> None:
    """Poll ``condition`` every millisecond while ``proc`` runs."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) first: {err[-2000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.001)


def finished_steps(workdir) -> list[int]:
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
        if folder.is_dir() else []


def checkpoint_being_written(workdir) -> bool:
    folder = pathlib.Path(workdir) / "checkpoints"
    return folder.is_dir() and any("tmp" in p.name for p in folder.iterdir())


def kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed or released by the process
    proc.communicate(timeout=TIMEOUT)


def test_killed_and_racing_runs_end_bit_identical_to_an_uninterrupted_run(tmp_path):
    rng = random.Random(0)
    reference = tmp_path / "reference"
    fit(small_config(reference, *EXTRA), progress=False)  # compiles for the subprocesses
    workdir = tmp_path / "killed"

    # Two runs started together: exactly one gets the workdir, the other is refused by name.
    racers = [start(workdir), start(workdir)]
    deadline = time.monotonic() + TIMEOUT
    while all(p.poll() is None for p in racers):
        assert time.monotonic() < deadline, "neither racing run ended"
        time.sleep(0.01)
    loser = next(p for p in racers if p.poll() is not None)
    winner = next(p for p in racers if p is not loser)
    _, err = loser.communicate()
    assert loser.returncode == 2, err
    assert f"is in use by another lucid-fn run (pid {winner.pid} on " in err, err
    assert "Traceback" not in err

    # The winner, killed once it has saved a checkpoint or two (a random moment after).
    first = rng.randint(1, 2)
    wait_until(lambda: len(finished_steps(workdir)) >= first, winner)
    time.sleep(rng.uniform(0, 0.2))
    kill(winner)

    # Killed in the middle of writing a checkpoint (its temporary folder exists).
    proc = start(workdir)
    wait_until(lambda: checkpoint_being_written(workdir), proc)
    kill(proc)

    # Killed at a random moment of its start-up or first steps.
    proc = start(workdir)
    time.sleep(rng.uniform(0.5, 4.0))
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    kill(proc)

    # Run again until it finishes (a kill at the last moment may have left nothing to do).
    for _ in range(3):
        proc = start(workdir)
        out, err = proc.communicate(timeout=TIMEOUT)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, err
    assert "test accuracy" in out
    for a, b in zip(jax.tree_util.tree_leaves(final_params(reference)),
                    jax.tree_util.tree_leaves(final_params(workdir)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not any("tmp" in p.name for p in (workdir / "checkpoints").iterdir())
    assert os.path.getsize(workdir / ".lock") == 0  # released: no holder named
