"""benchmarks/bench.py runs end to end on CPU in its small mode and writes its results.

Speeds are never asserted (no timed tests): only that every code path runs and the JSON
and Markdown carry the fields the issue asks for.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn import registry
from lucid_fn.kernels import KernelSettings

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_cpu_run_writes_json_and_markdown(bench, tmp_path):
    argv = ["--device", "cpu", "--small", "--models", "pvt_small", "--modes", "infer",
            "train", "--variants", "scan_blocks=1", "--refs", "eager",
            "--repeats", "1", "--out", str(tmp_path), "--name", "t"]
    result = bench.main(argv)
    on_disk = json.loads((tmp_path / "t.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
    meta = on_disk["meta"]
    for key in ("device", "versions", "command", "img_size", "dtype", "peak_tflops",
                "gflop_per_img_forward", "wall_s"):
        assert key in meta, key
    assert meta["versions"]["jax"] == jax.__version__
    ours = [r for r in on_disk["rows"] if r["impl"] == "lucid_fn"]
    assert [(r["mode"], r["variant"]) for r in ours] == [
        ("infer", "scan_blocks=1"), ("train", "scan_blocks=1")]
    for r in ours:
        for key in ("batch", "img_s", "step_ms", "compile_s", "peak_mem_gib", "mfu",
                    "gflop_per_img"):
            assert key in r, (key, r)
        assert r["img_s"] > 0 and r["compile_s"] > 0
    assert [r["scan_blocks"] for r in ours] == [True, True]
    train = next(r for r in ours if r["mode"] == "train")
    infer = next(r for r in ours if r["mode"] == "infer")
    assert train["gflop_per_img"] == pytest.approx(3 * infer["gflop_per_img"])
    refs = [r for r in on_disk["rows"] if r["impl"] == "torch eager"]
    try:
        import torch  # noqa: F401
    except ImportError:  # the dev venv: references are skipped with a note
        assert not refs and any("torch" in n for n in on_disk["notes"])
    else:
        assert len(refs) == 2 and all("vs_torch_eager" in r for r in ours)
    md = (tmp_path / "t.md").read_text()
    assert "| model | impl | variant | mode | batch | img/s |" in md
    assert md.count("| pvt_small | lucid_fn |") == 2


def test_latency_rows_time_each_call_at_small_batches(bench, tmp_path):
    argv = ["--device", "cpu", "--small", "--models", "pvt_v2_b0", "--modes", "latency",
            "--refs", "--out", str(tmp_path), "--name", "lat"]
    rows = bench.main(argv)["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("latency", 1), ("latency", 2)]
    for r in rows:
        assert r["calls"] == 3 and 0 < r["step_ms"] <= r["latency_p90_ms"], r
        assert r["img_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1e3, rel=1e-2)
    md = (tmp_path / "lat.md").read_text()
    assert f"| {rows[0]['step_ms']:.2f} / {rows[0]['latency_p90_ms']:.2f} |" in md
    with pytest.raises(SystemExit):
        bench.parse_args(["--refs", "max-autotune"])


def test_every_published_table_is_a_valid_command(bench, tmp_path):
    """reproduce.py's runs parse as the scripts' own arguments (a typo would surface only
    on a GPU machine)."""
    spec = importlib.util.spec_from_file_location("reproduce",
                                                  ROOT / "benchmarks" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    for table in ("gpu", "latency", "f32", "big", "compile", "cpu"):
        for script, argv in reproduce.commands(table, str(tmp_path)):
            if script == "bench":
                args = bench.parse_args(argv)
                assert args.out == str(tmp_path) and args.name, (table, argv)
    latency = bench.parse_args(reproduce.commands("latency", str(tmp_path))[0][1])
    assert latency.modes == ["latency"] and latency.latency_batch == [1, 8]
    f32 = [bench.parse_args(a) for _, a in reproduce.commands("f32", str(tmp_path))]
    assert [a.torch_tf32 for a in f32] == ["default", "on"]


def test_flop_count_matches_the_known_pvt_small_figure(bench):
    # pvt_small's forward is 7.63 GFLOP per 224x224 image (2 per multiply-add)
    model = registry["pvt_small"](flavor="paper")
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    assert bench.count_flops(jax.make_jaxpr(model.apply)(params, x)) / 1e9 == pytest.approx(
        7.63, abs=0.01)


def test_variants_are_builder_keywords_and_kernel_settings(bench):
    """A variant is a model built through the public API: builder keywords and a
    KernelSettings, never a patched private name; unknown items stop the run by name."""
    kwargs = bench.parse_variant("scan_blocks=0,remat=1,conv_mlp.block_x=16,norm=off")
    settings = kwargs.pop("kernels")
    assert kwargs == {"scan_blocks": False, "remat": True}
    assert settings == KernelSettings().replace(**{"conv_mlp.block_x": 16,
                                                   "norm.enabled": False})
    assert bench.parse_variant("kernels=off")["kernels"] == KernelSettings.off()
    assert bench.parse_variant("default") == {}
    for bad in ("gelu=fast", "conv_mlp.no_such_setting=1", "attention.block_q=48"):
        with pytest.raises(SystemExit, match="bad variant"):
            bench.parse_variant(bad)
    # every variant computes the same function (off the GPU, XLA's ops either way)
    arch = dict(bench.SMALL_ARCH, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    ref_model = registry["pvt_v2_b0"](**arch)
    params = ref_model.init(jax.random.key(0))
    ref = np.asarray(jax.jit(ref_model.apply)(params, x))
    for spec in ("kernels=off", "scan_blocks=1,remat=1"):
        model = registry["pvt_v2_b0"](**arch, **bench.parse_variant(spec))
        np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(params, x)), ref,
                                   rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_kernel_benchmark_checks_each_family_against_float32_on_cpu(tmp_path):
    """benchmarks/kernels.py in interpret mode at tiny shapes: every family runs forward
    (and backward where it has a backward kernel), its error is measured against float32
    and is no worse than XLA's bf16 form beyond rounding (times are not asserted)."""
    spec = importlib.util.spec_from_file_location("kernels_bench",
                                                  ROOT / "benchmarks" / "kernels.py")
    kb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kb)
    result = kb.main(["--shapes", "tiny", "--interpret", "--out", str(tmp_path),
                      "--name", "k"])
    assert json.loads((tmp_path / "k.json").read_text())["rows"] == json.loads(
        json.dumps(result["rows"]))
    modes = {(r["family"], r["mode"]) for r in result["rows"]}
    assert modes == {(f, m) for f in kb.SHAPES for m in ("forward", "forward+backward")
                     if m == "forward" or kb.GRADS[f]}
    for r in result["rows"]:
        assert 0 < r["err"] <= 1.5 * r["err_xla_bf16"] + 2e-3, r
    with pytest.raises(SystemExit, match="bad variant"):
        kb.main(["--shapes", "tiny", "--variants", "conv_mlp.block_x=3"])


@pytest.mark.slow
def test_semantic_fpn_entry_runs_against_its_torch_reference(bench, tmp_path):
    """The segmentation entry times ours in both modes; with torch and timm installed its
    reference runs too and counts the same parameters."""
    argv = ["--device", "cpu", "--small", "--models", "semantic_fpn_pvt_v2_b0", "--modes",
            "infer", "train", "--refs", "eager", "--repeats", "1", "--out", str(tmp_path),
            "--name", "seg"]
    rows = bench.main(argv)["rows"]
    ours = [r for r in rows if r["impl"] == "lucid_fn"]
    assert [r["mode"] for r in ours] == ["infer", "train"]
    assert all(r["img_s"] > 0 for r in ours), ours
    refs = [r for r in rows if r["impl"] == "torch eager"]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("timm"):
        assert len(refs) == 2 and all(r["params"] == ours[0]["params"] for r in refs), refs
