"""Input pipelines: augmentation, and the batches that training and evaluation read.

The pipeline is grain's over whole batches: each epoch a fresh seeded permutation,
augmentation seeded by batch index, optional multi-process prefetch, and an iterator whose
state is a small dict that goes into every checkpoint, so a resumed run sees exactly the
batches the interrupted one would have. Images travel as uint8 and are normalised on the
device (``normalize``).

The datasets the pipelines read (sources, their readers and checks) are
``lucid_fn.train.datasets``'s; ``load``, ``load_digits_arrays`` and ``stratified_split`` are
also here, where the README and the notebooks use them (``data.load(cfg.data)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lucid_fn.train.datasets import DataError, resize_uint8, stack_items
# User-facing as data.load etc. (README, notebooks), next to data.train_iterator.
from lucid_fn.train.datasets import load, load_digits_arrays, stratified_split  # noqa: F401


# ------------------------------------------------------------------ augmentation


def augment_fn(cfg, img_size: int):
    """Augmentation ``(image or batch, label(s)), np.random.Generator -> same``."""
    scale, pad, flip = cfg.crop_scale, cfg.pad_crop, cfg.hflip

    def random_resized_crop(img, rng):
        h, w = img.shape[:2]
        for _ in range(10):
            area = h * w * rng.uniform(*scale)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                break
        else:
            ch, cw, top, left = h, w, 0, 0
        return resize_uint8(img[top:top + ch, left:left + cw], img_size)

    def one(img, rng):
        if scale:
            img = random_resized_crop(img, rng)
        if pad:
            padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
            top, left = rng.integers(0, 2 * pad + 1, size=2)
            img = padded[top:top + img_size, left:left + img_size]
        if flip and rng.random() < 0.5:
            img = img[:, ::-1]
        return np.ascontiguousarray(img)

    def fn(example, rng, first_row: int = 0):
        """``first_row``: the row of the global batch that ``example``'s first image is."""
        img, label = example
        if img.ndim == 4:
            # Row k of the global batch draws from its own stream, keyed by one number of
            # the batch's generator (grain seeds it per batch index, the same on every
            # host): a host augmenting its rows gets what one process augmenting the whole
            # batch would. Philox takes a key in a fraction of default_rng's set-up time.
            base = int(rng.integers(2**63))
            return np.stack([one(x, np.random.Generator(np.random.Philox(
                key=[base, first_row + k]))) for k, x in enumerate(img)]), label
        return one(img, rng), label

    return fn


# ------------------------------------------------------------------- pipelines


def _prefetch(ds, workers: int):
    """``workers`` processes prepare elements ahead of the consumer (none: in process)."""
    if not workers:
        return ds
    import grain

    _absl_flags_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which only an absl app parses; outside
    one (our CLI, notebooks, pytest) mark them parsed so their defaults apply."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass
class EpochBatches:
    """Random access to the batches of an endless sequence of epochs: batch ``i`` is a
    slice of epoch ``i // per_epoch``'s permutation (each epoch drawn from ``(seed,
    epoch)``, the last partial batch dropped). grain shuffles example by example, which
    measured slower than the train step it feeds (README, Training); whole batches keep
    grain's checkpointable iterator and worker processes at a fraction of the cost.

    ``batch_size`` is the global batch; with ``part=(index, count)`` a batch is the
    ``index``-th of its ``count`` equal slices of rows, which is what one of ``count``
    processes reads: together they read exactly the batches one process would."""

    source: Any
    batch_size: int
    seed: int
    part: tuple = (0, 1)

    def __post_init__(self):
        self.per_epoch = len(self.source) // self.batch_size
        index, count = self.part
        self.rows = self.batch_size // count
        self.first_row = index * self.rows
        self._cached = (None, None)

    def __len__(self) -> int:
        return self.per_epoch * 10**9  # endless in practice: a billion epochs

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            self._cached = (epoch, rng.permutation(len(self.source)))
        return self._cached[1]

    def __getitem__(self, i):
        epoch, j = divmod(int(i), self.per_epoch)
        start = j * self.batch_size + self.first_row
        idx = self.permutation(epoch)[start:start + self.rows]
        if hasattr(self.source, "take"):
            return self.source.take(idx)
        return stack_items(self.source[k] for k in idx)


def check_part(batch_size: int, process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count or batch_size % process_count:
        raise DataError(f"a batch of {batch_size} cannot be split into {process_count} equal "
                        f"parts for process {process_index}; make train.batch_size a "
                        f"multiple of the number of processes")


def train_iterator(source, *, batch_size: int, seed: int, augment=None, workers: int = 0,
                   process_index: int = 0, process_count: int = 1):
    """An endless iterator of ``(images uint8 (B, H, W, C), labels int32 (B,))`` batches,
    reshuffled every epoch, augmented by ``augment(batch, rng)`` (``augment(batch, rng,
    first_row=...)`` on processes after the first: see ``augment_fn``); ``.get_state()`` /
    ``.set_state()`` checkpoint it. ``batch_size`` is the global batch: each of
    ``process_count`` processes gets its ``process_index``-th slice of every batch
    (``batch_size / process_count`` rows), drawn and augmented as one process would."""
    import grain

    check_part(batch_size, process_index, process_count)
    if len(source) < batch_size:
        raise DataError(f"the training split has {len(source)} examples, fewer than one batch "
                        f"of {batch_size}; lower train.batch_size")
    batches = EpochBatches(source, batch_size, seed, (process_index, process_count))
    ds = grain.MapDataset.source(batches)
    if augment is not None:
        # Seeded per batch index: a resumed iterator redraws the same augmentation. A
        # process's rows are told where they sit in the batch (augment_fn's first_row).
        first = batches.first_row
        fn = augment if not first else lambda ex, rng: augment(ex, rng, first_row=first)
        ds = ds.seed(seed).random_map(fn)
    return iter(_prefetch(ds.to_iter_dataset(), workers))


@dataclasses.dataclass
class EvalBatches:
    """The batches of a split in order, each ``batch_size`` rows (the last padded), of
    which one process reads its ``part=(index, count)`` slice as ``(images, labels,
    valid)``; ``valid`` marks real examples."""

    source: Any
    batch_size: int
    part: tuple = (0, 1)

    def __len__(self) -> int:
        return -(-len(self.source) // self.batch_size)

    def __getitem__(self, b):
        index, count = self.part
        rows = self.batch_size // count
        start = int(b) * self.batch_size + index * rows
        idx = np.arange(start, min(start + rows, len(self.source)))
        # A source whose take() gives raw items for training's augmentation (segmentation's)
        # is read item by item: its items are what evaluation sees.
        take = None if getattr(self.source, "take_is_raw", False) else \
            getattr(self.source, "take", None)
        if len(idx):
            images, labels = take(idx) if take else stack_items(self.source[i] for i in idx)
        else:  # a slice past the end: all padding, shaped as the split's examples
            image, label = map(np.asarray, self.source[0])
            images = np.zeros((0,) + image.shape, image.dtype)
            labels = np.zeros((0,) + label.shape, np.int32)
        return _pad(images, labels, rows)


def eval_batches(source, batch_size: int, workers: int = 0, process_index: int = 0,
                 process_count: int = 1, batches=EvalBatches):
    """The whole split in order, as ``(images, labels, valid)`` batches of exactly
    ``batch_size`` (the last one padded, ``valid`` marks real examples), so evaluation
    compiles once; each of ``process_count`` processes gets its slice of every batch.
    ``batches(source, batch_size, part)``: another plan of them (segmentation's
    ``WholeImageBatches``)."""
    import grain

    check_part(batch_size, process_index, process_count)
    ds = grain.MapDataset.source(batches(source, batch_size, (process_index, process_count)))
    it = iter(_prefetch(ds.to_iter_dataset(), workers))
    try:
        yield from it
    finally:
        close(it)


def close(iterator) -> None:
    """Stop an iterator's worker processes now rather than at interpreter exit."""
    if hasattr(iterator, "close"):
        iterator.close()


def _pad(images, labels, rows: int):
    """``rows`` examples (labels: class indices, or masks for segmentation), zero rows
    appended, and ``valid`` marking the real ones."""
    n = len(labels)
    valid = np.zeros(rows, bool)
    valid[:n] = True
    if n < rows:
        images = np.concatenate([images, np.zeros((rows - n,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros((rows - n,) + labels.shape[1:], labels.dtype)])
    return images, labels.astype(np.int32), valid


def normalize(images, mean, std):
    """uint8 NHWC -> float32 on the device: (x / 255 - mean) / std per channel."""
    import jax.numpy as jnp

    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def mean_std(cfg, channels: int):
    mean = list(cfg.mean) or [0.5] * channels
    std = list(cfg.std) or [0.5] * channels
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"data.mean / data.std need {channels} values (one per channel), got "
                        f"{mean} / {std}")
    return mean, std
