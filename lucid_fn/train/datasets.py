"""Datasets: what they hold, and how each is read and checked.

Every dataset is two random-access sources (train, test) of ``(image uint8 HWC, label)``
pairs at the model's ``img_size`` (``ArraySource``, ``FileSource``; segmentation's are in
``lucid_fn.train.seg_data``). ``load(cfg)`` reads the one a ``DataConfig`` names:
``digits`` (embedded, 1,797 real 8x8 scans), ``cifar10`` / ``cifar100`` (the python-pickle
folders, unpickled without running code), ``folder`` (one subfolder per class, decoded with
Pillow), ``npz`` (arrays). Everything that can be wrong with a dataset is found here,
before training starts, and named: a missing path, an empty folder, an unreadable image, a
label out of range. Batching and augmenting the sources is ``lucid_fn.train.data``'s.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import pickle
from typing import Any, Sequence

import numpy as np

ASSETS = pathlib.Path(__file__).parent / "assets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class DataError(ValueError):
    pass


# --------------------------------------------------------------------------- sources


def resize_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of an HWC uint8 image to size x size (a no-op at that size)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from PIL import Image

    squeeze = img.shape[-1] == 1
    pil = Image.fromarray(img[..., 0] if squeeze else img)
    out = np.asarray(pil.resize((size, size), Image.BILINEAR))
    return out[..., None] if squeeze else out


def convert_channels(img: np.ndarray, channels: int) -> np.ndarray:
    if not channels or img.shape[-1] == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=-1)
    # ITU-R 601 luma, as Pillow's "L" conversion.
    luma = img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]


# In-memory sets whose resized copy stays under this are resized once, up front.
PRERESIZE_BYTES = 256 * 2**20


@dataclasses.dataclass
class ArraySource:
    """In-memory uint8 images (N, H, W, C) and int labels, served at img_size: resized
    once when the resized copy is small (the digits), else per item (CIFAR at 224)."""

    images: np.ndarray
    labels: np.ndarray
    img_size: int
    channels: int = 0

    def __post_init__(self):
        n, h, w, c = self.images.shape
        if (h, w) != (self.img_size, self.img_size) and \
                n * self.img_size**2 * max(c, self.channels) <= PRERESIZE_BYTES:
            self.images = np.stack([convert_channels(resize_uint8(x, self.img_size),
                                                     self.channels) for x in self.images])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = convert_channels(resize_uint8(self.images[i], self.img_size), self.channels)
        return img, np.int32(self.labels[i])

    def subset(self, idx):
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])

    def take(self, idx):
        """A batch at once: one fancy-index when the images are already at img_size."""
        if self.images.shape[1] == self.img_size and (
                not self.channels or self.images.shape[-1] == self.channels):
            return self.images[idx], self.labels[idx].astype(np.int32)
        return stack_items(self[i] for i in idx)


def stack_items(items):
    """``(image, label)`` pairs -> (images (B, H, W, C), labels int32 (B,))."""
    images, labels = zip(*items)
    return np.stack(images), np.array(labels, np.int32)


@dataclasses.dataclass
class FileSource:
    """Image files decoded with Pillow: shorter side resized to img_size, centre crop."""

    files: Sequence[str]
    labels: np.ndarray
    img_size: int
    channels: int = 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        try:
            return self._read(i)
        except Exception as e:  # noqa: BLE001 (a file changed since the up-front check)
            raise DataError(f"unreadable image {self.files[i]!r}: {e}; remove or fix it, then "
                            f"continue with --resume") from None

    def _read(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            w, h = im.size
            s = self.img_size / min(w, h)
            im = im.resize((max(self.img_size, round(w * s)), max(self.img_size, round(h * s))),
                           Image.BILINEAR)
            left = (im.size[0] - self.img_size) // 2
            top = (im.size[1] - self.img_size) // 2
            im = im.crop((left, top, left + self.img_size, top + self.img_size))
            arr = np.asarray(im)
        return (arr[..., None] if arr.ndim == 2 else arr), np.int32(self.labels[i])

    def subset(self, idx):
        return dataclasses.replace(self, files=[self.files[j] for j in idx],
                                   labels=self.labels[idx])


@dataclasses.dataclass
class Dataset:
    name: str
    train: Any
    test: Any
    num_classes: int
    channels: int
    img_size: int
    class_names: list
    task: str = "classify"  # or "segment": labels are masks (lucid_fn.train.seg_data)


# --------------------------------------------------------------------------- loaders


def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """Train and test indices with ``fraction`` of each class held out, reproducibly."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        # At least one test example, and at least one left to train on (one alone: train).
        k = min(max(1, int(round(len(idx) * fraction))), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_arrays():
    """The embedded digits as uint8 (1797, 8, 8, 1) images scaled to 0..255, and labels."""
    with gzip.open(ASSETS / "digits.csv.gz", "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = (table[:, :64].reshape(-1, 8, 8, 1) * 255 + 8) // 16
    return images.astype(np.uint8), table[:, 64].astype(np.int32)


def _check_label_values(labels, where):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        hint = ""
        if labels.ndim == 2:
            hint = " (one-hot? use labels.argmax(1))"
        elif labels.dtype.kind in "USO":
            hint = (" (class names? map them to 0..K-1, e.g. "
                    "np.unique(names, return_inverse=True)[1])")
        elif labels.dtype.kind == "f":
            hint = " (convert with labels.astype(np.int64))"
        raise DataError(f"{where}: labels must be a 1-D integer array, got shape "
                        f"{labels.shape} dtype {labels.dtype}{hint}")
    return labels


def _check_labels(labels, num_classes, where):
    labels = _check_label_values(labels, where)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{where}: label {labels[bad[0]]} at index {bad[0]} is out of range "
                        f"[0, {num_classes}) ({bad.size} such labels); fix the labels or set "
                        f"model.kwargs.num_classes")
    return labels.astype(np.int32)


def _check_images(images, where):
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        hint = ""
        if images.ndim == 4 and images.shape[1] in (1, 3):
            hint = "; this looks like NCHW (channels first): store x.transpose(0, 2, 3, 1)"
        raise DataError(f"{where}: images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3) "
                        f"NHWC, got shape {images.shape}{hint}")
    if np.issubdtype(images.dtype, np.integer) and images.dtype != np.uint8:
        if images.size and (images.min() < 0 or images.max() > 255):
            raise DataError(f"{where}: integer images range over [{images.min()}, "
                            f"{images.max()}]; pixels must be in 0..255")
        images = images.astype(np.uint8)  # exact: every value fits
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{where}: images must be integers 0..255 or floats (0..1 or 0..255), "
                        f"got {images.dtype}")
    if images.dtype != np.uint8 and not np.isfinite(images).all():
        raise DataError(f"{where}: images contain NaN or infinity")
    return images


def float_pixel_scale(arrays, where) -> float:
    """What float images are multiplied by to give 0..255 pixels: 255 when every value of
    every split is in 0..1, 1 when they are in 0..255 and some exceed 1 (one rule for all
    splits, so a dark test split is not read on another scale). Values outside 0..255 are
    not pixels (normalised images?): an error, not a clip."""
    floats = [a for a in arrays if a.dtype != np.uint8 and a.size]
    if not floats:
        return 1.0
    lo, hi = min(float(a.min()) for a in floats), max(float(a.max()) for a in floats)
    if lo < 0 or hi > 255:
        raise DataError(f"{where}: float images range over [{lo:g}, {hi:g}]; pixels must be in "
                        f"0..1 or 0..255 (normalisation is data.mean / data.std). Store the "
                        f"raw pixels")
    return 255.0 if hi <= 1 else 1.0


def to_uint8(images, scale: float):
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images * scale), 0, 255).astype(np.uint8)


# What a CIFAR batch (a pickled dict of bytes keys, a uint8 array, lists of ints and bytes)
# may name when unpickled: numpy's array and scalar reconstruction (numpy 1 and 2 module
# names; protocol 5 pickles use _frombuffer), the bytes encoding of protocol-2 pickles, and
# builtin containers. Anything else (os.system, subprocess, eval...) is refused: a plain
# pickle.load of a crafted "data_batch_1" would run code.
_CIFAR_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", name) for core in ("core", "_core")
     for name in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [(builtins, name) for builtins in ("builtins", "__builtin__")
       for name in ("bytearray", "bytes", "dict", "list", "tuple", "set", "frozenset", "int",
                    "float", "str")])


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR batch holds."""

    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        if module.startswith("numpy.core."):  # numpy 1's name; numpy 2 warns on it
            try:
                return super().find_class("numpy._core." + module[len("numpy.core."):], name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def read_cifar_batch(path) -> Any:
    """One file of the python version of CIFAR, unpickled without running code: only
    numpy arrays and builtin values are built; anything else is a DataError naming it."""
    try:
        with open(path, "rb") as fh:
            return _CifarUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DataError(
            f"refusing to read {str(path)!r}: it is a pickle that asks to build {e}, which "
            f"a CIFAR batch never holds (unpickling it could run code). Use the files of "
            f"the python version of CIFAR from https://www.cs.toronto.edu/~kriz/cifar.html"
        ) from None
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file: any pickle error)
        raise DataError(f"cannot read CIFAR file {str(path)!r}: {e}") from None


def load_cifar(path: str, classes: int):
    root = pathlib.Path(path)
    sub = {10: "cifar-10-batches-py", 100: "cifar-100-python"}[classes]
    if (root / sub).is_dir():
        root = root / sub
    names = ({10: [f"data_batch_{i}" for i in range(1, 6)], 100: ["train"]}[classes],
             {10: ["test_batch"], 100: ["test"]}[classes])
    key = b"labels" if classes == 10 else b"fine_labels"
    splits = []
    for files in names:
        xs, ys = [], []
        for name in files:
            f = root / name
            if not f.is_file():
                raise DataError(f"CIFAR-{classes} file {str(f)!r} is missing; data.path must "
                                f"be the folder '{sub}' from the python version of CIFAR-{classes}")
            d = read_cifar_batch(f)
            try:
                x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                y = np.asarray(d[key])
            except Exception as e:  # noqa: BLE001 (any pickle that is not a CIFAR batch)
                raise DataError(f"cannot read CIFAR-{classes} file {str(f)!r}: {e}") from None
            xs.append(x)
            ys.append(_check_labels(y, classes, str(f)))
        splits.append((np.concatenate(xs), np.concatenate(ys)))
    return splits


def load_npz(path: str, num_classes: int | None):
    f = pathlib.Path(path)
    if not f.is_file():
        raise DataError(f"npz file {str(f)!r} does not exist")
    try:
        z = dict(np.load(f, allow_pickle=False))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read npz file {str(f)!r}: {e}") from None
    if {"x_train", "y_train"} <= z.keys():
        tr, te = ("x_train", "y_train"), ("x_test", "y_test")
    elif {"images", "labels"} <= z.keys():
        tr, te = ("images", "labels"), ("test_images", "test_labels")
    else:
        raise DataError(f"npz file {str(f)!r} has arrays {sorted(z)}; it needs x_train/y_train "
                        f"(optionally x_test/y_test) or images/labels (optionally "
                        f"test_images/test_labels)")
    keys = [(xk, yk) for xk, yk in (tr, te) if xk in z or yk in z]
    for xk, yk in keys:
        if xk not in z or yk not in z:
            raise DataError(f"{f}: has {xk if xk in z else yk} but not "
                            f"{yk if xk in z else xk}; give both or neither")
        _check_label_values(z[yk], f"{f}:{yk}")
        if not len(z[yk]):
            raise DataError(f"{f}: {yk} is empty")
    k = num_classes or int(max(np.max(z[yk]) for _, yk in keys)) + 1
    xs = [_check_images(z[xk], f"{f}:{xk}") for xk, _ in keys]
    scale = float_pixel_scale(xs, str(f))
    out = []
    for x, (xk, yk) in zip(xs, keys):
        y = _check_labels(z[yk], k, f"{f}:{yk}")
        if len(x) != len(y):
            raise DataError(f"{f}: {xk} has {len(x)} images but {yk} has {len(y)} labels")
        out.append((to_uint8(x, scale), y))
    return out, k


def check_image_file(path) -> None:
    """Decode the whole file once, so that a damaged image is named here and not deep in
    the input pipeline mid-training. ``verify`` alone checks the structure (and PNG's
    CRCs) but not JPEG data: a truncated JPEG passes it. JPEGs decode at 1/8 scale
    (``draft``), which still reads every byte, at a fraction of the cost."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.draft(im.mode, (1, 1))
            im.load()
    except Exception as e:  # noqa: BLE001 (Pillow raises many kinds)
        raise DataError(f"unreadable image {str(path)!r}: {e}; remove or fix it") from None


def scan_folder(path: str):
    """Files and labels of an image folder with one subfolder per class, each image checked."""
    from PIL import Image

    root = pathlib.Path(path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"image folder {str(root)!r} {what}; --data takes a folder with one "
                        f"subfolder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {str(root)!r} has no class subfolders; expected "
                        f"{root}/<class>/<image>.jpg")
    files, labels = [], []
    for label, c in enumerate(classes):
        found = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {str(root / c)!r} has no images "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        files += [str(p) for p in found]
        labels += [label] * len(found)
    # Decoding releases the GIL: threads check images on every core (about 2 ms each on one).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for _ in pool.map(check_image_file, files):  # the first damaged file, in order
            pass
    return files, np.asarray(labels, np.int32), classes


def load(cfg, num_classes: int | None = None) -> Dataset:
    """The dataset a ``DataConfig`` names, both splits, checked; ``num_classes`` (the
    model's, when the config sets it) bounds the labels."""
    dataset = _load(cfg, num_classes)
    if not len(dataset.test):
        raise DataError(
            f"the {cfg.name} data{f' at {cfg.path!r}' if cfg.path else ''} leaves no test "
            f"examples: every class has a single example, and one is kept for training. "
            f"Give each class at least 2 examples, or a test split of its own (npz: "
            f"x_test/y_test)")
    if num_classes is not None and dataset.num_classes > num_classes:
        raise DataError(f"the {cfg.name} data has {dataset.num_classes} classes but "
                        f"num_classes is {num_classes}; set model.kwargs.num_classes to at "
                        f"least {dataset.num_classes}")
    return dataset


def _load(cfg, num_classes: int | None) -> Dataset:
    size, ch = cfg.img_size, cfg.channels
    if cfg.name == "digits":
        images, labels = load_digits_arrays()
        tr, te = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
        src = ArraySource(images, labels, size, ch)
        return Dataset("digits", src.subset(tr), src.subset(te), 10, ch or 1, size,
                       [str(i) for i in range(10)])
    if cfg.name in ("cifar10", "cifar100"):
        k = int(cfg.name[5:])
        (xtr, ytr), (xte, yte) = load_cifar(cfg.path, k)
        return Dataset(cfg.name, ArraySource(xtr, ytr, size, ch), ArraySource(xte, yte, size, ch),
                       k, ch or 3, size, [str(i) for i in range(k)])
    if cfg.name == "digit_scenes":
        from lucid_fn.train import seg_data

        return seg_data.digit_scenes(cfg)
    if cfg.name == "seg_folder":
        from lucid_fn.train import seg_data

        return seg_data.load_seg_folder(cfg, num_classes)
    if cfg.name == "npz" and _npz_has_masks(cfg.path):
        from lucid_fn.train import seg_data

        return seg_data.load_seg_npz(cfg.path, dict(np.load(cfg.path, allow_pickle=False)),
                                     cfg, num_classes)
    if cfg.name == "npz":
        splits, k = load_npz(cfg.path, num_classes)
        if len(splits) == 2:
            train, test = (ArraySource(x, y, size, ch) for x, y in splits)
        else:
            src = ArraySource(*splits[0], size, ch)
            tr, te = stratified_split(src.labels, cfg.test_fraction, cfg.split_seed)
            train, test = src.subset(tr), src.subset(te)
        return Dataset("npz", train, test, k, ch or splits[0][0].shape[-1], size,
                       [str(i) for i in range(k)])
    if cfg.name == "folder":
        files, labels, classes = scan_folder(cfg.path)
        if num_classes is not None:
            _check_labels(labels, num_classes, cfg.path)
        src = FileSource(files, labels, size, ch or 3)
        tr, te = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
        return Dataset("folder", src.subset(tr), src.subset(te), len(classes), ch or 3, size,
                       classes)
    raise DataError(f"unknown dataset {cfg.name!r}")


def _npz_has_masks(path) -> bool:
    """Whether an npz holds segmentation masks (read from its index, no array loaded)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return "masks" in z.files or "test_masks" in z.files
    except Exception:  # noqa: BLE001 (load_npz names what is wrong with the file)
        return False


def parse_data_arg(arg: str) -> dict:
    """``--data digits`` / ``--data cifar10:/data/cifar-10-batches-py`` /
    ``--data /some/folder`` / ``--data arrays.npz`` -> data config fields."""
    name, sep, path = arg.partition(":")
    if sep and name in ("digits", "cifar10", "cifar100", "folder", "npz", "seg_folder"):
        return {"name": name, "path": path}
    if arg in ("digits", "cifar10", "cifar100", "digit_scenes"):
        return {"name": arg}
    p = pathlib.Path(arg)
    if p.suffix == ".npz":
        return {"name": "npz", "path": arg}
    for k, sub in ((10, "cifar-10-batches-py"), (100, "cifar-100-python")):
        if p.name == sub or (p / sub).is_dir():
            return {"name": f"cifar{k}", "path": arg}
    if (p / "images").is_dir() and any((p / m).is_dir() for m in ("annotations", "masks")):
        return {"name": "seg_folder", "path": arg}
    return {"name": "folder", "path": arg}
