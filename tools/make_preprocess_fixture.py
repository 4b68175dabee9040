"""Reference outputs of timm's evaluation transform, for tests/test_imagenet.py.

Regenerate (CPU only, a few seconds), from the repository root:

    python3 -m venv /tmp/venv-ref && /tmp/venv-ref/bin/pip install torch torchvision timm \\
        scikit-image numpy
    /tmp/venv-ref/bin/python tools/make_preprocess_fixture.py --out tests/fixtures

Made with torch 2.14.1, torchvision 0.29.1, timm 1.0.31, pillow 13.0.0, scikit-image
0.26.0, numpy 2.4.6 (Python 3.11); the file's ``meta`` records them. torch and torchvision
must be a matching pair from the same index: PyPI's torchvision with a CPU-only torch wheel
fails at import ("operator torchvision::nms does not exist").

Inputs are crops of three of scikit-image's sample photographs (astronaut, chelsea, coffee:
public domain or CC0, see skimage.data), small enough to keep the file small, of sides that
exercise both downscaling and upscaling, portrait and landscape, odd offsets in the centre
crop. Each runs through ``timm.data.create_transform(**resolve_data_config(cfg))`` for the
input configs of lucid_fn.pretrained (timm's PVT v2: 224, crop_pct 0.9, bicubic; the
official PVT v1: 224, crop_pct 0.875, bicubic) and HF's PvtImageProcessor (224 x 224,
bilinear, no crop: timm's ``crop_mode="squash"`` at crop_pct 1.0).

Keys: ``image_<i>`` (uint8 HWC input), ``configs`` (JSON list of the timm arguments), and for
input i and config j: ``sha256_<i>_<j>`` (hex of the float32 CHW output's bytes),
``rows_<i>_<j>`` (float32 (3, W, C): output rows 0, H // 2 and H - 1, HWC), ``stats_<i>_<j>``
(float64: mean, std, min, max of the whole output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import platform

import numpy as np

CONFIGS = [
    dict(input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic", crop_mode="center",
         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
         crop_mode="center", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    dict(input_size=(3, 224, 224), crop_pct=1.0, interpolation="bilinear", crop_mode="squash",
         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
]


def images() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut()[40:340, 120:320],   # 300 x 200: portrait, downscaled
            data.chelsea()[60:221, 100:341],     # 161 x 241: landscape, odd sides, upscaled
            data.coffee()[150:247, 200:331]]     # 97 x 131: small, upscaled 2.6x


def versions() -> dict:
    import PIL
    import skimage
    import timm
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__,
            "scikit-image": skimage.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def main(argv=None) -> None:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/fixtures"))
    args = ap.parse_args(argv)
    arrays = {"configs": np.array(json.dumps(CONFIGS)),
              "meta": np.array(json.dumps({"versions": versions()}))}
    for i, image in enumerate(images()):
        arrays[f"image_{i}"] = image
        for j, cfg in enumerate(CONFIGS):
            transform = create_transform(**resolve_data_config(cfg), is_training=False)
            out = transform(Image.fromarray(image)).numpy()  # CHW float32
            assert out.dtype == np.float32 and out.shape == (3, 224, 224), out.shape
            hwc = out.transpose(1, 2, 0)
            h = hwc.shape[0]
            arrays[f"sha256_{i}_{j}"] = np.array(hashlib.sha256(
                np.ascontiguousarray(hwc).tobytes()).hexdigest())
            arrays[f"rows_{i}_{j}"] = hwc[[0, h // 2, h - 1]]
            arrays[f"stats_{i}_{j}"] = np.array([hwc.mean(dtype=np.float64), hwc.std(
                dtype=np.float64), hwc.min(), hwc.max()], np.float64)
    path = args.out / "timm_preprocess.npz"
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size:,} bytes, {len(arrays)} keys)")


if __name__ == "__main__":
    main()
