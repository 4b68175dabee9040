"""ImageNet-1k: the 1,000 class names and the evaluation transform of timm.

``preprocess(image, cfg)`` turns a PIL image or a uint8 array into the NHWC float32 batch
``apply`` takes, exactly as timm's ``create_transform(**resolve_data_config(...))`` does
at evaluation: resize (the shorter side to ``floor(img_size / crop_fraction)``, or both
sides with ``crop_mode="squash"``) with PIL's filter, centre crop, ``/ 255``, normalise.
tests/test_imagenet.py checks it against timm on real images (docs/pretrained.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
CROP_MODES = ("center", "squash")
_CLASSES_FILE = os.path.join(os.path.dirname(__file__), "assets", "imagenet1k_classes.txt")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """How a checkpoint's images were prepared at evaluation (timm's ``pretrained_cfg``
    names in brackets): ``img_size`` [input_size], ``crop_fraction`` [crop_pct],
    ``interpolation``, ``crop_mode``, ``mean``, ``std``."""
    img_size: int = 224
    crop_fraction: float = 0.875
    interpolation: str = "bicubic"
    crop_mode: str = "center"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        if isinstance(self.img_size, bool) or not isinstance(self.img_size, int) or \
                self.img_size < 1:
            raise ValueError(f"img_size must be a positive integer; got {self.img_size!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1]; got {self.crop_fraction!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got "
                             f"{self.interpolation!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}; got "
                             f"{self.crop_mode!r}")

    @property
    def scale_size(self) -> int:
        """The side the image is resized to before the crop (timm's ``scale_size``)."""
        return math.floor(self.img_size / self.crop_fraction)


@functools.cache
def _classes() -> tuple:
    with open(_CLASSES_FILE, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return tuple((synset, name) for synset, name in rows)


def class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in the order of the logits (WordNet lemmas,
    e.g. ``'tench, Tinca tinca'``), as timm's ``ImageNetInfo`` gives them."""
    return [name for _, name in _classes()]


def synsets() -> list[str]:
    """The 1,000 WordNet ids (``'n01440764'``, ...) in the order of the logits."""
    return [synset for synset, _ in _classes()]


def _as_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"preprocess takes PIL images or uint8 arrays of pixels (0-255); got "
                         f"an array of dtype {array.dtype}. For floats in [0, 1] pass "
                         f"(x * 255).round().astype(np.uint8)")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1
                               else array).convert("RGB")
    raise ValueError(f"an image array is (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), channels "
                     f"last; got shape {array.shape}")


def _resize(img, cfg: InputConfig):
    """torchvision's ``Resize`` on a PIL image: an int resizes the shorter side (the longer
    one truncated), a pair both sides; either way PIL's own filter."""
    from PIL import Image

    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
               "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}
    w, h = img.size
    s = cfg.scale_size
    if cfg.crop_mode == "squash":
        size = (s, s)
    elif w <= h:
        size = (s, int(s * h / w))
    else:
        size = (int(s * w / h), s)
    return img.resize(size, filters[cfg.interpolation])


def _center_crop(array: np.ndarray, side: int) -> np.ndarray:
    """torchvision's ``CenterCrop``: offsets ``int(round((n - side) / 2))``."""
    h, w = array.shape[:2]
    top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    return array[top:top + side, left:left + side]


def preprocess_one(image, cfg: InputConfig = InputConfig()) -> np.ndarray:
    """One image (PIL, or a uint8 array (H, W[, C])) -> (img_size, img_size, 3) float32."""
    pixels = np.asarray(_resize(_as_pil(image), cfg), dtype=np.uint8)
    crop = _center_crop(pixels, cfg.img_size).astype(np.float32) / np.float32(255)
    return (crop - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def preprocess(images, cfg: InputConfig | str = InputConfig()) -> np.ndarray:
    """A PIL image, a uint8 array (H, W[, C]) or (N, H, W, C), or a list of either -> the
    (N, img_size, img_size, 3) float32 NHWC batch ``apply`` takes: timm's evaluation
    transform for ``cfg``, an ``InputConfig`` or the name of published weights
    (``"pvt_v2_b2"``: their input config)."""
    if isinstance(cfg, str):
        from lucid_fn.pretrained import input_config  # the table imports this module

        cfg = input_config(cfg)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("preprocess got no images")
    return np.stack([preprocess_one(im, cfg) for im in images])
