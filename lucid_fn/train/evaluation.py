"""Evaluation of a test split: how it is batched (padded squares, or mmseg's whole images)
and the metrics summed over it (accuracy; mIoU, pixel accuracy and per-class IoU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn.train import config as config_lib
from lucid_fn.train import data as data_lib
from lucid_fn.train import seg_data, segmentation
from lucid_fn.train import step as step_lib


def check_eval_protocol(data_cfg, task: str) -> None:
    if data_cfg.eval_protocol == "mmseg" and task != "segment":
        raise config_lib.ConfigError(
            "data.eval_protocol = \"mmseg\" evaluates segmentation (whole images, metrics at "
            "their own size); a classifier's test split is evaluated as \"square\"; remove "
            "data.eval_protocol")


def eval_plan(data_cfg, model):
    """How the test split is batched (``data_lib.eval_batches``' ``batches``): fixed
    squares, or (``data.eval_protocol = "mmseg"``) whole images at their resized sizes."""
    if data_cfg.eval_protocol != "mmseg":
        return data_lib.EvalBatches
    size, stride = data_cfg.img_size, model.config.total_stride
    return lambda source, batch, part: seg_data.WholeImageBatches(source, batch, size,
                                                                  stride, part)


PREDICTION_EXAMPLES = 4  # rows of a segmentation run's predictions.png


def run_eval(evaluate, params, source, batch: int, sharding, workers: int = 0,
             shown: list | None = None, plan=data_lib.EvalBatches) -> dict:
    """The test split's metrics. Segmentation: mIoU, pixel accuracy and per-class IoU
    (None: a class neither present nor predicted) from the summed confusion matrix;
    ``shown`` receives the first batch's (images, masks, predictions). ``plan``: how the
    split is batched (:func:`eval_plan`)."""
    sums = None
    part = dict(process_index=jax.process_index(), process_count=jax.process_count())
    for images, labels, valid, *sizes in data_lib.eval_batches(source, batch, workers,
                                                                batches=plan, **part):
        out = evaluate(params, *step_lib.put_batch((images, labels, valid, *sizes),
                                                   sharding))
        pred = out.pop("pred", None)
        if shown is not None and pred is not None and not shown:
            n = min(PREDICTION_EXAMPLES, int(valid.sum()))
            shown.append((images[:n], labels[:n], np.asarray(jax.device_get(pred))[:n]))
        sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = int(sums["count"])
    if "confusion" in sums:
        m = segmentation.iou_metrics(sums["confusion"])
        return {"test_miou": m["miou"], "test_pixel_accuracy": m["pixel_accuracy"],
                "test_loss": float(sums["loss"]) / max(int(sums["pixels"]), 1),
                "test_iou": m["per_class_iou"], "test_examples": n}
    return {"test_accuracy": float(sums["correct"]) / n, "test_loss": float(sums["loss"]) / n,
            "test_examples": n}
