"""Segmentation's augmentation, image and mask together, as mmsegmentation's ADE20K
training pipeline: random rescale, random crop (redrawn while one class dominates),
horizontal flip, photometric distortion. Masks only ever move whole pixels."""

from __future__ import annotations

import numpy as np

from lucid_fn.train.seg_data import LONG_SIDE, pad_to, resize
from lucid_fn.train.segmentation import IGNORE


CROP_TRIES = 10  # mmseg's RandomCrop: crops redrawn while one class dominates


def dominated(mask, ratio: float) -> bool:
    """Whether one class covers ``ratio`` or more of a crop's labelled pixels, or it has
    fewer than two classes (mmseg's ``cat_max_ratio`` test)."""
    counts = np.bincount(mask[mask != IGNORE].ravel())
    counts = counts[counts > 0]
    return len(counts) < 2 or counts.max() / counts.sum() >= ratio


def rgb_to_hsv(rgb):
    """float RGB in [0, 255] -> hue in degrees [0, 360), saturation in [0, 1], value in
    [0, 255]."""
    v = rgb.max(-1)
    c = v - rgb.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    r, g, b = np.moveaxis(rgb, -1, 0)
    safe = np.maximum(c, 1e-12)
    h = np.select([c == 0, v == r, v == g], [0.0, ((g - b) / safe) % 6, (b - r) / safe + 2],
                  (r - g) / safe + 4)
    return np.stack([h * 60.0, s, v], -1)


def hsv_to_rgb(hsv):
    h, s, v = np.moveaxis(hsv, -1, 0)
    k = (np.array([5.0, 3.0, 1.0]) + (h / 60.0)[..., None]) % 6
    return v[..., None] * (1 - s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1))


def photometric_distortion(img, rng):
    """mmseg's ``PhotoMetricDistortion`` on a uint8 image: each with probability 1/2, a
    brightness shift in [-32, 32], a contrast factor in [0.5, 1.5] (before or after the
    colour steps, at random), a saturation factor in [0.5, 1.5], a hue shift of -18 to 17
    steps of 2 degrees (OpenCV's 180-step hue); values clipped to [0, 255] after each.
    Grayscale images get the brightness and contrast steps only."""
    x = img.astype(np.float32)
    if rng.integers(2):
        x = np.clip(x + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.integers(2)

    def contrast(x):
        return np.clip(x * rng.uniform(0.5, 1.5), 0, 255) if rng.integers(2) else x

    if contrast_first:
        x = contrast(x)
    if x.shape[-1] == 3:
        if rng.integers(2):
            hsv = rgb_to_hsv(x)
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
            x = hsv_to_rgb(hsv)
        if rng.integers(2):
            hsv = rgb_to_hsv(x)
            hsv[..., 0] = (hsv[..., 0] + 2.0 * rng.integers(-18, 18)) % 360
            x = hsv_to_rgb(hsv)
    if not contrast_first:
        x = contrast(x)
    return np.round(np.clip(x, 0, 255)).astype(np.uint8)


def augment_fn(cfg, img_size: int):
    """``(raw items, masks), rng -> (images (B, S, S, C) uint8, masks (B, S, S) int32)``
    with S = ``img_size``: each item rescaled so that its shorter side is ``img_size``
    times a ratio drawn from ``augment.scale_range`` (none: 1; its longer side at most
    ``LONG_SIDE`` times that, as mmseg's (2048, 512) scale), cropped at a random place
    to ``img_size`` square (padded first where smaller: image 0, mask IGNORE; redrawn up
    to ``CROP_TRIES`` times while one class covers ``augment.cat_max_ratio`` of it), flipped
    left-right with probability 1/2 when ``augment.hflip``, and its colours distorted when
    ``augment.photometric``. Masks only ever move whole pixels: nearest-neighbour resizing,
    crops, flips."""
    ratios, flip = list(cfg.scale_range), cfg.hflip
    max_ratio, photometric = cfg.cat_max_ratio, cfg.photometric

    def crop(img, mask, rng):
        top = rng.integers(0, mask.shape[0] - img_size + 1)
        left = rng.integers(0, mask.shape[1] - img_size + 1)
        return (img[top:top + img_size, left:left + img_size],
                mask[top:top + img_size, left:left + img_size])

    def one(img, mask, rng):
        h, w = mask.shape
        r = rng.uniform(*ratios) if ratios else 1.0
        s = img_size * r * min(1 / min(h, w), LONG_SIDE / max(h, w))
        hw = (max(1, round(h * s)), max(1, round(w * s)))
        img, mask = resize(img, hw, False), resize(mask, hw, True)  # same size: unchanged
        img, mask = pad_to(img, mask, img_size)
        cropped = crop(img, mask, rng)
        for _ in range(CROP_TRIES if max_ratio < 1 else 0):
            if not dominated(cropped[1], max_ratio):
                break
            cropped = crop(img, mask, rng)
        img, mask = cropped
        if flip and rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        if photometric:
            img = photometric_distortion(img, rng)
        return np.ascontiguousarray(img), np.ascontiguousarray(mask, np.int32)

    def fn(batch, rng, first_row: int = 0):
        """``first_row``: the row of the global batch that ``batch``'s first item is. Each
        row draws from its own stream keyed by one number of the batch's generator, as the
        classification augmentation does: a process augmenting its rows of a batch gets
        what one process augmenting all of it would."""
        base = int(rng.integers(2**63))
        images, masks = zip(*(one(img, mask, np.random.Generator(np.random.Philox(
            key=[base, first_row + k]))) for k, (img, mask) in enumerate(batch)))
        return np.stack(images), np.stack(masks)

    return fn
