"""Reference fixtures for PVT v2 (timm) and PVT v1 (HF transformers) parity tests.

Regenerate (CPU only, about 10 s on 2 cores), from the repository root:

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch timm transformers numpy
    /tmp/refvenv/bin/python tools/make_reference_fixtures.py --out tests/fixtures

Made with torch 2.14.1 (+cu130 wheel from PyPI, run on CPU), timm 1.0.31,
transformers 5.24.0, numpy 2.4.6 (Python 3.11). The script records the versions it ran
with in each file's ``meta`` key. ``--param-counts`` prints the parameter counts of timm's
``pvt_v2_b0..b5``, ``pvt_v2_b2_li`` and HF's default ``PvtForImageClassification`` instead
of writing fixtures.

Each model is built in float32 under a fixed seed, then EVERY parameter is perturbed away
from its init default (float32, fixed seed):

- LayerNorm weights: ``1 + 0.1 * randn``;
- every bias (Linear, Conv2d, LayerNorm): ``0.1 * randn``;
- Linear / Conv2d weights: ``+= randn / sqrt(fan_in)`` (fan_in = in_features, or
  in_channels/groups * kh * kw), so attention is far from uniform;
- HF position embeddings and cls token: ``+= 0.5 * randn``.

Then the model is cast with ``model.double()`` and run in eval mode on the float32 input cast
to float64. The float32 state dict stored here is therefore exactly the float64 model's
weights, and the float64 outputs are exact references for those weights.

Keys of every ``.npz``:

- ``config``: JSON string of the constructor kwargs (timm: kwargs of
  ``timm.models.pvt_v2.PyramidVisionTransformerV2``; HF: kwargs of ``PvtConfig``);
- ``meta``: JSON string: library versions, class, input shape, what the features are;
- ``sd/<key>``: every ``state_dict()`` tensor as float32, PyTorch layout (Linear
  ``(out, in)``, Conv2d ``(out, in/groups, kh, kw)``). Neither model has buffers, so
  nothing is skipped (the script asserts that every state-dict entry is a float parameter);
- ``x_nchw``: the input, float32, NCHW;
- ``logits``: float64 ``model(x_nchw.double())``;
- ``features_0`` .. ``features_3``: float64 NCHW stage outputs (see below).

Files:

- ``timm_pvt_v2_b0like.npz``: ``PyramidVisionTransformerV2(embed_dims=(16, 32, 40, 64),
  num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), depths=(1, 2, 1, 1),
  sr_ratios=(8, 4, 2, 1), num_classes=10)``, input (2, 3, 64, 64).
- ``timm_pvt_v2_li.npz``: the same with ``linear=True``, input (2, 3, 64, 64).
- ``timm_pvt_v2_nonsquare.npz``: the b0-like config, input (2, 3, 64, 96).
  timm ``features_i`` = ``model.forward_intermediates(x)[1][i]``: output of ``stages[i]``,
  i.e. AFTER that stage's closing LayerNorm (``stages.i.norm``, eps 1e-6), reshaped to NCHW.
  These files also hold ``pooled`` (float64 (B, C4)): ``forward_head(..., pre_logits=True)``,
  the mean over H, W of ``features_3``.
- ``hf_pvt_v1_paper.npz``: ``PvtForImageClassification(PvtConfig(hidden_sizes=[16, 32, 40, 64],
  num_attention_heads=[1, 2, 5, 8], depths=[1, 2, 1, 1], sequence_reduction_ratios=[8, 4, 2, 1],
  mlp_ratios=[8, 8, 4, 4], patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2], image_size=64,
  num_labels=10, num_channels=3, qkv_bias=True))``, input (3, 3, 64, 64).
  HF ``features_i`` = the output of the LAST block of stage i (``hidden_states[sum(depths[:i+1]) - 1]``
  with ``output_hidden_states=True``), reshaped to NCHW. PVT v1 has no per-stage norm, so
  these are un-normalised residual streams; ``features_3`` drops the cls token (token 0)
  and is taken BEFORE the final ``pvt.encoder.layer_norm``.
  Also: ``last_hidden_state`` (float64 (B, 1 + 2*2, C4)): after the final LayerNorm, cls
  token first; ``logits = classifier(last_hidden_state[:, 0])`` (the cls token, not a
  mean). HF uses ``layer_norm_eps`` = 1e-6 for EVERY LayerNorm, including the patch-embedding
  and spatial-reduction norms, where the official PVT v1 code (and Lucid) keep
  ``nn.LayerNorm``'s default 1e-5. So the file also holds ``logits_official_eps``: the same
  model and weights with only those two kinds of norm set to eps 1e-5, i.e. the official
  PVT v1 (``flavor="paper"``) network.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import platform
import sys

import numpy as np
import torch
import torch.nn as nn

SEED = 0


# ----------------------------------------------------------------------------- helpers


def versions() -> dict:
    import timm
    import transformers
    return {"torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """Move every parameter away from its init default (in float32, deterministically)."""
    g = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float32)

    seen = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            seen.add(full)
            if isinstance(mod, nn.LayerNorm) and p_name == "weight":
                p.copy_(1.0 + 0.1 * randn(p))
            elif p_name == "bias":
                p.copy_(0.1 * randn(p))
            elif isinstance(mod, (nn.Linear, nn.Conv2d)) and p_name == "weight":
                fan_in = p[0].numel()  # in_features, or in_channels/groups * kh * kw
                p.add_(randn(p) / math.sqrt(fan_in))
            else:  # position embeddings, cls token
                p.add_(0.5 * randn(p))
    assert seen == {n for n, _ in model.named_parameters()}


def state_dict_arrays(model: nn.Module) -> dict:
    params = dict(model.named_parameters())
    out = {}
    for k, v in model.state_dict().items():
        # No buffers in either model: every entry is a float parameter.
        assert k in params and v.is_floating_point(), f"unexpected state-dict entry {k}"
        out[f"sd/{k}"] = v.detach().cpu().numpy().astype(np.float32)
    return out


def make_input(shape, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).numpy()


def save(path: pathlib.Path, arrays: dict) -> None:
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size:,} bytes, {len(arrays)} keys)")


# ----------------------------------------------------------------------------- timm


TIMM_B0LIKE = dict(embed_dims=(16, 32, 40, 64), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                   depths=(1, 2, 1, 1), sr_ratios=(8, 4, 2, 1), num_classes=10)


@torch.no_grad()
def timm_fixture(path: pathlib.Path, kwargs: dict, input_shape, seed: int) -> None:
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    torch.manual_seed(seed)
    model = PyramidVisionTransformerV2(**kwargs)
    perturb(model, seed + 1)
    model = model.double().eval()
    x32 = make_input(input_shape, seed + 2)
    x = torch.from_numpy(x32).double()

    logits = model(x)
    final, feats = model.forward_intermediates(x)
    pooled = model.forward_head(final, pre_logits=True)
    assert len(feats) == 4 and torch.equal(final, feats[3])
    assert torch.allclose(model.head(pooled), logits, rtol=0, atol=1e-12)

    arrays = {
        "config": np.array(json.dumps(kwargs)),
        "meta": np.array(json.dumps({
            "versions": versions(),
            "class": "timm.models.pvt_v2.PyramidVisionTransformerV2",
            "input_shape": list(input_shape),
            "features": "features_i = forward_intermediates(x)[1][i]: output of stages[i] after "
                        "stages[i].norm (LayerNorm eps 1e-6), NCHW, float64",
            "pooled": "forward_head(features_3, pre_logits=True) = features_3.mean((-1, -2))",
            "logits": "model(x) = head(pooled)",
            "perturbation": "LN weight 1+0.1*randn; biases 0.1*randn; Linear/Conv weights "
                            "+= randn/sqrt(fan_in); float32, then model.double()",
        })),
        **state_dict_arrays(model),
        "x_nchw": x32,
        "logits": logits.numpy(),
        "pooled": pooled.numpy(),
    }
    for i, f in enumerate(feats):
        arrays[f"features_{i}"] = f.numpy()
    save(path, arrays)


# ----------------------------------------------------------------------------- HF


HF_PVT_V1 = dict(hidden_sizes=[16, 32, 40, 64], num_attention_heads=[1, 2, 5, 8], depths=[1, 2, 1, 1],
                 sequence_reduction_ratios=[8, 4, 2, 1], mlp_ratios=[8, 8, 4, 4],
                 patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2], image_size=64, num_labels=10,
                 num_channels=3, qkv_bias=True)


@torch.no_grad()
def hf_fixture(path: pathlib.Path, kwargs: dict, input_shape, seed: int) -> None:
    from transformers import PvtConfig, PvtForImageClassification

    torch.manual_seed(seed)
    model = PvtForImageClassification(PvtConfig(**kwargs))
    perturb(model, seed + 1)
    model = model.double().eval()
    x32 = make_input(input_shape, seed + 2)
    x = torch.from_numpy(x32).double()

    # Stage outputs, also captured by hooks on each stage's last block to check the indexing.
    hooked = {}
    handles = [blocks[-1].register_forward_hook(
        lambda mod, args, out, i=i: hooked.__setitem__(i, out[0]))
        for i, blocks in enumerate(model.pvt.encoder.block)]
    out = model(pixel_values=x, output_hidden_states=True)
    for h in handles:
        h.remove()

    depths = kwargs["depths"]
    hs = out.hidden_states
    assert len(hs) == sum(depths) + 1  # one per block, plus the final LayerNorm's output
    last = hs[-1]
    assert torch.equal(last, model.pvt(x).last_hidden_state)
    assert torch.allclose(model.classifier(last[:, 0]), out.logits, rtol=0, atol=1e-12)

    b = x.shape[0]
    h, w = x.shape[2] // kwargs["strides"][0], x.shape[3] // kwargs["strides"][0]
    feats = []
    for i in range(4):
        t = hs[sum(depths[:i + 1]) - 1]
        assert torch.equal(t, hooked[i])
        if i > 0:
            h, w = h // kwargs["strides"][i], w // kwargs["strides"][i]
        if i == 3:
            t = t[:, 1:]  # drop the cls token
        assert t.shape[1] == h * w
        feats.append(t.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())

    # The official PVT v1 network: patch-embedding and spatial-reduction LayerNorms at eps 1e-5.
    changed = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm) and re.fullmatch(
                r"pvt\.encoder\.(patch_embeddings\.\d+|block\.\d+\.\d+\.attention\.self)\.layer_norm",
                name):
            mod.eps = 1e-5
            changed += 1
    n_sr = sum(1 for i, d in enumerate(depths) if kwargs["sequence_reduction_ratios"][i] > 1 for _ in range(d))
    assert changed == 4 + n_sr, changed
    logits_official = model(pixel_values=x).logits

    arrays = {
        "config": np.array(json.dumps(kwargs)),
        "meta": np.array(json.dumps({
            "versions": versions(),
            "class": "transformers.PvtForImageClassification",
            "input_shape": list(input_shape),
            "features": "features_i = hidden_states[sum(depths[:i+1]) - 1]: output of the last "
                        "block of stage i, no norm, NCHW, float64; features_3 without the cls "
                        "token and before pvt.encoder.layer_norm",
            "last_hidden_state": "after pvt.encoder.layer_norm (eps 1e-6), (B, 1 + N4, C4), "
                                 "cls token first",
            "logits": "classifier(last_hidden_state[:, 0]) (cls token), every LayerNorm eps 1e-6",
            "logits_official_eps": "same weights, patch-embedding and spatial-reduction "
                                   "LayerNorms at eps 1e-5 (official PVT v1 / Lucid)",
            "perturbation": "LN weight 1+0.1*randn; biases 0.1*randn; Linear/Conv weights "
                            "+= randn/sqrt(fan_in); position embeddings and cls token "
                            "+= 0.5*randn; float32, then model.double()",
        })),
        **state_dict_arrays(model),
        "x_nchw": x32,
        "logits": out.logits.numpy(),
        "logits_official_eps": logits_official.numpy(),
        "last_hidden_state": last.numpy(),
    }
    for i, f in enumerate(feats):
        arrays[f"features_{i}"] = f.numpy()
    save(path, arrays)


# ----------------------------------------------------------------------------- counts


def param_counts() -> None:
    import timm
    from transformers import PvtConfig, PvtForImageClassification

    for name in ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4",
                 "pvt_v2_b5"):
        m = timm.create_model(name, pretrained=False, num_classes=1000)
        print(f"timm {name}: {sum(p.numel() for p in m.parameters()):,}")
    m = PvtForImageClassification(PvtConfig())
    print(f"HF PvtForImageClassification(PvtConfig()) [pvt-tiny]: "
          f"{sum(p.numel() for p in m.parameters()):,}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/fixtures"))
    ap.add_argument("--param-counts", action="store_true",
                    help="print reference parameter counts instead of writing fixtures")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.param_counts:
        param_counts()
        return
    print(json.dumps(versions()), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    timm_fixture(args.out / "timm_pvt_v2_b0like.npz", TIMM_B0LIKE, (2, 3, 64, 64), SEED)
    timm_fixture(args.out / "timm_pvt_v2_li.npz", {**TIMM_B0LIKE, "linear": True}, (2, 3, 64, 64),
                 SEED + 10)
    timm_fixture(args.out / "timm_pvt_v2_nonsquare.npz", TIMM_B0LIKE, (2, 3, 64, 96), SEED + 20)
    hf_fixture(args.out / "hf_pvt_v1_paper.npz", HF_PVT_V1, (3, 3, 64, 64), SEED + 30)


if __name__ == "__main__":
    main()
