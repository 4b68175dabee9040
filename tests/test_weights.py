"""Lucid-layout import: parity with Lucid's own forward pass, and mismatch reports."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn import registry, weights
from lucid_fn.kernels import KernelSettings


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
    with pytest.raises(ValueError, match="unrecognised state-dict layout.*lucid PVT v1 .patch_emb1.proj.weight"):
        weights.from_state_dict({"encoder.weight": np.zeros(3)}, "pvt_tiny")


# ------------------------------------------------------- other layouts and round trips


def rename(sd, rules):
    """Apply (regex, replacement) rules to every key: the test's own statement of a layout."""
    import re

    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


OFFICIAL_V1 = [(r"^pos_emb(\d)", r"pos_embed\1"), (r"^patch_emb(\d)", r"patch_embed\1")]


def test_official_v1_layout_reproduces_lucids_logits(lucid_fixture):
    config, sd, x_nchw, logits = lucid_fixture
    official = rename(sd, OFFICIAL_V1)
    assert "pos_embed1" in official and "patch_embed4.proj.weight" in official
    params = weights.from_state_dict(official, "pvt_tiny", **config)
    _, apply = registry["pvt_tiny"](**config)
    out = jax.jit(apply)(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out, np.float64), logits, rtol=1e-5, atol=1e-5)


ROUND_TRIPS = [
    ("pvt_tiny", "lucid", dict(flavor="lucid")),
    ("pvt_tiny", "official", dict(flavor="paper")),
    ("pvt_tiny", "hf", dict(flavor="paper", qkv_bias=False)),
    ("pvt_v2_b0", "timm", dict(linear=True)),
    ("pvt_v2_b0", "official", dict()),
    ("pvt_v2_b0", "hf", dict(linear=True)),
]


@pytest.mark.parametrize("name,layout,kw", ROUND_TRIPS)
def test_ours_to_state_dict_and_back_is_exact(name, layout, kw):
    kw = dict(kw, img_size=64, num_classes=7, embed_dims=[16, 32, 40, 64], depths=[1, 2, 1, 1])
    params = registry[name](**kw).init(jax.random.key(3))
    sd = weights.to_state_dict(params, name, layout=layout, **kw)
    assert weights.detect_layout(sd).name == layout
    back = weights.from_state_dict(sd, name, **kw)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_hf_layout_splits_kv_into_key_and_value():
    kw = dict(img_size=64, num_classes=3, embed_dims=[16, 32, 40, 64], depths=[1, 1, 1, 1],
              flavor="paper")
    params = registry["pvt_tiny"](**kw).init(jax.random.key(0))
    sd = weights.to_state_dict(params, "pvt_tiny", layout="hf", **kw)
    kv = np.asarray(params["stage2"]["blocks"]["attn"]["kv"]["kernel"][0])  # (in, 2 * out)
    np.testing.assert_array_equal(sd["pvt.encoder.block.1.0.attention.self.key.weight"],
                                  kv[:, :32].T)
    np.testing.assert_array_equal(sd["pvt.encoder.block.1.0.attention.self.value.weight"],
                                  kv[:, 32:].T)
    assert sd["pvt.encoder.patch_embeddings.0.projection.weight"].shape == (16, 3, 4, 4)


def test_head_reset_for_fine_tuning_on_new_classes(lucid_fixture):
    config, sd, _, _ = lucid_fixture
    with pytest.raises(ValueError, match="head='reset'"):
        weights.from_state_dict(sd, "pvt_tiny", **dict(config, num_classes=5))
    params = weights.from_state_dict(sd, "pvt_tiny", head="reset", **dict(config, num_classes=5))
    assert params["head"]["kernel"].shape == (64, 5)
    np.testing.assert_array_equal(params["norm"]["scale"], sd["norm.weight"])
    headless = weights.from_state_dict(sd, "pvt_tiny", head="reset",
                                       **dict(config, num_classes=0))
    assert "head" not in headless


def test_checkpoint_for_another_img_size_gets_resized_position_embeddings(lucid_fixture):
    config, sd, x_nchw, _ = lucid_fixture
    params64 = weights.from_state_dict(sd, "pvt_tiny", **config)
    params96 = weights.from_state_dict(sd, "pvt_tiny", **dict(config, img_size=96))
    assert params96["stage1"]["pos_embed"].shape == (1, 24 * 24, 16)
    assert params96["stage4"]["pos_embed"].shape == (1, 1 + 3 * 3, 64)
    np.testing.assert_array_equal(params96["stage4"]["pos_embed"][:, 0], sd["pos_emb4"][:, 0])
    # the 96 model with resized embeddings = the 64 model resizing them at apply time
    x = jax.image.resize(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), (3, 96, 96, 3), "linear")
    _, apply64 = registry["pvt_tiny"](**config)
    _, apply96 = registry["pvt_tiny"](**dict(config, img_size=96))
    np.testing.assert_allclose(jax.jit(apply96)(params96, x), jax.jit(apply64)(params64, x),
                               rtol=1e-5, atol=1e-5)


def test_training_size_is_unchanged_by_interpolation_support(lucid_fixture):
    config, sd, x_nchw, logits = lucid_fixture
    params = weights.from_state_dict(sd, "pvt_tiny", **config)
    pe = params["stage1"]["pos_embed"]
    from lucid_fn import nn

    assert nn.resize_pos_embed(pe, (16, 16), has_cls=False) is pe


# ------------------------------------------------------------------ files


@pytest.fixture
def small_model():
    kw = dict(img_size=64, num_classes=4, embed_dims=[16, 32, 40, 64], depths=[1, 1, 1, 1],
              dtype=jnp.bfloat16)
    return kw, registry["pvt_tiny"](**kw).init(jax.random.key(1))


def test_save_and_load_rebuild_params_and_model(tmp_path, small_model):
    kw, params = small_model
    path = tmp_path / "model.safetensors"
    weights.save(path, params, "pvt_tiny", **kw)
    loaded, model = weights.load(path)
    init, apply = model
    assert model.name == "pvt_tiny" and model.config.dtype == jnp.bfloat16
    assert model.config.num_classes == 4
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp files


def test_kernel_settings_travel_with_a_saved_model(tmp_path, small_model):
    kw, params = small_model
    settings = KernelSettings().replace(**{"attention.block_q": 64, "norm.enabled": False})
    weights.save(tmp_path / "m.safetensors", params, "pvt_tiny", kernels=settings, **kw)
    _, model = weights.load(tmp_path / "m.safetensors")
    assert model.config.kernels == settings


def test_a_failed_save_leaves_the_previous_file_intact(tmp_path, small_model, monkeypatch):
    import safetensors.numpy

    kw, params = small_model
    path = tmp_path / "model.safetensors"
    weights.save(path, params, "pvt_tiny", **kw)
    before = path.read_bytes()

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        weights.save(path, params, "pvt_tiny", **kw)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_truncated_and_foreign_files_are_clear_errors(tmp_path, small_model):
    from safetensors.numpy import save_file

    kw, params = small_model
    path = tmp_path / "model.safetensors"
    weights.save(path, params, "pvt_tiny", **kw)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated.safetensors is not a readable safetensors"):
        weights.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"PK\x03\x04 not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        weights.load(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="not one lucid_fn.weights.save wrote.*load_torch"):
        weights.load(foreign)


def test_load_torch_checkpoint_reads_safetensors_without_torch(tmp_path, lucid_fixture,
                                                               monkeypatch):
    import sys

    from safetensors.numpy import save_file

    config, sd, _, _ = lucid_fixture
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    path = tmp_path / "lucid.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    params = weights.load_torch_checkpoint(path, "pvt_tiny", **config)
    np.testing.assert_array_equal(params["stage1"]["pos_embed"], sd["pos_emb1"])
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"PK\x03\x04 a zip archive, as torch.save writes")
    with pytest.raises(ImportError, match="needs PyTorch.*pip install torch"):
        weights.load_torch_checkpoint(pth, "pvt_tiny", **config)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        weights.load_torch_checkpoint(tmp_path / "missing.pth", "pvt_tiny", **config)


# ------------------------------------------------------------ what is refused, by name


def test_a_position_embedding_of_another_rank_is_a_mismatch_not_a_reshape(lucid_fixture):
    """A (16, 16) pos_emb1 used to be taken as a 4x4 grid of 16 channels and resized
    into the model's (1, 256, 16)."""
    config, sd, _, _ = lucid_fixture
    bad = dict(sd, pos_emb1=np.asarray(sd["pos_emb1"])[0, :16])
    with pytest.raises(ValueError, match=r"pos_emb1: checkpoint \(16, 16\), model \(1, 256, 16\)"):
        weights.from_state_dict(bad, "pvt_tiny", **config)


@pytest.mark.parametrize("value,message", [
    (None, r"1 are not: block1\.0\.attn\.q\.weight \(NoneType\)"),
    ("weights", r"1 are not: block1\.0\.attn\.q\.weight \(str\)"),
])
def test_state_dict_values_that_are_not_arrays_are_named(lucid_fixture, value, message):
    config, sd, _, _ = lucid_fixture
    with pytest.raises(ValueError, match="state dict values must be numeric arrays; " + message):
        weights.from_state_dict(dict(sd, **{"block1.0.attn.q.weight": value}), "pvt_tiny",
                                **config)
    with pytest.raises(ValueError, match="a state dict is a mapping"):
        weights.from_state_dict(list(sd.values()), "pvt_tiny", **config)


def test_state_dict_with_nan_is_refused(lucid_fixture):
    config, sd, _, _ = lucid_fixture
    w = np.array(sd["norm.weight"], np.float32)
    w[3] = np.nan
    with pytest.raises(ValueError, match=r"tensor norm\.weight holds NaN or infinity"):
        weights.from_state_dict(dict(sd, **{"norm.weight": w}), "pvt_tiny", **config)


def test_export_and_save_refuse_params_of_another_model(tmp_path, small_model):
    """save used to write a file that load then rejected; to_state_dict wrote keys that fit
    no model."""
    kw, params = small_model
    wider = dict(kw, embed_dims=[16, 32, 40, 128])
    with pytest.raises(ValueError, match=r"params\['head'\]\['kernel'\] has shape \(64, 4\), "
                                         r"expected \(128, 4\)"):
        weights.save(tmp_path / "m.safetensors", params, "pvt_tiny", **wider)
    one_block_short = {**params, "stage1": {**params["stage1"], "blocks": {}}}
    with pytest.raises(ValueError, match=r"params\['stage1'\]\['blocks'\]\['attn'\] is missing"):
        weights.to_state_dict(one_block_short, "pvt_tiny", **kw)
    with pytest.raises(ValueError, match=r"params\['stage1'\]\['pos_embed'\] has shape"):
        weights.to_state_dict(params, "pvt_tiny", **dict(kw, img_size=96))
    assert list(tmp_path.iterdir()) == []


def test_non_finite_params_are_never_written_or_loaded(tmp_path, small_model):
    from safetensors.numpy import load_file, save_file

    kw, params = small_model
    path = tmp_path / "m.safetensors"
    weights.save(path, params, "pvt_tiny", **kw)
    before = path.read_bytes()
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["norm"]["scale"] = bad["norm"]["scale"].at[0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"params\['norm'\]\['scale'\] holds NaN or infinity"):
        weights.save(path, bad, "pvt_tiny", **kw)
    assert path.read_bytes() == before
    # A file damaged afterwards (its metadata intact) is refused on load.
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["norm.scale"][0] = np.nan
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"m\.safetensors: tensor norm\.scale holds NaN"):
        weights.load(path)


def test_files_that_are_no_checkpoint_are_named_by_what_they_are(tmp_path):
    """A text file used to be handed to torch ("needs PyTorch"); a folder too."""
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="neither a safetensors file nor a PyTorch checkpoint"):
        weights.read_state_dict(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="is a folder; give a checkpoint file"):
        weights.read_state_dict(tmp_path)
