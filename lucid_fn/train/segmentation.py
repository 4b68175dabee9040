"""Segmentation's loss and metrics: per-pixel cross-entropy with an ignore label, the
confusion matrix summed inside the jitted eval step, and mIoU, pixel accuracy and
per-class IoU from it (as mmsegmentation computes them).

Masks hold one class index per pixel; ``IGNORE`` (255) marks pixels that count nowhere
(unlabelled, or the padding of an augmented crop).
"""

from __future__ import annotations

import numpy as np

IGNORE = 255


def pixel_cross_entropy(logits, masks):
    """Per-pixel softmax cross-entropy summed over the pixels that are not ``IGNORE``:
    ``(loss sum, correct pixels, counted pixels)``. logits (B, H, W, K), masks (B, H, W)
    int; bfloat16 logits are taken in float32 (the cast fuses into the loss)."""
    import jax.numpy as jnp
    import optax

    logits = logits.astype(jnp.float32)
    valid = masks != IGNORE
    labels = jnp.where(valid, masks, 0)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return jnp.sum(jnp.where(valid, loss, 0.0)), jnp.sum(correct), jnp.sum(valid)


def mean_pixel_loss(logits, masks):
    """The training loss: the mean over counted pixels (PyTorch's ``cross_entropy`` with
    ``ignore_index``), and (correct, counted) pixels. A batch with no counted pixel gives
    0, not NaN."""
    import jax.numpy as jnp

    total, correct, count = pixel_cross_entropy(logits, masks)
    return total / jnp.maximum(count, 1), correct, count


def _source_rows(n_in: int, canvas: int, n_out):
    """For output rows 0 .. canvas - 1 of a bilinear resize from ``n_in`` rows to ``n_out``
    ((B,) int, traced): the two source rows and the second one's weight, (B, canvas) each,
    as PyTorch's ``interpolate(mode="bilinear", align_corners=False)`` computes them."""
    import jax.numpy as jnp

    dst = jnp.arange(canvas, dtype=jnp.float32)[None, :] + 0.5
    scale = n_in / n_out.astype(jnp.float32)[:, None]
    src = jnp.maximum(dst * scale - 0.5, 0.0)
    lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
    return lo, jnp.minimum(lo + 1, n_in - 1), src - lo


def resize_logits(logits, sizes, canvas: tuple):
    """(B, H, W, K) logits resized, bilinear in float32, to each image's own size
    ``sizes[b] = (h, w)``, in the top-left corner of a (B, Hc, Wc, K) canvas (beyond it:
    edge values, which the masks' ``IGNORE`` leaves uncounted): mmsegmentation's last step
    before the argmax."""
    import jax.numpy as jnp

    x = logits.astype(jnp.float32)
    for axis, n_out in ((1, sizes[:, 0]), (2, sizes[:, 1])):
        lo, hi, w = _source_rows(x.shape[axis], canvas[axis - 1], n_out)
        shape = [x.shape[0], 1, 1, 1]
        shape[axis] = -1
        take = lambda i: jnp.take_along_axis(x, i.reshape(shape), axis=axis)  # noqa: E731
        x = take(lo) * (1.0 - w.reshape(shape)) + take(hi) * w.reshape(shape)
    return x


def confusion_matrix(pred, masks, num_classes: int, valid=None):
    """(K, K) int32 counts of (true class, predicted class) over the pixels whose mask is
    not ``IGNORE`` (and whose image is ``valid``, (B,) bool). jit-friendly: one bincount
    of fixed length, ignored pixels sent to an extra bin that is dropped."""
    import jax.numpy as jnp

    counted = masks != IGNORE
    if valid is not None:
        counted = counted & valid[:, None, None]
    k = num_classes
    index = jnp.where(counted & (masks < k), masks * k + pred, k * k)
    counts = jnp.bincount(index.reshape(-1), length=k * k + 1)[:-1]
    return counts.reshape(k, k).astype(jnp.int32)


def iou_metrics(confusion) -> dict:
    """mIoU, pixel accuracy and per-class IoU from a confusion matrix (rows: truth).

    As mmsegmentation: IoU = intersection / union with union = predicted + true -
    intersection; a class with no true and no predicted pixel has no IoU (NaN, left out
    of the mean; None in ``per_class_iou``); a class predicted but never true has IoU 0.
    Pixel accuracy is correct / counted pixels."""
    cm = np.asarray(confusion, np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
    total = cm.sum()
    present = ~np.isnan(iou)
    return {"miou": float(np.mean(iou[present])) if present.any() else float("nan"),
            "pixel_accuracy": float(inter.sum() / total) if total else float("nan"),
            "per_class_iou": [None if np.isnan(v) else float(v) for v in iou]}


# ------------------------------------------------------------------- pictures


def palette(num_classes: int) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours, fixed: black for class 0 (background), a
    spread of hues for the rest, white for ignored pixels (the last row)."""
    import colorsys

    colours = [(0, 0, 0)]
    for i in range(1, num_classes):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    colours.append((255, 255, 255))
    return np.asarray(colours, np.uint8)


def colourise(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """An (H, W) mask as an (H, W, 3) uint8 picture (``palette``)."""
    colours = palette(num_classes)
    index = np.where(mask == IGNORE, num_classes, np.clip(mask, 0, num_classes - 1))
    return colours[index]


def plot_predictions(images, masks, preds, num_classes: int, path) -> None:
    """A PNG of rows (image, ground truth, prediction), written atomically. images uint8
    (N, H, W, C); masks and preds (N, H, W)."""
    from matplotlib.figure import Figure

    from lucid_fn.weights import atomic_write

    n = len(images)
    fig = Figure(figsize=(6, 2 * n))
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        img = images[i]
        img = img[..., 0] if img.shape[-1] == 1 else img
        for ax, pic, title in ((axes[i, 0], img, "image"),
                               (axes[i, 1], colourise(masks[i], num_classes), "ground truth"),
                               (axes[i, 2], colourise(preds[i], num_classes), "prediction")):
            ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
