"""ImageNet-1k class names and preprocessing, against timm's evaluation transform on
crops of real photographs (tests/fixtures/timm_preprocess.npz, made by
tools/make_preprocess_fixture.py)."""

import hashlib
import json

import numpy as np
import pytest

from lucid_fn import imagenet
from lucid_fn.pretrained import PRETRAINED


def config_of(timm_cfg: dict) -> imagenet.InputConfig:
    return imagenet.InputConfig(img_size=timm_cfg["input_size"][1],
                                crop_fraction=timm_cfg["crop_pct"],
                                interpolation=timm_cfg["interpolation"],
                                crop_mode=timm_cfg["crop_mode"], mean=tuple(timm_cfg["mean"]),
                                std=tuple(timm_cfg["std"]))


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return np.load(fixtures_dir / "timm_preprocess.npz")


def test_preprocess_equals_timms_eval_transform(reference):
    configs = [config_of(c) for c in json.loads(str(reference["configs"]))]
    # The table's input configs are among those checked.
    assert {e.input for e in PRETRAINED.values()} <= set(configs)
    images = sorted(k for k in reference.files if k.startswith("image_"))
    assert len(images) == 3
    for i in range(len(images)):
        image = reference[f"image_{i}"]
        for j, cfg in enumerate(configs):
            (ours,) = imagenet.preprocess(image, cfg)
            assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
            rows = ours[[0, 112, 223]]
            assert np.abs(rows - reference[f"rows_{i}_{j}"]).max() <= 1e-5, (i, j)
            stats = [ours.mean(dtype=np.float64), ours.std(dtype=np.float64), ours.min(),
                     ours.max()]
            np.testing.assert_allclose(stats, reference[f"stats_{i}_{j}"], rtol=0, atol=1e-6)
            # Same PIL filter, same crop offsets, same float32 arithmetic: bit for bit.
            digest = hashlib.sha256(np.ascontiguousarray(ours).tobytes()).hexdigest()
            assert digest == str(reference[f"sha256_{i}_{j}"]), (i, j)


def test_preprocess_takes_pil_images_arrays_and_batches(reference):
    from PIL import Image

    image = reference["image_1"]
    cfg = PRETRAINED["pvt_v2_b0.in1k"].input
    one = imagenet.preprocess(image, cfg)
    np.testing.assert_array_equal(imagenet.preprocess(image, "pvt_v2_b0"), one)
    np.testing.assert_array_equal(imagenet.preprocess(Image.fromarray(image), cfg), one)
    batch = imagenet.preprocess(np.stack([image, image[::-1]]), cfg)
    assert batch.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(batch[:1], one)
    gray = imagenet.preprocess(image[..., 0], cfg)  # grayscale becomes 3 equal channels
    assert gray.shape == (1, 224, 224, 3)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], -1)
    np.testing.assert_array_equal(imagenet.preprocess(rgba, cfg), one)


def test_preprocess_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="uint8.*float64.*astype"):
        imagenet.preprocess(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="channels last; got shape .3, 8, 8."):
        imagenet.preprocess(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="crop_fraction"):
        imagenet.InputConfig(crop_fraction=1.5)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        imagenet.InputConfig(interpolation="area")


def test_class_names_are_imagenet_1k_in_logit_order():
    names, ids = imagenet.class_names(), imagenet.synsets()
    assert len(names) == len(set(ids)) == 1000
    assert names[0] == "tench, Tinca tinca" and ids[0] == "n01440764"
    assert names[281] == "tabby, tabby cat" and names[999].startswith("toilet tissue")
    assert ids == sorted(ids)  # the 1k classes are indexed in WordNet id order
