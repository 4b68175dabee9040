import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# A PVT v1 small enough to compile and run in about a second on 2 CPU cores, with every
# structural feature of the real ones: 4 stages, spatial reduction 8/4/2/1, several heads,
# several blocks in a stage, class token.
TINY = dict(img_size=64, num_classes=10, embed_dims=[16, 32, 40, 64], depths=[1, 2, 1, 1])


def jitted(model):
    """(init, apply) compiled: eager op-by-op dispatch would dominate the suite's time."""
    return jax.jit(model.init), jax.jit(model.apply, static_argnames=("train", "features"))


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture
def key():
    return jax.random.key(0)


# Compile faster on the CPU (the tests' shapes are tiny: compiling, not running, is their
# cost). LLVM's optimisations roughly double it; where XLA:CPU still has its elemental
# emitter (jaxlib before 0.12), it compiles the fusions in about a third of the time of the
# MLIR fusion emitters. Semantics do not change (no fast-math).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
MAX_WORKERS = 4  # each worker compiles its own programs and holds them: a few GiB apiece


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): a worker per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def known_xla_flags(flags) -> list[str]:
    """The flags this jaxlib accepts: XLA aborts the process on an unknown flag, and the
    set changes between versions. Each is tried in a fresh interpreter (all at once)."""
    present = os.environ.get("XLA_FLAGS", "")
    flags = [f for f in flags if f.split("=")[0] not in present]
    probes = [subprocess.Popen([sys.executable, "-c", "import jax; jax.devices()"],
                               env=dict(os.environ, XLA_FLAGS=f, JAX_PLATFORMS="cpu"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for f in flags]
    return [f for f, probe in zip(flags, probes) if probe.wait(timeout=120) == 0]


def pytest_configure(config):
    """One persistent XLA compilation cache for the session, its workers (pytest-xdist
    starts them with this process's environment) and their subprocesses: the training
    tests compile the same small train step many times over."""
    cache = os.environ.get("LUCID_FN_TEST_XLA_CACHE") or tempfile.mkdtemp(
        prefix="lucid_fn_xla_cache_")
    os.environ["LUCID_FN_TEST_XLA_CACHE"] = cache
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    if "LUCID_FN_TEST_XLA_FLAGS" not in os.environ:  # once, in the controller
        os.environ["LUCID_FN_TEST_XLA_FLAGS"] = "1"
        os.environ["XLA_FLAGS"] = " ".join(
            [os.environ.get("XLA_FLAGS", "")] + known_xla_flags(FAST_COMPILE_FLAGS)).strip()
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
