"""Lucid-layout import: parity with Lucid's own forward pass, and mismatch reports."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn import registry, weights


@pytest.fixture(scope="module")
def lucid_fixture(fixtures_dir):
    d = np.load(fixtures_dir / "lucid_pvt_tiny64.npz")
    config = json.loads(str(d["config"]))
    sd = {k[len("sd/"):]: d[k] for k in d.files if k.startswith("sd/")}
    return config, sd, d["x_nchw"], d["logits"]


def build_kwargs(config, **extra):
    return {**config, **extra}


@pytest.mark.parametrize("scan", [False, True])
def test_reproduces_lucids_logits(lucid_fixture, scan):
    config, sd, x_nchw, logits = lucid_fixture
    kw = build_kwargs(config, scan_blocks=scan)
    params = weights.from_state_dict(sd, "pvt_tiny", **kw)
    _, apply = registry["pvt_tiny"](**kw)
    out = jax.jit(apply)(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out, np.float64), logits, rtol=1e-5, atol=1e-5)


def test_checkpoint_nested_under_model_key_and_torch_like_values(lucid_fixture):
    config, sd, x_nchw, logits = lucid_fixture

    class TensorLike:  # what from_state_dict sees of a torch tensor
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def float(self):
            return self

        def numpy(self):
            return self.a

    wrapped = {"model": {k: TensorLike(v) for k, v in sd.items()}, "epoch": 3}
    params = weights.from_state_dict(wrapped, "pvt_tiny", **config)
    direct = weights.from_state_dict(sd, "pvt_tiny", **config)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(direct)):
        np.testing.assert_array_equal(a, b)


def test_wrong_flavor_says_which_flavor_fits(lucid_fixture):
    config, sd, _, _ = lucid_fixture
    with pytest.raises(ValueError) as e:
        weights.from_state_dict(sd, "pvt_tiny", **build_kwargs(config, flavor="paper"))
    msg = str(e.value)
    assert "missing keys (10)" in msg and "block1.0.attn.proj.weight" in msg
    assert "flavor='lucid'" in msg


def test_wrong_architecture_lists_mismatches_and_the_fitting_build(lucid_fixture):
    config, sd, _, _ = lucid_fixture
    with pytest.raises(ValueError) as e:
        weights.from_state_dict(sd, "pvt_tiny", **build_kwargs(config, num_classes=5,
                                                                depths=[1, 1, 1, 1]))
    msg = str(e.value)
    assert "unexpected keys" in msg and "block2.1.attn.q.weight" in msg
    assert "head.weight: checkpoint (10, 64), model (5, 64)" in msg
    assert "depths=[1, 2, 1, 1]" in msg and "num_classes=10" in msg


def test_unknown_layout_is_named(lucid_fixture):
    with pytest.raises(ValueError, match="unrecognised state-dict layout.*Lucid"):
        weights.from_state_dict({"encoder.weight": np.zeros(3)}, "pvt_tiny")
