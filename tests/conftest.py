import os
import pathlib
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


MAX_WORKERS = 4  # each worker compiles its own programs and holds them: a few GiB apiece


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): a worker per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config):
    """One persistent XLA compilation cache for the session, its workers (pytest-xdist
    starts them with this process's environment) and their subprocesses: the training
    tests compile the same small train step many times over."""
    cache = os.environ.get("LUCID_FN_TEST_XLA_CACHE") or tempfile.mkdtemp(
        prefix="lucid_fn_xla_cache_")
    os.environ["LUCID_FN_TEST_XLA_CACHE"] = cache
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    # The tests' shapes are tiny: compiling, not running, is their cost, and LLVM's
    # optimisations roughly double it on the CPU. Semantics do not change (no fast-math).
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
