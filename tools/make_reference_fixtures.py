"""Reference fixtures for PVT v2 (timm, HF transformers) and PVT v1 (HF) parity tests.

Regenerate (CPU only, about 15 s on 2 cores), from the repository root:

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
  ``timm.models.pvt_v2.PyramidVisionTransformerV2``; HF: kwargs of ``PvtConfig`` or
  ``PvtV2Config``);
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
- ``hf_pvt_v2_b0like.npz``: ``PvtV2ForImageClassification(PvtV2Config(hidden_sizes=[16, 32, 40,
  64], num_attention_heads=[1, 2, 5, 8], depths=[1, 2, 1, 1], sr_ratios=[8, 4, 2, 1],
  mlp_ratios=[8, 8, 4, 4], num_labels=10, num_channels=3, qkv_bias=True,
  linear_attention=False))`` (default patch_sizes [7, 3, 3, 3], strides [4, 2, 2, 2]), input
  (2, 3, 64, 64). HF ``features_i`` = ``hidden_states[i]`` with ``output_hidden_states=True``:
  stage i's output AFTER its closing LayerNorm (``pvt_v2.encoder.layers.i.layer_norm``), NCHW;
  ``pooled`` = mean over H, W of ``features_3``; ``logits = classifier(pooled)``. HF v2 uses
  ``layer_norm_eps`` = 1e-6 for EVERY LayerNorm, where timm and the official PVT v2 use 1e-5 in
  the patch-embedding and spatial-reduction norms, so the file also holds
  ``logits_official_eps`` (those norms at 1e-5). The script checks that timm's
  ``PyramidVisionTransformerV2`` loaded with these weights renamed by ``hf_v2_to_timm`` (HF's
  separate ``attention.key`` / ``attention.value`` fused into ``attn.kv``, key rows first)
  reproduces ``features_i`` and ``logits`` (timm norms set to 1e-6) and
  ``logits_official_eps`` (timm's own eps) to 1e-12.
- ``hf_pvt_v1_interp.npz``: the ``hf_pvt_v1_paper`` model (same config, ``image_size=64``, same
  seed and perturbation: the script asserts that the two files' ``sd/`` entries are equal) on
  a (2, 3, 96, 96) input, so each stage's position embedding is bilinearly resized to the new
  token grid (24, 12, 6, 3 per side instead of 16, 8, 4, 2). Same keys as ``hf_pvt_v1_paper``
  (``features_i``, ``last_hidden_state``, ``logits``, ``logits_official_eps``) plus
  ``pos_embed_interp_2`` / ``_3``: float64 (1, H_i*W_i, C_i) resized embeddings of stages 2 and 3
  (patch rows only). HF's own ``PvtPatchEmbeddings.interpolate_pos_encoding`` (transformers
  5.24.0) cannot do this: it reshapes the stored embedding to the NEW grid
  (``embeddings.reshape(1, height, width, -1)``), which fails for every non-native size (here
  "shape '[1, 24, 24, -1]' is invalid for input of size 4096"); the script asserts that and
  swaps in ``fixed_interpolate_pos_encoding``, which views the embedding on its learned grid
  (``image_size // patch_size`` of that patch embedding) and applies
  ``F.interpolate(size=(H, W), mode="bilinear", align_corners=False, antialias=False)``, as the
  official PVT v1 detection code does. The cls row (stage 4) stays out of the resize and is
  concatenated in front unchanged (HF's caller). The patched model is checked to equal HF's at
  the native 64x64 size.
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
import torch.nn.functional as F

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


def fixed_interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int,
                                   width: int) -> torch.Tensor:
    """Drop-in for ``PvtPatchEmbeddings.interpolate_pos_encoding`` that resizes correctly.

    HF's version (transformers 5.24.0) reshapes the stored ``(1, N, C)`` embedding to the NEW
    ``(height, width)`` grid and then "interpolates" it to that same size, so it only runs
    when ``height * width == N`` (and is then an identity); any other input size raises a
    RuntimeError. This one does what the official PVT v1 detection code
    (``PyramidVisionTransformer._get_pos_embed``) does: view the embedding on the grid it was
    learned for (``image_size // patch_size`` of that patch embedding), bilinearly resize it to
    ``(height, width)`` (``align_corners=False``, no antialias) and flatten back. HF's caller
    passes only the patch rows here; the cls row (stage 4) is concatenated in front unchanged.
    """
    gh = self.image_size[0] // self.patch_size[0]
    gw = self.image_size[1] // self.patch_size[1]
    assert embeddings.shape[:2] == (1, gh * gw), embeddings.shape
    if (height, width) == (gh, gw):
        return embeddings
    grid = embeddings.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=False)
    return grid.reshape(1, -1, height * width).permute(0, 2, 1)


@torch.no_grad()
def hf_fixture(path: pathlib.Path, kwargs: dict, input_shape, seed: int,
               interpolate_pos: bool = False) -> None:
    """HF PVT v1 fixture. ``interpolate_pos``: the input is not ``image_size`` square, so the
    position embeddings are resized (with ``fixed_interpolate_pos_encoding``, see there)."""
    import types
    from transformers import PvtConfig, PvtForImageClassification

    torch.manual_seed(seed)
    model = PvtForImageClassification(PvtConfig(**kwargs))
    perturb(model, seed + 1)
    model = model.double().eval()
    x32 = make_input(input_shape, seed + 2)
    x = torch.from_numpy(x32).double()

    pos_interp = {}
    if interpolate_pos:
        assert input_shape[2:] != (kwargs["image_size"],) * 2
        try:  # unpatched HF cannot run at this size
            model(pixel_values=x)
            raise AssertionError("HF PVT v1 ran at a non-native size; drop the patch?")
        except RuntimeError as e:
            hf_error = str(e)
        x_native = torch.from_numpy(make_input((2, 3) + (kwargs["image_size"],) * 2,
                                               seed + 3)).double()
        logits_native_hf = model(pixel_values=x_native).logits
        for i, emb in enumerate(model.pvt.encoder.patch_embeddings):
            def interp(self, embeddings, height, width, i=i):
                out = fixed_interpolate_pos_encoding(self, embeddings, height, width)
                pos_interp[i] = out
                return out
            emb.interpolate_pos_encoding = types.MethodType(interp, emb)
        # At the native size the patched model is the HF model (whose resize is an identity).
        assert torch.allclose(model(pixel_values=x_native).logits, logits_native_hf,
                              rtol=0, atol=1e-13)

    # Stage outputs, also captured by hooks on each stage's last block to check the indexing.
    hooked = {}
    handles = [blocks[-1].register_forward_hook(
        lambda mod, args, out, i=i: hooked.__setitem__(i, out[0]))
        for i, blocks in enumerate(model.pvt.encoder.block)]
    out = model(pixel_values=x, output_hidden_states=True)
    for h in handles:
        h.remove()
    if interpolate_pos:
        pos_embed_interp = dict(pos_interp)  # this forward's resized embeddings (no cls row)
        assert len(pos_embed_interp) == 4

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

    meta = {
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
    }
    if interpolate_pos:
        meta["pos_interpolation"] = (
            "input is not image_size square: each stage's position embedding (patch rows only; "
            "stage 4's cls row is kept as is and concatenated in front) is viewed on its "
            "learned grid (image_size // patch_size of that patch embedding, row-major), "
            "resized with F.interpolate(size=(H, W), mode='bilinear', align_corners=False, "
            "antialias=False) and flattened back, as in the official PVT v1 detection code. "
            "HF's own interpolate_pos_encoding (transformers 5.24.0) reshapes to the NEW grid "
            "and fails at any non-native size (" + hf_error + "), so it is replaced by "
            "tools/make_reference_fixtures.py:fixed_interpolate_pos_encoding; everything else "
            "is HF's code.")
        meta["pos_embed_interp_i"] = ("i = 2, 3 only: float64 (1, H_i*W_i, C_i), stage i's "
                                      "resized position embedding (no cls row), as added to "
                                      "the tokens")
        meta["weights"] = "identical to hf_pvt_v1_paper.npz (same seed, construction, perturbation)"
    arrays = {
        "config": np.array(json.dumps(kwargs)),
        "meta": np.array(json.dumps(meta)),
        **state_dict_arrays(model),
        "x_nchw": x32,
        "logits": out.logits.numpy(),
        "logits_official_eps": logits_official.numpy(),
        "last_hidden_state": last.numpy(),
    }
    for i, f in enumerate(feats):
        arrays[f"features_{i}"] = f.numpy()
    if interpolate_pos:
        for i in (2, 3):  # stages 0 and 1 would add ~90 KB; features_0/1 pin them down
            arrays[f"pos_embed_interp_{i}"] = pos_embed_interp[i].numpy()
    save(path, arrays)


# ----------------------------------------------------------------------------- HF v2


HF_PVT_V2 = dict(hidden_sizes=[16, 32, 40, 64], num_attention_heads=[1, 2, 5, 8], depths=[1, 2, 1, 1],
                 sr_ratios=[8, 4, 2, 1], mlp_ratios=[8, 8, 4, 4], num_labels=10, num_channels=3,
                 qkv_bias=True, linear_attention=False)

# HF PvtV2 state-dict names -> timm pvt_v2 names (key + value are fused into timm's kv below).
_HF_V2_TO_TIMM = [
    (r"pvt_v2\.encoder\.layers\.0\.patch_embedding\.proj\.", "patch_embed.proj."),
    (r"pvt_v2\.encoder\.layers\.0\.patch_embedding\.layer_norm\.", "patch_embed.norm."),
    (r"pvt_v2\.encoder\.layers\.(\d+)\.patch_embedding\.proj\.", r"stages.\1.downsample.proj."),
    (r"pvt_v2\.encoder\.layers\.(\d+)\.patch_embedding\.layer_norm\.", r"stages.\1.downsample.norm."),
    (r"pvt_v2\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"pvt_v2\.encoder\.layers\.(\d+)\.layer_norm\.", r"stages.\1.norm."),
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.attention\.query\.", ".attn.q."),
    (r"\.attention\.proj\.", ".attn.proj."),
    (r"\.attention\.spatial_reduction\.", ".attn.sr."),
    (r"\.attention\.layer_norm\.", ".attn.norm."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"^classifier\.", "head."),
]


def hf_v2_to_timm(sd: dict) -> dict:
    """Rename an HF ``PvtV2ForImageClassification`` state dict to timm's ``pvt_v2`` names;
    ``attention.key`` and ``attention.value`` become timm's ``attn.kv`` (key rows first)."""
    out = {}
    for k, v in sd.items():
        if ".attention.value." in k:
            continue
        if ".attention.key." in k:
            v = torch.cat([v, sd[k.replace(".attention.key.", ".attention.value.")]], dim=0)
            k = k.replace(".attention.key.", ".attention.kv.")
        for pat, rep in _HF_V2_TO_TIMM:
            k = re.sub(pat, rep, k)
        k = k.replace(".attention.kv.", ".attn.kv.")
        out[k] = v
    return out


@torch.no_grad()
def hf_v2_fixture(path: pathlib.Path, kwargs: dict, input_shape, seed: int) -> None:
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    from transformers import PvtV2Config, PvtV2ForImageClassification

    torch.manual_seed(seed)
    model = PvtV2ForImageClassification(PvtV2Config(**kwargs))
    perturb(model, seed + 1)
    model = model.double().eval()
    x32 = make_input(input_shape, seed + 2)
    x = torch.from_numpy(x32).double()

    # hidden_states[i] is stage i's output after its closing LayerNorm: check with hooks.
    layers = model.pvt_v2.encoder.layers
    hooked = {}
    handles = [layer.layer_norm.register_forward_hook(
        lambda mod, args, out, i=i: hooked.__setitem__(i, out)) for i, layer in enumerate(layers)]
    out = model(pixel_values=x, output_hidden_states=True)
    for h in handles:
        h.remove()
    feats = out.hidden_states
    assert len(feats) == 4
    b = x.shape[0]
    for i, f in enumerate(feats):
        assert torch.equal(f, hooked[i].reshape(b, f.shape[2], f.shape[3], -1).permute(0, 3, 1, 2))
    assert torch.equal(feats[3], model.pvt_v2(x).last_hidden_state)
    pooled = feats[3].mean((-1, -2))
    assert torch.allclose(model.classifier(pooled), out.logits, rtol=0, atol=1e-12)

    # The same weights in timm's PVT v2 (renamed, key/value fused into kv) give the same network
    # once timm's patch-embedding and spatial-reduction norms use HF's eps 1e-6 ...
    timm_kwargs = dict(embed_dims=tuple(kwargs["hidden_sizes"]),
                       num_heads=tuple(kwargs["num_attention_heads"]),
                       mlp_ratios=tuple(kwargs["mlp_ratios"]), depths=tuple(kwargs["depths"]),
                       sr_ratios=tuple(kwargs["sr_ratios"]), num_classes=kwargs["num_labels"],
                       qkv_bias=kwargs["qkv_bias"], linear=kwargs["linear_attention"])
    tm = PyramidVisionTransformerV2(**timm_kwargs)
    tm.load_state_dict(hf_v2_to_timm(model.state_dict()), strict=True)
    tm = tm.double().eval()
    hf_small_eps = r"pvt_v2\.encoder\.layers\.\d+\.(patch_embedding|blocks\.\d+\.attention)\.layer_norm"
    timm_small_eps = r"(patch_embed|stages\.\d+\.downsample|stages\.\d+\.blocks\.\d+\.attn)\.norm"

    def set_eps(m, pattern, eps, expect_eps):
        n = 0
        for name, mod in m.named_modules():
            if isinstance(mod, nn.LayerNorm) and re.fullmatch(pattern, name):
                assert mod.eps == expect_eps, (name, mod.eps)
                mod.eps = eps
                n += 1
        return n

    n_small = 4 + sum(d for d, r in zip(kwargs["depths"], kwargs["sr_ratios"]) if r > 1)
    assert set_eps(tm, timm_small_eps, 1e-6, 1e-5) == n_small
    assert all(mod.eps == 1e-6 for mod in tm.modules() if isinstance(mod, nn.LayerNorm))
    assert all(mod.eps == 1e-6 for mod in model.modules() if isinstance(mod, nn.LayerNorm))
    t_final, t_feats = tm.forward_intermediates(x)
    for f, tf in zip(feats, t_feats):
        assert torch.allclose(f, tf, rtol=0, atol=1e-12)
    assert torch.allclose(tm(x), out.logits, rtol=0, atol=1e-12)

    # ... and with those norms at eps 1e-5 (timm's / the official PVT v2's nn.LayerNorm default).
    assert set_eps(model, hf_small_eps, 1e-5, 1e-6) == n_small
    assert set_eps(tm, timm_small_eps, 1e-5, 1e-6) == n_small
    logits_official = model(pixel_values=x).logits
    assert torch.allclose(tm(x), logits_official, rtol=0, atol=1e-12)
    assert not torch.allclose(logits_official, out.logits, rtol=0, atol=1e-12)

    arrays = {
        "config": np.array(json.dumps(kwargs)),
        "meta": np.array(json.dumps({
            "versions": versions(),
            "class": "transformers.PvtV2ForImageClassification",
            "input_shape": list(input_shape),
            "features": "features_i = hidden_states[i] (output_hidden_states=True): output of "
                        "stage i AFTER its closing LayerNorm (pvt_v2.encoder.layers.i.layer_norm, "
                        "eps 1e-6), NCHW, float64; features_3 = last_hidden_state",
            "pooled": "features_3.mean((-1, -2)): mean over H, W after the last stage's norm",
            "logits": "classifier(pooled); HF uses layer_norm_eps = 1e-6 for EVERY LayerNorm",
            "logits_official_eps": "same weights, patch-embedding and spatial-reduction "
                                   "LayerNorms at eps 1e-5 (timm / official PVT v2); equals timm "
                                   "PyramidVisionTransformerV2 with the renamed weights",
            "timm_names": "hf_v2_to_timm in tools/make_reference_fixtures.py; attention.key and "
                          "attention.value are fused into timm attn.kv (key rows first)",
            "perturbation": "LN weight 1+0.1*randn; biases 0.1*randn; Linear/Conv weights "
                            "+= randn/sqrt(fan_in); float32, then model.double()",
        })),
        **state_dict_arrays(model),
        "x_nchw": x32,
        "logits": out.logits.numpy(),
        "logits_official_eps": logits_official.numpy(),
        "pooled": pooled.numpy(),
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
    hf_v2_fixture(args.out / "hf_pvt_v2_b0like.npz", HF_PVT_V2, (2, 3, 64, 64), SEED + 40)
    # The hf_pvt_v1_paper model (same seed and perturbation) on 96x96 inputs.
    hf_fixture(args.out / "hf_pvt_v1_interp.npz", HF_PVT_V1, (2, 3, 96, 96), SEED + 30,
               interpolate_pos=True)
    with np.load(args.out / "hf_pvt_v1_paper.npz") as a, \
            np.load(args.out / "hf_pvt_v1_interp.npz") as b:
        sd_keys = [k for k in a.files if k.startswith("sd/")]
        assert sd_keys == [k for k in b.files if k.startswith("sd/")]
        assert all(np.array_equal(a[k], b[k]) for k in sd_keys)


if __name__ == "__main__":
    main()
