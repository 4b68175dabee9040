"""Segmentation training: metrics against hand-computed values, the mask pipeline, data
errors, and one short run of Semantic FPN on the digit scenes (loss falls, gradients
reach the backbone, outputs, exact resume, evaluation of the written files)."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_fn import weights
from lucid_fn.train import ConfigError, fit, load_config, read_metrics
from lucid_fn.train import config as config_lib
from lucid_fn.train import datasets as datasets_lib
from lucid_fn.train import seg_augment, seg_data, segmentation
from lucid_fn.train.datasets import DataError
from lucid_fn.train.loop import evaluate_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
I = segmentation.IGNORE


# ------------------------------------------------------------------ metrics


def test_confusion_matrix_and_miou_by_hand():
    """3 classes. Truth and prediction over 8 pixels, two ignored; class 2 never true but
    predicted once; a 4th class neither true nor predicted (no IoU)."""
    truth = np.array([[[0, 0, 1, 1], [0, I, 1, I]]])
    pred = np.array([[[0, 1, 1, 1], [2, 0, 0, 2]]])
    cm = np.asarray(jax.jit(segmentation.confusion_matrix, static_argnums=2)(
        jnp.asarray(pred), jnp.asarray(truth), 4))
    # Counted pixels: (0,0) (0,1) (1,1) (1,1) (0,2) (1,0).
    want = np.zeros((4, 4), int)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (0, 2), (1, 0)]:
        want[t, p] += 1
    np.testing.assert_array_equal(cm, want)
    m = segmentation.iou_metrics(cm)
    # IoU_0 = 1 / (3 + 2 - 1) = 1/4; IoU_1 = 2 / (3 + 3 - 2) = 1/2; IoU_2 = 0 / (0 + 1 - 0).
    assert m["per_class_iou"] == [0.25, 0.5, 0.0, None]
    assert math.isclose(m["miou"], (0.25 + 0.5 + 0.0) / 3)
    assert math.isclose(m["pixel_accuracy"], 3 / 6)
    # An image marked invalid (eval padding) counts nowhere.
    both = jnp.concatenate([jnp.asarray(truth)] * 2)
    cm2 = segmentation.confusion_matrix(jnp.concatenate([jnp.asarray(pred)] * 2), both, 4,
                                        valid=jnp.array([True, False]))
    np.testing.assert_array_equal(np.asarray(cm2), want)


def test_pixel_loss_skips_ignored_pixels():
    logits = jax.random.normal(jax.random.key(0), (1, 2, 2, 3))
    masks = jnp.array([[[0, I], [2, I]]])
    loss, correct, count = segmentation.mean_pixel_loss(logits, masks)
    logp = jax.nn.log_softmax(logits)
    want = -(logp[0, 0, 0, 0] + logp[0, 1, 0, 2]) / 2
    assert int(count) == 2 and math.isclose(float(loss), float(want), rel_tol=1e-6)
    all_ignored = segmentation.mean_pixel_loss(logits, jnp.full((1, 2, 2), I))
    assert float(all_ignored[0]) == 0.0


def test_poly_schedule():
    """lr * (1 - t / T) ** power after the warmup, to lr * final_lr_ratio at the end."""
    from lucid_fn.train import step as step_lib

    ocfg = config_lib.OptimConfig(lr=1e-3, schedule="poly", poly_power=0.9)
    f = step_lib.make_schedule(ocfg, 100)
    for t in (0, 50, 99, 100):
        want = 1e-3 * (1 - t / 100) ** 0.9
        assert math.isclose(float(f(t)), want, rel_tol=1e-5, abs_tol=1e-12)
    warm = step_lib.make_schedule(config_lib.OptimConfig(lr=1e-3, schedule="poly",
                                                         warmup_steps=10), 110)
    assert math.isclose(float(warm(5)), 5e-4, rel_tol=1e-5)
    assert math.isclose(float(warm(60)), 1e-3 * 0.5 ** 0.9, rel_tol=1e-5)


# ------------------------------------------------------------------ mask pipeline


def test_augmentation_moves_whole_pixels_of_image_and_mask_together():
    """Random rescale, crop and flip: masks keep exactly their class indices (plus 255
    padding), and where no resize happens the image and the mask move together."""
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 7, (4, 40, 56)).astype(np.int32)
    masks[:, :3] = I
    images = (masks * 30 % 256).astype(np.uint8)[..., None]
    acfg = config_lib.AugmentConfig(scale_range=[0.5, 2.0], hflip=True)
    out_img, out_mask = seg_augment.augment_fn(acfg, 32)(list(zip(images, masks)), rng)
    assert out_img.shape == (4, 32, 32, 1) and out_mask.shape == (4, 32, 32)
    assert out_img.dtype == np.uint8 and out_mask.dtype == np.int32
    assert set(np.unique(out_mask)) <= set(range(7)) | {I}
    # No rescale (shorter side already 40): crop and flip only, so pixel for pixel the image
    # is still its mask's function.
    flips = seg_augment.augment_fn(config_lib.AugmentConfig(hflip=True), 40)
    out_img, out_mask = flips(list(zip(images, masks)), np.random.default_rng(1))
    np.testing.assert_array_equal(out_img[..., 0], (out_mask * 30 % 256).astype(np.uint8))
    # The evaluation form: the longer side fits, the rest is ignored padding.
    img, mask = seg_data.fit_and_pad(images[0], masks[0], 28)
    assert img.shape == (28, 28, 1) and (mask[20:] == I).all()
    assert set(np.unique(mask)) <= set(range(7)) | {I}


def test_each_row_draws_its_own_stream_so_processes_split_a_batch():
    """A process augmenting rows 2.. of a batch (first_row=2) gets those rows of the whole
    batch augmented at once, from the same batch generator (grain seeds it per batch)."""
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 5, (4, 40, 56)).astype(np.int32)
    images = rng.integers(0, 255, (4, 40, 56, 3)).astype(np.uint8)
    acfg = config_lib.AugmentConfig(scale_range=[0.5, 2.0], hflip=True, photometric=True,
                                    cat_max_ratio=0.75)
    fn = seg_augment.augment_fn(acfg, 32)
    items = list(zip(images, masks))
    whole = fn(items, np.random.default_rng(9))
    part = fn(items[2:], np.random.default_rng(9), first_row=2)
    for a, b in zip(whole, part):
        np.testing.assert_array_equal(a[2:], b)
    assert not np.array_equal(whole[1][0], whole[1][1])  # rows differ from each other


def test_crops_where_one_class_dominates_are_redrawn():
    """augment.cat_max_ratio=0.75, as mmseg's RandomCrop: of 16x16 crops of a 64x64 mask
    that is class 0 but for a 20x20 corner of class 1, the redrawn ones mix the classes far
    more often; and image and mask stay one crop."""
    mask = np.zeros((64, 64), np.int32)
    mask[:20, :20] = 1
    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    image = np.stack([rows, cols, rows], -1).astype(np.uint8)  # a pixel says where it was
    items = [(image, mask)] * 64

    def mixed(**kw):  # scale 4: the 64x64 item is kept as it is, and cropped to 16x16
        acfg = config_lib.AugmentConfig(scale_range=[4.0, 4.0], **kw)
        imgs, masks = seg_augment.augment_fn(acfg, 16)(items, np.random.default_rng(3))
        for img, m in zip(imgs, masks):
            top, left = img[0, 0, :2]
            np.testing.assert_array_equal(m, mask[top:top + 16, left:left + 16])
        return sum(not seg_augment.dominated(m, 0.75) for m in masks)

    plain, redrawn = mixed(), mixed(cat_max_ratio=0.75)
    assert redrawn >= 3 * max(plain, 1), (plain, redrawn)
    assert seg_augment.dominated(np.array([[0, 0, 0, 1]]), 0.75)
    assert not seg_augment.dominated(np.array([[0, 0, 1, 1]]), 0.75)
    assert seg_augment.dominated(np.array([[2, 2, I, I]]), 0.75)  # one class only


def test_hsv_conversions_and_photometric_distortion():
    import colorsys

    rgb = np.random.default_rng(0).uniform(0, 255, (50, 3))
    hsv = seg_augment.rgb_to_hsv(rgb)
    for (r, g, b), (h, s, v) in zip(rgb, hsv):
        want = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        np.testing.assert_allclose((h / 360, s, v / 255), want, atol=1e-9)
    np.testing.assert_allclose(seg_augment.hsv_to_rgb(hsv), rgb, atol=1e-9)
    red = np.array([[255.0, 0, 0]])
    turned = seg_augment.rgb_to_hsv(red) + [120, 0, 0]
    np.testing.assert_allclose(seg_augment.hsv_to_rgb(turned), [[0, 255, 0]], atol=1e-9)
    # A gray image stays gray; a distortion is a function of the generator's draws.
    gray = np.repeat(np.random.default_rng(1).integers(0, 255, (8, 8, 1)), 3, -1).astype(np.uint8)
    outs = [seg_augment.photometric_distortion(gray, np.random.default_rng(k)) for k in range(16)]
    for k, out in enumerate(outs):
        assert out.dtype == np.uint8 and out.shape == gray.shape
        assert (out == out[..., :1]).all()
        np.testing.assert_array_equal(
            out, seg_augment.photometric_distortion(gray, np.random.default_rng(k)))
    assert sum(not np.array_equal(o, gray) for o in outs) >= 8
    colour = np.random.default_rng(2).integers(0, 255, (8, 8, 3)).astype(np.uint8)
    hues = {tuple(seg_augment.photometric_distortion(colour, np.random.default_rng(k))[0, 0])
            for k in range(16)}
    assert len(hues) >= 8


def test_digit_scenes_are_fixed_and_test_scenes_use_held_out_scans():
    cfg = config_lib.DataConfig(name="digit_scenes", img_size=32)
    a, b = seg_data.digit_scenes(cfg), seg_data.digit_scenes(cfg)
    assert a.num_classes == 11 and a.task == "segment"
    np.testing.assert_array_equal(a.test.masks, b.test.masks)
    np.testing.assert_array_equal(a.train.raw(5)[1], b.train.raw(5)[1])
    shard = a.train.subset(np.arange(1, 100, 2))  # a host's shard: the same scenes
    np.testing.assert_array_equal(shard.raw(2)[1], a.train.raw(5)[1])
    scans, labels = datasets_lib.load_digits_arrays()
    tr, te = datasets_lib.stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    assert len(a.test.masks) == seg_data.TEST_SCENES
    assert (a.train.scans == scans[tr]).all() and (a.test.masks.max() <= 10)
    assert set(map(bytes, scans[te])).isdisjoint(map(bytes, a.train.scans[:200]))


# ------------------------------------------------------------------ data errors


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _seg_folder(root, n=3, size=(12, 16)):
    for i in range(n):
        _png(root / "images" / f"im{i}.png", np.full((*size, 3), 40 * i))
        _png(root / "annotations" / f"im{i}.png", np.full(size, i % 3))
    return root


def _load(name, path, **kw):
    cfg = config_lib.DataConfig(name=name, path=str(path), img_size=32)
    return datasets_lib.load(cfg, **kw)


def test_seg_folder_loads(tmp_path):
    ds = _load("seg_folder", _seg_folder(tmp_path))
    assert ds.task == "segment" and ds.num_classes == 3
    img, mask = ds.test[0]
    assert img.shape == (32, 32, 3) and mask.shape == (32, 32)
    assert datasets_lib.parse_data_arg(str(tmp_path))["name"] == "seg_folder"


def test_missing_mask_names_the_image(tmp_path):
    root = _seg_folder(tmp_path)
    (root / "annotations" / "im1.png").unlink()
    with pytest.raises(DataError, match=r"im1\.png' has no mask: expected .*annotations"):
        _load("seg_folder", root)


def test_mask_of_another_size_names_the_file(tmp_path):
    root = _seg_folder(tmp_path)
    _png(root / "annotations" / "im2.png", np.zeros((12, 15)))
    with pytest.raises(DataError, match=r"mask '.*im2\.png' is 15x12 but its image .* is "
                                         r"16x12"):
        _load("seg_folder", root)


def test_class_index_out_of_range_names_the_file(tmp_path):
    root = _seg_folder(tmp_path)
    _png(root / "annotations" / "im0.png", np.full((12, 16), 7))
    with pytest.raises(DataError, match=r"im0\.png: mask holds class index 7, out of range "
                                         r"\[0, 5\)"):
        _load("seg_folder", root, num_classes=5)


def test_colour_mask_is_refused(tmp_path):
    root = _seg_folder(tmp_path)
    _png(root / "annotations" / "im0.png", np.zeros((12, 16, 3)))
    with pytest.raises(DataError, match=r"im0\.png' has 3 channels"):
        _load("seg_folder", root)


def test_npz_masks_are_checked(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    f = tmp_path / "seg.npz"
    np.savez(f, images=images, masks=np.zeros((4, 8, 8), np.int64))
    assert _load("npz", f).task == "segment"
    np.savez(f, images=images, masks=np.zeros((4, 8, 9), np.int64))
    with pytest.raises(DataError, match=r"seg\.npz: masks are 9x8 but images are 8x8"):
        _load("npz", f)
    masks = np.zeros((4, 8, 8), np.int64)
    masks[2, 3, 3] = 9
    np.savez(f, images=images, masks=masks)
    with pytest.raises(DataError, match=r"seg\.npz:masks: mask holds class index 9"):
        _load("npz", f, num_classes=4)


def test_task_mismatch_is_named_before_compiling(tmp_path):
    cfg = load_config(None, [f'train.workdir="{tmp_path / "w"}"', "model.name=semantic_fpn",
                             'model.kwargs={backbone="pvt_v2_b0"}'])
    with pytest.raises(ConfigError, match="segments images .* one label per image"):
        fit(cfg, progress=False)
    with pytest.raises(ConfigError, match="augment.pad_crop is an image-classification"):
        fit(seg_config(tmp_path / "x", "augment.pad_crop=2"), progress=False)
    cfg = load_config(None, [f'train.workdir="{tmp_path / "y"}"', "augment.photometric=true"])
    with pytest.raises(ConfigError, match="augment.photometric is a segmentation augmentation"):
        fit(cfg, progress=False)


# ------------------------------------------------------------------ a short run

SMALL = ["model.kwargs={backbone='pvt_v2_b0', embed_dims=[16, 16, 16, 16], "
         "num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], "
         "sr_ratios=[2, 1, 1, 1], fpn_channels=16, head_channels=16, norm_groups=4}",
         "data.img_size=32", "optim.lr=5e-3", "optim.warmup_steps=0", "train.steps=6",
         "train.batch_size=8", "train.log_every=2", "train.checkpoint_every=3",
         "train.eval_every=0", "train.eval_batch_size=250", "augment.hflip=true",
         "augment.scale_range=[0.75, 1.25]"]


def seg_config(workdir, *extra):
    return load_config(ROOT / "configs" / "digit_scenes_seg.toml",
                       SMALL + [f'train.workdir="{workdir}"', *extra])


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seg_run")
    result = fit(seg_config(workdir), progress=False)
    return workdir, result


def test_short_run_learns_and_writes_its_outputs(seg_run):
    workdir, result = seg_run
    rows = read_metrics(workdir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    final = rows[-1]
    assert final["test_examples"] == seg_data.TEST_SCENES
    assert 0 <= final["test_miou"] <= 1 and len(final["test_iou"]) == 11
    assert result["test_miou"] == final["test_miou"]
    for name in ("curves.png", "predictions.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Gradients reached every part: the backbone's first and last stages, the neck and the
    # head all moved. (Not every leaf: at 32x32 stage 4 is one token, whose attention over
    # a single key ignores its query, so q's bias there has no gradient.)
    params, model = weights.load(workdir / "model.safetensors")
    init = model.init(jax.random.fold_in(jax.random.key(0), 1))
    for path in (("backbone", "stage1", "patch_embed", "proj", "kernel"),
                 ("backbone", "stage4", "blocks", "mlp", "fc1", "kernel"),
                 ("backbone", "stage4", "blocks", "attn", "kv", "kernel"),
                 ("neck", "lateral4", "kernel"), ("head", "level1", "conv0", "kernel"),
                 ("head", "cls", "kernel")):
        a, b = params, init
        for k in path:
            a, b = a[k], b[k]
        assert float(jnp.abs(a - b).min()) > 0, path
    # `lucid-fn eval model.safetensors --data digit_scenes` gives the run's own numbers.
    out = evaluate_file(workdir / "model.safetensors", {"name": "digit_scenes"},
                        batch_size=250)
    assert math.isclose(out["test_miou"], final["test_miou"], rel_tol=1e-6)
    for got, want in zip(out["test_iou"], final["test_iou"]):
        assert (got is None and want is None) or math.isclose(got, want, rel_tol=1e-6)


def test_interrupted_run_resumes_exactly(seg_run, tmp_path):
    workdir_a, _ = seg_run

    def crash(step, row):
        if step == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(seg_config(tmp_path), progress=False, callbacks=[crash])
    fit(seg_config(tmp_path), resume=True, progress=False)
    a, _ = weights.load(workdir_a / "model.safetensors")
    b, _ = weights.load(tmp_path / "model.safetensors")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_digit_scenes_config_reaches_miou_075(tmp_path):
    """configs/digit_scenes_seg.toml as shipped: mIoU >= 0.75 over the 11 classes on the
    held-out scenes (a few minutes on 2 cores; docs/segmentation.md)."""
    cfg = load_config(ROOT / "configs" / "digit_scenes_seg.toml", [f'train.workdir="{tmp_path}"'])
    result = fit(cfg, progress=False)
    assert result["test_miou"] >= 0.75


# ------------------------------------------------------------ mmseg's evaluation


@pytest.mark.parametrize("hw, want", [
    ((512, 683), (512, 704)),    # shorter side already 512: only aligned to 32
    ((480, 640), (512, 704)),    # x 16/15: 512 x 682.7 -> 683 -> 704
    ((256, 2000), (288, 2048)),  # the longer side caps it: x 1.024 -> 262 x 2048 -> 288
    ((1000, 1000), (512, 512)),
    ((700, 300), (1216, 512)),   # portrait: x 512/300 -> 1194.7 -> 1195 -> 1216
])
def test_whole_image_size_is_the_papers_rescale_and_align(hw, want):
    """mmcv's imrescale at scale (2048, 512) (the factor that keeps the shorter side <= 512
    and the longer <= 2048, sides rounded half up), then AlignResize's ceil to 32."""
    assert seg_data.whole_image_size(*hw, size=512, stride=32) == want


def test_resize_logits_is_bilinear_to_each_images_own_size():
    """Down and up, non-integer factors, into one canvas: jax.image.resize's linear form
    without antialiasing (PyTorch's bilinear, align_corners=False) for each image."""
    logits = jax.random.normal(jax.random.key(0), (3, 8, 12, 4)).astype(jnp.bfloat16)
    sizes = jnp.array([[5, 7], [16, 21], [8, 12]], jnp.int32)
    got = segmentation.resize_logits(logits, sizes, (16, 21))
    assert got.shape == (3, 16, 21, 4) and got.dtype == jnp.float32
    for b, (h, w) in enumerate(np.asarray(sizes)):
        want = jax.image.resize(logits[b].astype(jnp.float32), (h, w, 4), "linear",
                                antialias=False)
        np.testing.assert_allclose(got[b, :h, :w], want, rtol=1e-5, atol=1e-5)


def _sized_folder(root, sizes):
    """A seg_folder whose images have the given (h, w): colour ramps across and down with
    noise, masks of 3 classes with a few ignored pixels."""
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        for i, (h, w) in enumerate(sizes):
            ramps = np.stack(np.meshgrid(np.linspace(0, 255, h), np.linspace(0, 255, w),
                                         indexing="ij"), -1)
            img = np.concatenate([ramps, rng.integers(0, 255, (h, w, 1))], -1)
            _png(root / "images" / split / f"im{i}.png", img)
            mask = rng.integers(0, 3, (h, w))
            mask[0, :3] = I
            _png(root / "annotations" / split / f"im{i}.png", mask)
    return root


SIZES = [(40, 56), (24, 24), (60, 20), (44, 56), (33, 47)]


def test_whole_image_batches_group_by_size_and_keep_masks_at_their_own(tmp_path):
    ds = _load("seg_folder", _sized_folder(tmp_path, SIZES))
    plan = seg_data.WholeImageBatches(ds.test, 2, size=32, stride=32)
    shapes = [seg_data.whole_image_size(h, w, 32, 32) for h, w in SIZES]
    # (40, 56), (44, 56), (33, 47) share 32 x 64; batches of 2 within a group
    assert sorted(len(idx) for _, _, idx in plan.plan) == [1, 1, 1, 2]
    seen = 0
    for b in range(len(plan)):
        images, masks, valid, sizes = plan[b]
        shape, canvas, idx = plan.plan[b]
        assert images.shape == (2, *shape, 3) and masks.shape == (2, *canvas)
        for j, i in enumerate(idx):
            h, w = SIZES[i]
            assert shapes[i] == shape and tuple(sizes[j]) == (h, w) and valid[j]
            np.testing.assert_array_equal(masks[j, :h, :w], ds.test.raw(i)[1])
            assert (masks[j, h:] == I).all() and (masks[j, :, w:] == I).all()
        assert not valid[len(idx):].any() and (masks[len(idx):] == I).all()
        seen += len(idx)
        # two processes read the two halves of each batch
        halves = [seg_data.WholeImageBatches(ds.test, 2, 32, 32, (p, 2))[b] for p in (0, 1)]
        for whole, *parts in zip(plan[b], *halves):
            np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert seen == len(SIZES)


def test_mmseg_protocol_scores_each_image_at_its_own_size(tmp_path, capsys):
    """`lucid-fn eval` with data.eval_protocol="mmseg": per image, the whole image at its
    resized size, logits back at the original size, the argmax counted there against the
    original mask, written out here with jax.image.resize."""
    from lucid_fn import registry
    from lucid_fn.train.data import normalize

    root = _sized_folder(tmp_path / "data", SIZES)
    kw = dict(backbone="pvt_v2_b0", num_classes=3, img_size=32, embed_dims=[8, 8, 8, 8],
              num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2],
              fpn_channels=8, head_channels=8, norm_groups=4)
    model = registry["semantic_fpn"](**kw)
    params = model.init(jax.random.key(0))
    path = tmp_path / "model.safetensors"
    weights.save(path, params, "semantic_fpn", **kw)
    data = {"name": "seg_folder", "path": str(root), "eval_protocol": "mmseg"}
    out = evaluate_file(path, data, batch_size=2)
    ds = _load("seg_folder", root)
    apply = jax.jit(model.apply)
    confusion = np.zeros((3, 3), np.int64)
    for i, (h, w) in enumerate(SIZES):
        img, mask = ds.test.raw(i)
        shape = seg_data.whole_image_size(h, w, 32, 32)
        x = normalize(seg_data.resize(img, shape, nearest=False)[None], (0.5,) * 3, (0.5,) * 3)
        logits = jax.image.resize(apply(params, x)[0], (h, w, 3), "linear", antialias=False)
        confusion += np.asarray(segmentation.confusion_matrix(
            jnp.argmax(logits, -1)[None], jnp.asarray(mask)[None], 3))
    want = segmentation.iou_metrics(confusion)
    assert (confusion.sum(0) > 0).sum() >= 2  # predictions that vary across the images
    assert out["test_examples"] == len(SIZES)
    assert math.isclose(out["test_miou"], want["miou"], abs_tol=1e-3)
    assert math.isclose(out["test_pixel_accuracy"], want["pixel_accuracy"], abs_tol=1e-3)
    # the command line's, with --eval-protocol
    from lucid_fn import cli

    assert cli.main(["eval", str(path), "--data", f"seg_folder:{root}", "--batch-size", "2",
                     "--eval-protocol", "mmseg"]) == 0
    assert f"test mIoU {out['test_miou']:.4f}" in capsys.readouterr().out
    # and not the square protocol's number, which resizes the masks
    square = evaluate_file(path, {**data, "eval_protocol": "square"}, batch_size=2)
    assert square["test_pixel_accuracy"] != out["test_pixel_accuracy"]


def test_eval_protocol_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"data.eval_protocol must be one of \['square', "
                                          r"'mmseg'\]"):
        load_config(None, ['data.eval_protocol="whole"'])
    cfg = load_config(None, [f'train.workdir="{tmp_path}"', 'data.eval_protocol="mmseg"'])
    with pytest.raises(ConfigError, match="evaluates segmentation .* a classifier"):
        fit(cfg, progress=False)
