import re

import pytest

from lucid_fn import register_model, registry, summary
from lucid_fn.cli import main


def test_summary_function_lists_groups_total_and_output_shape():
    text = summary("pvt_small")
    assert re.search(r"^total\s+23,003,048$", text, re.M)
    for group in ("stage1", "stage2", "stage3", "stage4", "norm", "head"):
        assert re.search(rf"^{group}\s+[\d,]+$", text, re.M), group
    assert "stage4.cls_token: (1, 1, 512)" not in text  # leaf paths are group-relative
    assert "cls_token: (1, 1, 512)" in text
    assert "blocks.attn.kv.kernel: (3, 64, 128)" in text  # stacked over 3 blocks
    assert "output (1, 1000) float32" in text


def test_summary_group_counts_add_up_to_total():
    text = summary("pvt_tiny", flavor="paper", num_classes=10)
    groups = [int(n.replace(",", "")) for n in
              re.findall(r"^(?:stage\d|norm|head)\s+([\d,]+)$", text, re.M)]
    total = int(re.search(r"^total\s+([\d,]+)$", text, re.M).group(1).replace(",", ""))
    assert len(groups) == 6 and sum(groups) == total


def test_cli_summary_with_forward_pass(capsys):
    assert main(["summary", "pvt_tiny", "--img-size", "64", "--num-classes", "10",
                 "--forward", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "output (2, 10) float32" in out
    assert re.search(r"forward on cpu: output \(2, 10\) float32, finite=True", out)


def test_cli_list_shows_both_flavors(capsys):
    assert main(["list", "pvt_s*"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"pvt_small\s+23,003,048\s+24,485,864", out)


@pytest.mark.parametrize("argv,message", [
    (["summary", "pvt_smal"], "unknown model 'pvt_smal'. Did you mean: pvt_small"),
    (["summary", "pvt_small", "--img-size", "100"], "img_size=100 is not divisible"),
    (["list", "resnet*"], "no registered model matches 'resnet*'"),
])
def test_cli_errors_exit_2_with_the_message(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_covers_pvt_v2(capsys):
    assert main(["list", "pvt_v2_b2*"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"pvt_v2_b2\s+25,362,856\s+-", out)
    assert re.search(r"pvt_v2_b2_li\s+22,553,512\s+-", out)
    assert main(["summary", "pvt_v2_b0", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    # timm's 3,666,760 less its 1000-class head (257,000) plus a 10-class one (2,570)
    assert re.search(r"^total\s+3,412,330$", out, re.M)
    assert "stage1.norm" not in out and "norm.scale: (32,)" in out
    assert "output (1, 10) float32" in out


def test_cli_convert_a_timm_checkpoint(tmp_path, fixtures_dir, capsys):
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from lucid_fn import weights

    d = np.load(fixtures_dir / "timm_pvt_v2_b0like.npz")
    sd = {k[3:]: np.ascontiguousarray(d[k]) for k in d.files if k.startswith("sd/")}
    src = tmp_path / "timm.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "ours.safetensors"
    config = json.loads(str(d["config"]))
    assert main(["convert", str(src), str(out), "--model", "pvt_v2_b0",
                 "--num-classes", str(config["num_classes"])]) == 2  # widths differ
    assert "embed_dims=[16, 32, 40, 64]" in capsys.readouterr().err
    assert not out.exists()

    @register_model  # a registered name for the fixture's narrow shape
    def tiny_v2(img_size=64, num_classes=10, **kw):
        return registry["pvt_v2_b0"](
            img_size=img_size, num_classes=num_classes, embed_dims=[16, 32, 40, 64],
            depths=[1, 2, 1, 1], norm_eps=1e-6, **kw)

    try:
        assert main(["convert", str(src), str(out), "--model", "tiny_v2"]) == 0
        text = capsys.readouterr().out
        assert "timm layout of PVT v2" in text and "finite=True" in text
        params, model = weights.load(out)
        np.testing.assert_array_equal(params["head"]["kernel"], sd["head.weight"].T)
    finally:
        registry.unregister("tiny_v2")
    assert main(["convert", str(tmp_path / "missing.pth"), str(out), "--model",
                 "pvt_v2_b0"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
