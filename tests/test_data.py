"""Datasets and the grain pipeline: every source, its errors, augmentation, resumable order."""

import pathlib
import pickle

import numpy as np
import pytest

from lucid_fn.train import DataError, load_config
from lucid_fn.train import config as config_lib
from lucid_fn.train import data, datasets


def data_cfg(*overrides):
    """A DataConfig alone (a training config would also check the model against the
    image size, which these tests vary freely)."""
    d = config_lib.apply_overrides({"data": {}}, overrides)["data"]
    cfg = config_lib.from_dict(d, config_lib.DataConfig, "data")
    config_lib.validate_section(cfg, "data")
    return cfg


def test_digits_are_real_and_split_reproducibly():
    ds = datasets.load(data_cfg())
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.channels) == (1438, 359, 10, 1)
    img, label = ds.train[0]
    assert img.shape == (32, 32, 1) and img.dtype == np.uint8 and 0 <= label < 10
    images, labels = datasets.load_digits_arrays()
    assert images.shape == (1797, 8, 8, 1) and images.max() == 255
    assert np.bincount(labels).min() >= 170  # ~180 per digit
    again = datasets.load(data_cfg())
    np.testing.assert_array_equal(ds.test.labels, again.test.labels)
    other = datasets.load(data_cfg("data.split_seed=1"))
    assert not np.array_equal(ds.test.labels, other.test.labels)
    # Stratified: every class is in the test split in proportion.
    assert np.bincount(ds.test.labels).min() >= 34


def test_channels_conversion():
    ds = datasets.load(data_cfg("data.channels=3", "data.img_size=16"))
    img, _ = ds.test[0]
    assert img.shape == (16, 16, 3) and ds.channels == 3
    np.testing.assert_array_equal(img[..., 0], img[..., 2])


def write_cifar(root, classes=10, n=20):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 \
        else ["train", "test"]
    for name in names:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key: list(rng.integers(0, classes, n))}
        with open(root / name, "wb") as f:
            pickle.dump(d, f)
    return root


def test_cifar10_and_cifar100_pickle_folders(tmp_path):
    root = write_cifar(tmp_path / "cifar-10-batches-py")
    ds = datasets.load(data_cfg("data.name=cifar10", f'data.path="{tmp_path}"'))
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.channels) == (100, 20, 10, 3)
    with open(root / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    np.testing.assert_array_equal(ds.train[0][0], raw.reshape(3, 32, 32).transpose(1, 2, 0))
    write_cifar(tmp_path / "c100" / "cifar-100-python", classes=100)
    ds = datasets.load(data_cfg("data.name=cifar100", f'data.path="{tmp_path / "c100"}"'))
    assert ds.num_classes == 100 and len(ds.train) == 20
    assert datasets.parse_data_arg(str(root)) == {"name": "cifar10", "path": str(root)}


def test_cifar_missing_file_is_named(tmp_path):
    root = write_cifar(tmp_path / "cifar-10-batches-py")
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3.*missing"):
        datasets.load(data_cfg("data.name=cifar10", f'data.path="{root}"'))


def write_folder(root, classes=("cat", "dog"), n=3, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    write_folder(tmp_path / "imgs", n=5)
    ds = datasets.load(data_cfg("data.name=folder", f'data.path="{tmp_path / "imgs"}"',
                                "data.img_size=24"))
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds.train) + len(ds.test) == 10 and set(ds.test.labels) == {0, 1}
    img, _ = ds.train[0]
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8
    assert datasets.parse_data_arg(str(tmp_path / "imgs"))["name"] == "folder"


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        datasets.load(data_cfg("data.name=folder", f'data.path="{tmp_path / "nowhere"}"'))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        datasets.load(data_cfg("data.name=folder", f'data.path="{tmp_path / "empty"}"'))
    write_folder(tmp_path / "a")
    (tmp_path / "a" / "bird").mkdir()
    with pytest.raises(DataError, match="bird.*has no images"):
        datasets.load(data_cfg("data.name=folder", f'data.path="{tmp_path / "a"}"'))
    write_folder(tmp_path / "b")
    (tmp_path / "b" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="unreadable image.*broken.jpg"):
        datasets.load(data_cfg("data.name=folder", f'data.path="{tmp_path / "b"}"'))


def test_npz_arrays_and_their_errors(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 12, 12)), rng.integers(0, 3, 30)
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    ds = datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "a.npz"}"',
                                "data.img_size=12"))
    assert ds.num_classes == 3 and ds.channels == 1 and len(ds.train) + len(ds.test) == 30
    np.savez(tmp_path / "b.npz", x_train=(x * 255).astype(np.uint8), y_train=y,
             x_test=(x[:5] * 255).astype(np.uint8), y_test=y[:5])
    ds = datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "b.npz"}"'))
    assert len(ds.train) == 30 and len(ds.test) == 5
    cfg = data_cfg("data.name=npz", f'data.path="{tmp_path / "b.npz"}"')
    with pytest.raises(DataError, match=r"b\.npz:y_train: label 2 .* out of range \[0, 2\)"):
        datasets.load(cfg, num_classes=2)
    np.savez(tmp_path / "c.npz", pixels=x)
    with pytest.raises(DataError, match="c.npz.*x_train/y_train"):
        datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "c.npz"}"'))
    np.savez(tmp_path / "d.npz", images=x, labels=y[:10])
    with pytest.raises(DataError, match="30 images but labels has 10"):
        datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "d.npz"}"'))
    with pytest.raises(DataError, match="does not exist"):
        datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "none.npz"}"'))


def test_iterator_state_restores_the_exact_order():
    ds = datasets.load(data_cfg())
    aug = data.augment_fn(load_config(None, ["augment.pad_crop=2", "augment.hflip=true"]).augment,
                          32)
    it = data.train_iterator(ds.train, batch_size=32, seed=0, augment=aug)
    for _ in range(50):  # past the first epoch (1438 / 32 = 44 batches)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = data.train_iterator(ds.train, batch_size=32, seed=0, augment=aug)
    again.set_state(state)
    for (xa, ya), (xb, yb) in zip(expected, (next(again) for _ in range(3))):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # Every epoch is a new permutation: no batch of epoch 2 repeats epoch 1's order.
    first = data.train_iterator(ds.train, batch_size=32, seed=0)
    labels = np.concatenate([next(first)[1] for _ in range(88)])
    assert not np.array_equal(labels[:1408], labels[1408:])


def test_augmentation_keeps_shape_and_flips(tmp_path):
    img = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32, 1)
    aug_cfg = load_config(None, ["augment.crop_scale=[0.3, 1.0]", "augment.hflip=true",
                                 "augment.pad_crop=4"]).augment
    fn = data.augment_fn(aug_cfg, 32)
    rng = np.random.default_rng(0)
    outs = [fn((img, 1), rng)[0] for _ in range(10)]
    assert all(o.shape == (32, 32, 1) and o.dtype == np.uint8 for o in outs)
    assert len({o.tobytes() for o in outs}) > 1
    flip_only = data.augment_fn(
        load_config(None, ["augment.hflip=true", "augment.pad_crop=0"]).augment, 32)
    seen = {flip_only((img, 1), np.random.default_rng(s))[0].tobytes() for s in range(10)}
    assert seen == {img.tobytes(), img[:, ::-1].tobytes()}


def test_eval_batches_pad_and_mark_the_last_batch():
    ds = datasets.load(data_cfg())
    batches = list(data.eval_batches(ds.test, 128))
    assert [b[0].shape[0] for b in batches] == [128, 128, 128]
    assert sum(int(b[2].sum()) for b in batches) == 359


def test_worker_processes_give_the_same_batches_and_resume():
    ds = datasets.load(data_cfg())
    aug = data.augment_fn(load_config(None).augment, 32)
    plain = data.train_iterator(ds.train, batch_size=32, seed=0, augment=aug)
    pooled = data.train_iterator(ds.train, batch_size=32, seed=0, augment=aug, workers=2)
    try:
        for _ in range(3):
            np.testing.assert_array_equal(next(plain)[0], next(pooled)[0])
        state = pooled.get_state()
        expected = next(plain)
    finally:
        data.close(pooled)
    again = data.train_iterator(ds.train, batch_size=32, seed=0, augment=aug, workers=2)
    try:
        again.set_state(state)
        np.testing.assert_array_equal(next(again)[1], expected[1])
    finally:
        data.close(again)


class _CreatesAFile:
    """A pickle payload: unpickling it calls ``fn(*args)`` (here: creates a file)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload", ["open", "system"])
def test_cifar_pickles_that_would_run_code_are_refused(tmp_path, payload):
    import os

    root = write_cifar(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    evil = (_CreatesAFile(open, str(marker), "w") if payload == "open"
            else _CreatesAFile(os.system, f"touch {marker}"))
    with open(root / "data_batch_2", "wb") as f:
        pickle.dump({b"data": evil, b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"refusing to read .*data_batch_2.*"
                                        r"(io\.open|posix\.system)"):
        datasets.load(data_cfg("data.name=cifar10", f'data.path="{root}"'))
    assert not marker.exists()


def test_cifar_reader_takes_every_pickle_protocol_numpy_writes(tmp_path):
    """The allow-list admits numpy's array reconstruction at every protocol (2: the
    original files' and _codecs for bytes; 4: the default; 5: _frombuffer)."""
    d = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, np.int64(2)],
         b"filenames": [b"a.png"], b"batch_label": "training batch 1 of 5"}
    for protocol in (2, 4, 5):
        (tmp_path / "b").write_bytes(pickle.dumps(d, protocol=protocol))
        back = datasets.read_cifar_batch(tmp_path / "b")
        np.testing.assert_array_equal(back[b"data"], d[b"data"])
        assert back[b"labels"] == [1, 2] and back[b"filenames"] == [b"a.png"]
    (tmp_path / "b").write_bytes(pickle.dumps(d)[:-20])
    with pytest.raises(DataError, match="cannot read CIFAR file .*'.*b'"):
        datasets.read_cifar_batch(tmp_path / "b")


def test_npz_float_images_in_0_255_are_not_clipped(tmp_path):
    """Float pixels in 0..255 used to be multiplied by 255 and clipped (99.6% became 255)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 8)).astype(np.float32)
    y = np.arange(20) % 2
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=x[:4] / 255 * 0 + 0.5,
             y_test=y[:4])
    ds = datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "a.npz"}"',
                                "data.img_size=8"))
    np.testing.assert_array_equal(ds.train.images[..., 0], x.astype(np.uint8))
    # One scale for both splits: the test split's 0.5 is a dark 0..255 pixel, not grey.
    assert (ds.test.images == 0).all()
    np.savez(tmp_path / "b.npz", images=(x - 128) / 64, labels=y)  # normalised already
    with pytest.raises(DataError, match=r"b\.npz: float images range over \[-2, 1\.98"
                                        r".*0\.\.1 or 0\.\.255"):
        datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "b.npz"}"'))


@pytest.mark.parametrize("labels,message", [
    (np.array(["cat", "dog"] * 5), r"dtype <U3 \(class names\? map them to 0\.\.K-1"),
    (np.arange(10) % 2 * 1.0, r"dtype float64 \(convert with labels\.astype"),
    (np.eye(2)[np.arange(10) % 2], r"shape \(10, 2\).*one-hot\? use labels\.argmax\(1\)"),
])
def test_npz_labels_that_are_not_class_indices_are_named(tmp_path, labels, message):
    np.savez(tmp_path / "a.npz", images=np.zeros((10, 8, 8), np.uint8), labels=labels)
    with pytest.raises(DataError, match=r"a\.npz:labels: labels must be a 1-D integer array.*"
                                        + message):
        datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "a.npz"}"'))


def test_one_example_per_class_is_an_error_before_training(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((3, 8, 8), np.uint8), labels=[0, 1, 2])
    with pytest.raises(DataError, match="leaves no test examples: every class has a single"):
        datasets.load(data_cfg("data.name=npz", f'data.path="{tmp_path / "a.npz"}"'))


def test_split_keeps_a_training_example_of_every_class():
    labels = np.repeat(np.arange(4), 2)
    train, test = datasets.stratified_split(labels, 0.9, 0)
    assert sorted(labels[train]) == [0, 1, 2, 3] and sorted(labels[test]) == [0, 1, 2, 3]


def test_truncated_jpeg_is_found_up_front_and_named(tmp_path):
    from PIL import Image

    write_folder(tmp_path / "a")
    rng = np.random.default_rng(0)
    good = tmp_path / "good.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    blob = good.read_bytes()
    (tmp_path / "a" / "dog" / "cut.jpg").write_bytes(blob[:len(blob) // 2])
    with Image.open(tmp_path / "a" / "dog" / "cut.jpg") as im:
        im.verify()  # what the check used to be: it passes
    with pytest.raises(DataError, match=r"unreadable image .*cut\.jpg.*truncated"):
        datasets.load(data_cfg("data.name=folder", f'data.path="{tmp_path / "a"}"'))


def test_an_image_damaged_after_the_check_is_named_when_read(tmp_path):
    write_folder(tmp_path / "a")
    ds = datasets.load(data_cfg("data.name=folder", f'data.path="{tmp_path / "a"}"'))
    pathlib.Path(ds.train.files[0]).write_bytes(b"gone")
    with pytest.raises(DataError, match=f"unreadable image '{ds.train.files[0]}'"):
        ds.train[0]
