import re

import pytest

from lucid_fn import summary
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
