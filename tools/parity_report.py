"""Print the parity table in the README: our float32 logits and stage features against each
reference fixture in tests/fixtures, as the largest error relative to the reference's
largest magnitude. Needs only numpy and jax:

    .venv/bin/python tools/parity_report.py
"""

import json
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_parity import load, nhwc, rel_error  # noqa: E402

from lucid_fn import registry, weights  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def measure(fixture, name, kw, logits_key="logits"):
    _, sd, d = load(FIXTURES, fixture)
    params = weights.from_state_dict(sd, name, **kw)
    apply = jax.jit(registry[name](**kw).apply, static_argnames="features")
    x = nhwc(d["x_nchw"])
    logits = rel_error(apply(params, x), d[logits_key])
    feats = [rel_error(f, d[f"features_{i}"].transpose(0, 2, 3, 1))
             for i, f in enumerate(apply(params, x, features=True))
             if f"features_{i}" in d.files]
    return logits, (max(feats) if feats else None)


def main():
    lucid = json.loads(str(np.load(FIXTURES / "lucid_pvt_tiny64.npz")["config"]))
    hf_v1 = dict(img_size=64, num_classes=10, embed_dims=[16, 32, 40, 64], depths=[1, 2, 1, 1],
                 flavor="paper")
    v2 = dict(num_classes=10, embed_dims=[16, 32, 40, 64], depths=[1, 2, 1, 1], norm_eps=1e-6)
    rows = [
        ("Lucid 2.2.3 PVT, 64x64", "lucid_pvt_tiny64", "pvt_tiny", lucid, "logits"),
        ("official PVT v1 (HF weights, official eps), 64x64", "hf_pvt_v1_paper", "pvt_tiny",
         hf_v1, "logits_official_eps"),
        ("the same at 96x96, position embeddings resized", "hf_pvt_v1_interp", "pvt_tiny",
         hf_v1, "logits_official_eps"),
        ("timm PVT v2, 64x64", "timm_pvt_v2_b0like", "pvt_v2_b0", v2, "logits"),
        ("timm PVT v2, linear SRA", "timm_pvt_v2_li", "pvt_v2_b0", dict(v2, linear=True),
         "logits"),
        ("timm PVT v2, 64x96 input", "timm_pvt_v2_nonsquare", "pvt_v2_b0", v2, "logits"),
        ("HF PVT v2 (timm eps), 64x64", "hf_pvt_v2_b0like", "pvt_v2_b0", v2,
         "logits_official_eps"),
    ]
    print("| reference | logits | stage features |\n| --- | ---: | ---: |")
    for title, fixture, name, kw, key in rows:
        logits, feats = measure(fixture, name, kw, key)
        print(f"| {title} | {logits:.1e} | {'-' if feats is None else f'{feats:.1e}'} |")


if __name__ == "__main__":
    main()
