"""Segmentation data: images with a mask of class indices per pixel (255 ignored).

Sources, each two random-access splits like the classification ones
(``lucid_fn.train.datasets``):

- ``digit_scenes`` (embedded): canvases with one to four of the embedded digit scans at
  random places and sizes, each stroke pixel labelled with its digit's class + 1,
  everything else background (class 0): 11 classes. The test split's scenes are made
  only from held-out scans. Generated from fixed seeds, the training scenes on the fly.
- ``seg_folder``: ``images/`` and a parallel ``annotations/`` (or ``masks/``) folder of
  PNG masks with the same file stems, each optionally split into ``training`` /
  ``validation`` (also ``train`` / ``val`` / ``test``) subfolders: the ADE20K layout.
- ``npz``: arrays ``images`` (N, H, W[, C]) and ``masks`` (N, H, W), optionally
  ``test_images`` / ``test_masks``.

Every mask is read and checked before anything compiles: a missing mask, a mask whose
size is not its image's, a class index out of range are errors that name the file.

An item served for evaluation is at ``img_size``: the image resized so that its longer
side is ``img_size`` (bilinear; the mask nearest-neighbour) and padded to a square
(image 0, mask 255, so the padding counts nowhere). ``data.eval_protocol = "mmseg"``
evaluates as the PVT papers' segmentation code does instead (:class:`WholeImageBatches`).
Training batches are the raw items, made ``img_size`` square by
``seg_augment.augment_fn``: random rescale, random crop (padded the same way), horizontal
flip, colour distortion.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any
import numpy as np

from lucid_fn.train import datasets as datasets_lib
from lucid_fn.train.datasets import DataError
from lucid_fn.train.segmentation import IGNORE

TRAIN_SPLITS = ("training", "train")
TEST_SPLITS = ("validation", "val", "test")
MASK_FOLDERS = ("annotations", "masks")


# ------------------------------------------------------------------ resizing


# mmseg's ADE20K scale (2048, 512) for 512 crops, in training (times the random ratio) and
# testing: an image's longer side at most 4 x img_size.
LONG_SIDE = 4


def resize(img: np.ndarray, hw: tuple, nearest: bool) -> np.ndarray:
    """An HWC uint8 image or an HW mask resized to ``hw`` (h, w); masks only ever
    nearest-neighbour, so no class index is invented between two others."""
    h, w = hw
    if img.shape[:2] == (h, w):
        return img
    from PIL import Image

    if nearest:
        # Indices from the pixel centres, as PIL's NEAREST, exact for any dtype.
        rows = np.minimum(((np.arange(h) + 0.5) * img.shape[0] / h).astype(np.int64),
                          img.shape[0] - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * img.shape[1] / w).astype(np.int64),
                          img.shape[1] - 1)
        return img[rows[:, None], cols[None, :]]
    squeeze = img.shape[-1] == 1
    pil = Image.fromarray(img[..., 0] if squeeze else img)
    out = np.asarray(pil.resize((w, h), Image.BILINEAR))
    return out[..., None] if squeeze else out


def fit_and_pad(img: np.ndarray, mask: np.ndarray, size: int):
    """The evaluation form: longer side resized to ``size``, padded to ``size`` square
    (image 0, mask IGNORE)."""
    h, w = mask.shape
    s = size / max(h, w)
    hw = (max(1, round(h * s)), max(1, round(w * s)))
    img, mask = resize(img, hw, False), resize(mask, hw, True)
    return pad_to(img, mask, size)


def pad_to(img, mask, size: int):
    ph, pw = max(0, size - mask.shape[0]), max(0, size - mask.shape[1])
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE)
    return img, mask


# ------------------------------------------------------------------ sources


def _as_mask(mask) -> np.ndarray:
    return np.asarray(mask, np.int32)


@dataclasses.dataclass
class SegArraySource:
    """In-memory uint8 images (N, H, W, C) and masks (N, H, W)."""

    take_is_raw = True  # take(): raw (image, mask) items, for the augmentation

    images: np.ndarray
    masks: np.ndarray
    img_size: int
    channels: int = 0

    def __len__(self) -> int:
        return len(self.masks)

    def raw(self, i):
        image = datasets_lib.convert_channels(self.images[i], self.channels)
        return image, _as_mask(self.masks[i])

    def hw(self, i) -> tuple:
        return tuple(self.masks.shape[1:3])

    def __getitem__(self, i):
        return fit_and_pad(*self.raw(i), self.img_size)

    def take(self, idx):
        """A training batch before augmentation."""
        return [self.raw(i) for i in idx]

    def subset(self, idx):
        return dataclasses.replace(self, images=self.images[idx], masks=self.masks[idx])


@dataclasses.dataclass
class SegFileSource:
    """Image files and their PNG masks, decoded with Pillow."""

    take_is_raw = True  # take(): raw (image, mask) items, for the augmentation

    files: list
    mask_files: list
    img_size: int
    channels: int = 3
    reduce_zero_label: bool = False

    def __len__(self) -> int:
        return len(self.files)

    def raw(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                img = np.asarray(im.convert("L" if self.channels == 1 else "RGB"))
            with Image.open(self.mask_files[i]) as im:
                mask = _as_mask(np.asarray(im))
        except Exception as e:  # noqa: BLE001 (a file changed since the up-front check)
            raise DataError(f"unreadable image or mask {self.files[i]!r}: {e}; remove or fix "
                            f"it, then continue with --resume") from None
        img = img[..., None] if img.ndim == 2 else img
        return img, reduce_zero(mask) if self.reduce_zero_label else mask

    def hw(self, i) -> tuple:
        """(height, width) of item ``i``, from its mask file's header (the up-front check
        made sure the image has the same)."""
        from PIL import Image

        with Image.open(self.mask_files[i]) as im:
            return im.size[1], im.size[0]

    def __getitem__(self, i):
        return fit_and_pad(*self.raw(i), self.img_size)

    def take(self, idx):
        return [self.raw(i) for i in idx]

    def subset(self, idx):
        return dataclasses.replace(self, files=[self.files[j] for j in idx],
                                   mask_files=[self.mask_files[j] for j in idx])


def reduce_zero(mask):
    """ADE20K's convention (mmseg's ``reduce_zero_label``): 0 is "other", ignored; the
    classes 1..150 become 0..149."""
    return np.where(mask == 0, IGNORE, np.where(mask == IGNORE, IGNORE, mask - 1))


# ------------------------------------------------------------- digit scenes

SCENE_CLASSES = ["background"] + [f"digit {d}" for d in range(10)]
SCENE_DIGITS = (1, 3)  # digits per scene, inclusive
SCENE_DIGIT_SIDE = (0.375, 0.625)  # a digit's side, as a fraction of the canvas side
STROKE_THRESHOLD = 128  # a pixel of an upscaled scan at least this bright is stroke
TRAIN_SCENES, TEST_SCENES = 100_000, 1_000
TEST_SEED_OFFSET = 10**6  # test scenes are drawn from other seeds than any training scene


def make_scene(scans: np.ndarray, labels: np.ndarray, size: int, seed: int):
    """One ``size`` x ``size`` scene from ``scans`` (uint8 (N, 8, 8, 1)): (image uint8
    (size, size, 1), mask int32 (size, size)). Digits do not overlap (placements that
    would are redrawn, at most a few times, then the scene has fewer digits)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = np.zeros((size, size), np.uint8)
    mask = np.zeros((size, size), np.int32)
    taken = np.zeros((size, size), bool)
    lo, hi = (max(4, round(f * size)) for f in SCENE_DIGIT_SIDE)
    for _ in range(rng.integers(SCENE_DIGITS[0], SCENE_DIGITS[1] + 1)):
        for _attempt in range(10):
            side = int(rng.integers(lo, hi + 1))
            top, left = rng.integers(0, size - side + 1, size=2)
            if not taken[top:top + side, left:left + side].any():
                break
        else:
            continue
        k = int(rng.integers(len(scans)))
        digit = np.asarray(Image.fromarray(scans[k, ..., 0]).resize((side, side),
                                                                    Image.BILINEAR))
        window = (slice(top, top + side), slice(left, left + side))
        image[window] = digit
        mask[window] = np.where(digit >= STROKE_THRESHOLD, labels[k] + 1, 0)
        taken[window] = True
    return image[..., None], mask


@dataclasses.dataclass
class DigitScenes:
    """Scenes drawn on demand from ``scans``: scene ``i`` from the seed ``seed * 10**7 +
    ids[i]`` (``ids``: 0 .. n - 1 unless a subset's)."""

    take_is_raw = True  # take(): raw (image, mask) items, for the augmentation

    scans: np.ndarray
    labels: np.ndarray
    size: int
    n: int
    seed: int
    ids: Any = None

    def __len__(self) -> int:
        return self.n if self.ids is None else len(self.ids)

    def raw(self, i):
        scene = int(i) if self.ids is None else int(self.ids[i])
        return make_scene(self.scans, self.labels, self.size, self.seed * 10**7 + scene)

    def __getitem__(self, i):
        return self.raw(i)

    def hw(self, i) -> tuple:
        return self.size, self.size

    def take(self, idx):
        return [self.raw(i) for i in idx]

    def subset(self, idx):
        """The same scenes, still drawn on demand (a host's shard of the training split)."""
        ids = np.arange(self.n) if self.ids is None else np.asarray(self.ids)
        return dataclasses.replace(self, ids=ids[np.asarray(idx)])

    def materialize(self) -> SegArraySource:
        return SegArraySource(*map(np.stack, zip(*self.take(range(len(self))))), self.size)


def digit_scenes(cfg):
    scans, labels = datasets_lib.load_digits_arrays()
    tr, te = datasets_lib.stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    train = DigitScenes(scans[tr], labels[tr], cfg.img_size, TRAIN_SCENES, cfg.split_seed)
    # Made once (the test split is read every evaluation), from held-out scans only.
    test = DigitScenes(scans[te], labels[te], cfg.img_size, TEST_SCENES,
                       cfg.split_seed + TEST_SEED_OFFSET).materialize()
    return datasets_lib.Dataset("digit_scenes", train, test, len(SCENE_CLASSES), 1,
                                cfg.img_size, SCENE_CLASSES, task="segment")


# ------------------------------------------------------------------ checks


def check_mask_values(mask: np.ndarray, num_classes: int | None, where: str) -> int:
    """The largest class index of ``mask`` (ignored pixels aside); an index out of
    ``[0, num_classes)`` is an error naming ``where``."""
    values = np.unique(mask)
    values = values[values != IGNORE]
    if values.size and values.min() < 0:
        raise DataError(f"{where}: mask holds the negative class index {values.min()}; "
                        f"masks hold 0..K-1 per pixel, {IGNORE} for ignored pixels")
    top = int(values.max()) if values.size else -1
    if num_classes is not None and top >= num_classes:
        raise DataError(f"{where}: mask holds class index {top}, out of range [0, "
                        f"{num_classes}) (and not the ignore label {IGNORE}); fix the mask or "
                        f"set model.kwargs.num_classes")
    return top


def _check_pair(image_file, mask_file, reduce_zero_label: bool):
    """(the mask's largest class index, its file) after checking that both decode and
    have the same size."""
    from PIL import Image

    datasets_lib.check_image_file(image_file)
    try:
        with Image.open(mask_file) as im:
            mode = im.mode
            mask = np.asarray(im)
    except Exception as e:  # noqa: BLE001 (Pillow raises many kinds)
        raise DataError(f"unreadable mask {str(mask_file)!r}: {e}; remove or fix it") from None
    if mask.ndim != 2:
        raise DataError(f"mask {str(mask_file)!r} has {mask.shape[-1]} channels (mode {mode}); "
                        f"a mask is one class index per pixel: a single-channel or palette "
                        f"PNG (not a colour rendering of the classes)")
    with Image.open(image_file) as im:
        w, h = im.size
    if mask.shape != (h, w):
        raise DataError(f"mask {str(mask_file)!r} is {mask.shape[1]}x{mask.shape[0]} but its "
                        f"image {str(image_file)!r} is {w}x{h}; a mask must have its image's "
                        f"size")
    mask = _as_mask(mask)
    return (reduce_zero(mask) if reduce_zero_label else mask), str(mask_file)


def _pairs(image_dir: pathlib.Path, mask_dir: pathlib.Path):
    files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower()
                   in datasets_lib.IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {str(image_dir)!r} has no images "
                        f"({', '.join(datasets_lib.IMAGE_SUFFIXES)})")
    masks = []
    for f in files:
        m = mask_dir / f.relative_to(image_dir).with_suffix(".png")
        if not m.is_file():
            raise DataError(f"image {str(f)!r} has no mask: expected {str(m)!r} (masks are "
                            f"PNGs with the image's file stem, in the parallel folder)")
        masks.append(m)
    return [str(f) for f in files], [str(m) for m in masks]


def scan_seg_folder(path: str, reduce_zero_label: bool):
    """(train pairs, test pairs or None) of a segmentation folder, every pair checked."""
    root = pathlib.Path(path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"segmentation folder {str(root)!r} {what}")
    image_dir = root / "images"
    mask_dir = next((root / m for m in MASK_FOLDERS if (root / m).is_dir()), None)
    if not image_dir.is_dir() or mask_dir is None:
        raise DataError(f"segmentation folder {str(root)!r} needs images/ and a parallel "
                        f"annotations/ (or masks/) folder of PNG masks")
    train = next((s for s in TRAIN_SPLITS if (image_dir / s).is_dir()), None)
    test = next((s for s in TEST_SPLITS if (image_dir / s).is_dir()), None)
    if train and test:
        splits = [_pairs(image_dir / train, mask_dir / train),
                  _pairs(image_dir / test, mask_dir / test)]
    else:
        splits = [_pairs(image_dir, mask_dir), None]
    from concurrent.futures import ThreadPoolExecutor

    tops = []
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for split in filter(None, splits):
            for mask, where in pool.map(_check_pair, *split,
                                        [reduce_zero_label] * len(split[0])):
                tops.append((check_mask_values(mask, None, where), where))
    return splits, tops


def load_seg_folder(cfg, num_classes: int | None):
    splits, tops = scan_seg_folder(cfg.path, cfg.reduce_zero_label)
    k = num_classes or max(t for t, _ in tops) + 1
    for top, where in tops:
        if top >= k:
            check_mask_values(np.array([top]), k, where)
    ch = cfg.channels or 3

    def make(pairs):
        return SegFileSource(*pairs, cfg.img_size, ch, cfg.reduce_zero_label)

    if splits[1] is not None:
        train, test = make(splits[0]), make(splits[1])
    else:
        src = make(splits[0])
        idx = np.random.default_rng(cfg.split_seed).permutation(len(src))
        n_test = min(max(1, round(len(src) * cfg.test_fraction)), len(src) - 1)
        train, test = src.subset(np.sort(idx[n_test:])), src.subset(np.sort(idx[:n_test]))
    return datasets_lib.Dataset("seg_folder", train, test, k, ch, cfg.img_size,
                                [str(i) for i in range(k)], task="segment")


def load_seg_npz(f, z: dict, cfg, num_classes: int | None):
    keys = [(xk, mk) for xk, mk in (("images", "masks"), ("test_images", "test_masks"))
            if xk in z or mk in z]
    for xk, mk in keys:
        if xk not in z or mk not in z:
            raise DataError(f"{f}: has {xk if xk in z else mk} but not "
                            f"{mk if xk in z else xk}; give both or neither")
    xs = [datasets_lib._check_images(z[xk], f"{f}:{xk}") for xk, _ in keys]
    scale = datasets_lib.float_pixel_scale(xs, str(f))
    out, top = [], -1
    for x, (xk, mk) in zip(xs, keys):
        m = np.asarray(z[mk])
        if m.ndim != 3 or not np.issubdtype(m.dtype, np.integer):
            raise DataError(f"{f}:{mk} must be integer masks (N, H, W), one class index per "
                            f"pixel; got shape {m.shape} dtype {m.dtype}")
        if len(m) != len(x):
            raise DataError(f"{f}: {xk} has {len(x)} images but {mk} has {len(m)} masks")
        if m.shape[1:] != x.shape[1:3]:
            raise DataError(f"{f}: {mk} are {m.shape[2]}x{m.shape[1]} but {xk} are "
                            f"{x.shape[2]}x{x.shape[1]}; a mask must have its image's size")
        if cfg.reduce_zero_label:
            m = reduce_zero(m)
        top = max(top, check_mask_values(m, num_classes, f"{f}:{mk}"))
        out.append((datasets_lib.to_uint8(x, scale), m.astype(np.int32)))
    k = num_classes or top + 1
    ch = cfg.channels or out[0][0].shape[-1]
    if len(out) == 2:
        train, test = (SegArraySource(x, m, cfg.img_size, cfg.channels) for x, m in out)
    else:
        src = SegArraySource(*out[0], cfg.img_size, cfg.channels)
        idx = np.random.default_rng(cfg.split_seed).permutation(len(src))
        n_test = min(max(1, round(len(src) * cfg.test_fraction)), len(src) - 1)
        train, test = src.subset(np.sort(idx[n_test:])), src.subset(np.sort(idx[:n_test]))
    return datasets_lib.Dataset("npz", train, test, k, ch, cfg.img_size,
                                [str(i) for i in range(k)], task="segment")


# ------------------------------------------------------------ mmseg's evaluation


def whole_image_size(h: int, w: int, size: int, stride: int) -> tuple:
    """The (height, width) an (h, w) image is evaluated at under the PVT segmentation
    code's test pipeline: rescaled, keeping its aspect, by the largest factor that keeps
    the shorter side at most ``size`` and the longer at most ``LONG_SIDE * size``
    (mmcv's ``imrescale``, sides rounded half up), then each side rounded up to a multiple
    of ``stride`` (the official ``AlignResize``, for the backbone's strides)."""
    s = min(LONG_SIDE * size / max(h, w), size / min(h, w))
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    return -(-nh // stride) * stride, -(-nw // stride) * stride


@dataclasses.dataclass
class WholeImageBatches:
    """A test split evaluated as the PVT papers' segmentation code does, in batches of
    fixed shapes: each image whole at :func:`whole_image_size` (bilinear), its mask at the
    image's own size. The images are grouped by that size; batch ``b`` of this process's
    ``part=(index, count)`` is ``(images (B, H, W, C) uint8, masks (B, Hc, Wc) int32,
    valid (B,), sizes (B, 2) int32)``: (Hc, Wc) the largest original size in the group,
    each mask in its top-left corner with ``IGNORE`` around it, ``sizes`` the originals
    (the eval step resizes the logits to them, bilinear, before the argmax). One compile
    per group."""

    source: Any
    batch_size: int
    size: int
    stride: int
    part: tuple = (0, 1)

    def __post_init__(self):
        hws = [tuple(int(v) for v in self.source.hw(i)) for i in range(len(self.source))]
        groups: dict = {}
        for i, (h, w) in enumerate(hws):
            groups.setdefault(whole_image_size(h, w, self.size, self.stride), []).append(i)
        self.plan = []
        for shape in sorted(groups):
            idx = groups[shape]
            canvas = (max(hws[i][0] for i in idx), max(hws[i][1] for i in idx))
            for start in range(0, len(idx), self.batch_size):
                self.plan.append((shape, canvas, idx[start:start + self.batch_size]))

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b):
        shape, canvas, idx = self.plan[int(b)]
        index, count = self.part
        rows = self.batch_size // count
        mine = idx[index * rows:(index + 1) * rows]
        items = [self.source.raw(i) for i in (mine or idx[:1])]  # none: shaped padding
        channels = items[0][0].shape[-1]
        images = np.zeros((rows, *shape, channels), np.uint8)
        masks = np.full((rows, *canvas), IGNORE, np.int32)
        sizes = np.tile(np.array(shape, np.int32), (rows, 1))  # padding rows: no resize
        valid = np.zeros(rows, bool)
        for j, (img, mask) in enumerate(items[:len(mine)]):
            h, w = mask.shape
            images[j] = resize(img, shape, nearest=False)
            masks[j, :h, :w] = mask
            sizes[j] = (h, w)
            valid[j] = True
        return images, masks, valid, sizes
