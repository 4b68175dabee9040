"""Export: what is written is run (the StableHLO artifact deserialised and called, the ONNX
file under onnxruntime on the CPU) and compared with ``apply`` at two batch sizes."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn import export, kernels, registry, weights
from lucid_fn.cli import main
from lucid_fn.nn import layers

TINY = dict(img_size=32, num_classes=10, embed_dims=[16, 32, 40, 64], depths=[1, 1, 1, 1])
BATCHES = (1, 3)
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason=f"jax2onnx, onnx and onnxruntime are "
                                f"not installed: {export.EXPORT_EXTRA}")

# (builder, builder arguments, export arguments): v1 in both flavors, at another size than
# it was built for, headless; v2 linear (its adaptive pooling) with the pyramid's maps. The
# plain v2 exports in the symbolic-sides and CLI tests below.
CASES = {
    "v1_lucid_headless": ("pvt_tiny", {"num_classes": 0}, {}),
    "v1_paper_resized": ("pvt_tiny", {"flavor": "paper"}, {"img_size": 64}),
    "v2_li_features": ("pvt_v2_b2_li", {}, {"features": True}),
    "semantic_fpn_v2": ("semantic_fpn", {"backbone": "pvt_v2_b0", "fpn_channels": 16,
                                         "head_channels": 8, "norm_groups": 4}, {}),
}


def random_params(model, seed: int) -> dict:
    """Params of ``model``'s shapes drawn in NumPy (init's compile would cost more than the
    rest of a case): small normal weights, LayerNorm scales near 1."""
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, jax.random.key(0)))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """A model, its params, the export's arguments, images at the export's size and what
    ``apply`` makes of them (the model as built: v1 resizes inside ``apply``)."""
    name, kw, ekw = CASES[request.param]
    model = registry[name](**{**TINY, **kw})
    params = random_params(model, 1)
    side = ekw.get("img_size", TINY["img_size"])
    x = np.random.default_rng(2).standard_normal((max(BATCHES), side, side, 3), np.float32)
    want = jax.jit(model.apply, static_argnames="features")(
        params, x, features=ekw.get("features", False))
    return model, params, ekw, x, [np.asarray(a) for a in jax.tree.leaves(want)]


def assert_equal_within(got, want, rtol=1e-5):
    """Each output as ``apply``'s, to ``rtol`` of its largest magnitude (float32)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.float32
        assert np.max(np.abs(g - w)) <= rtol * np.max(np.abs(w)), np.max(np.abs(g - w))


def test_stablehlo_artifact_runs_like_apply(case, tmp_path):
    """At one batch size (each one compiles the artifact anew); two in the next test."""
    model, params, ekw, x, want = case
    path = tmp_path / "model.stablehlo"
    export.save(model, path, format="stablehlo", params=params, **ekw)
    exported = export.load_stablehlo(path)
    assert not isinstance(exported.in_avals[0].shape[0], int)  # the batch is symbolic
    assert_equal_within(export.run(exported, x), want)


@needs_onnx
def test_onnx_file_runs_like_apply_under_onnxruntime(case, tmp_path):
    import onnx

    model, params, ekw, x, want = case
    path = tmp_path / "model.onnx"
    export.save(model, path, format="onnx", params=params, **ekw)
    proto = onnx.load(path)
    assert [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")] == [
        export.OPSET]
    assert [i.name for i in proto.graph.input] == ["images"]  # params are initialisers
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    ops = {node.op_type for node in proto.graph.node}
    # exact GELU as ONNX's Erf (not twenty elementwise ops); the lucid flavor's is tanh
    assert ("Erf" in ops) == (model.config.__dict__.get("flavor") != "lucid"), ops
    for b in BATCHES:
        assert_equal_within(export.run_onnx(path, x[:b]), [w[:b] for w in want])


def test_v2_takes_symbolic_batch_and_sides_and_params_as_an_input(tmp_path):
    model = registry["pvt_v2_b0"](**TINY)
    params = random_params(model, 3)
    path = tmp_path / "b0.stablehlo"
    export.save(model, path, format="stablehlo", params=params, img_size="dynamic",
                bake_params=False)
    exported = export.load_stablehlo(path)
    apply = jax.jit(model.apply)
    for shape in ((1, 32, 64, 3), (2, 64, 32, 3)):
        x = np.random.default_rng(4).uniform(size=shape).astype(np.float32)
        assert_equal_within(export.run(exported, x, params), [np.asarray(apply(params, x))])


def test_v1_has_no_symbolic_sides():
    with pytest.raises(ValueError, match="pvt_tiny is PVT v1.*fixed image size"):
        export.to_stablehlo("pvt_tiny", img_size="dynamic", num_classes=10)


def test_export_traces_without_kernels_and_the_setting_round_trips():
    """ONNX traces one form for every platform; StableHLO every kernel off, with the XLA
    forms chosen by platform (the CPU's depthwise conv is the shifted form, no grouped
    convolution; CUDA's is the grouped one)."""
    model = registry["pvt_v2_b0"](**TINY)
    params = jax.eval_shape(model.init, jax.random.key(0))
    src = export.prepare(model, params)
    assert src.model.config.kernels == kernels.parse("portable")
    assert src.reference.config.kernels == kernels.KernelSettings()
    assert export.prepare(model, params, format="stablehlo").model.config.kernels == \
        kernels.KernelSettings.off()
    real = model.init(jax.random.key(0))
    def groups(**kw):
        text = export.to_stablehlo(model, real, batch=1, **kw).mlir_module()
        return {int(g) for g in re.findall(r"feature_group_count = (\d+)", text)}

    assert groups(platforms=("cpu",)) == {1}  # the patch embeddings' convs only
    assert max(groups()) > 1
    portable = kernels.parse("portable")
    assert portable.portable and kernels.parse(str(portable)) == portable
    with pytest.raises(ValueError, match="runs no kernel, but mlp, conv_mlp, attention, norm"):
        kernels.KernelSettings(portable=True)


def _pool_reference(n_in, n_out):
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def test_adaptive_pool_bins_are_pytorchs_at_static_and_symbolic_sizes():
    sizes = (1, 3, 7, 8, 13, 56)
    static = jax.jit(lambda: [layers._pool_matrix(n, 7, jnp.float32) for n in sizes])()
    for n, m in zip(sizes, static):
        np.testing.assert_array_equal(m, _pool_reference(n, 7))
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("8*h"), jnp.float32)
    exported = jax.export.export(jax.jit(lambda v: layers._pool_matrix(v.shape[0], 7,
                                                                       jnp.float32)))(spec)
    np.testing.assert_array_equal(exported.call(np.zeros(24, np.float32)),
                                  _pool_reference(24, 7))


# ----------------------------------------------------------------- bad input


def test_bad_paths_and_formats_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="format must be one of 'stablehlo', 'onnx'; got 'tflite'"):
        export.save("pvt_tiny", tmp_path / "m.tflite", format="tflite", **TINY)
    with pytest.raises(FileNotFoundError, match="no model file or workdir at .*missing.safetensors"):
        export.save(str(tmp_path / "missing.safetensors"), tmp_path / "m", format="stablehlo")
    with pytest.raises(FileNotFoundError, match="folder without model.safetensors"):
        export.save(str(tmp_path), tmp_path / "m", format="stablehlo")
    with pytest.raises(FileNotFoundError, match="output's folder .* does not exist"):
        export.save("pvt_tiny", tmp_path / "no" / "m", format="stablehlo", **TINY)
    with pytest.raises(FileNotFoundError, match="no exported model at"):
        export.load_stablehlo(tmp_path / "absent.stablehlo")
    junk = tmp_path / "junk.stablehlo"
    junk.write_bytes(b"not an artifact")
    with pytest.raises(ValueError, match="junk.stablehlo is not a jax.export artifact"):
        export.load_stablehlo(junk)
    with pytest.raises(ValueError, match="batch must be 'dynamic'"):
        export.to_stablehlo("pvt_tiny", batch=0, **TINY)
    assert not list(tmp_path.glob("m*"))


def test_onnx_without_its_packages_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "jax2onnx", None)
    with pytest.raises(ImportError, match=re.escape(export.EXPORT_EXTRA)):
        export.to_onnx("pvt_tiny", **TINY)


# ------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's workdir as far as export reads it: its model.safetensors."""
    folder = tmp_path_factory.mktemp("run")
    kw = dict(TINY, num_classes=4)
    weights.save(folder / "model.safetensors", random_params(registry["pvt_v2_b0"](**kw), 5),
                 "pvt_v2_b0", **kw)
    return folder


def _self_check(out: str) -> float:
    return float(re.search(r"largest \|exported - apply\| = (\S+)", out).group(1))


@pytest.mark.parametrize("fmt", ["stablehlo", pytest.param("onnx", marks=needs_onnx)])
def test_cli_exports_a_run_and_checks_itself(run_dir, tmp_path, capsys, fmt):
    out_file = tmp_path / f"b0.{fmt}"
    assert main(["export", str(run_dir), str(out_file), "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert f"wrote {out_file}: pvt_v2_b0" in out and "batch dynamic" in out
    assert _self_check(out) < 1e-5 and out_file.stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["pvt_tiny", "{tmp}/m", "--format", "stablehlo", "--img-size", "dynamic"],
     "pvt_tiny is PVT v1"),
    (["{tmp}/missing.safetensors", "{tmp}/m", "--format", "stablehlo"],
     "no model file or workdir at"),
    (["{tmp}", "{tmp}/m", "--format", "stablehlo"], "folder without model.safetensors"),
])
def test_cli_export_errors_are_one_line_with_rc_2(tmp_path, capsys, argv, message):
    assert main(["export", *(a.replace("{tmp}", str(tmp_path)) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("lucid-fn export: ")


def test_cli_unknown_format_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "pvt_tiny", str(tmp_path / "m"), "--format", "tflite"])
    assert exit_.value.code == 2
    assert "invalid choice: 'tflite' (choose from 'stablehlo', 'onnx')" in capsys.readouterr().err
