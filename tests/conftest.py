import pathlib

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
