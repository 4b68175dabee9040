"""The optimizer, the train state, and the jitted train and eval steps, sharded over devices.

The state is a plain dict pytree, so orbax saves it and ``jax.jit`` donates it::

    {"step": int32, "params": ..., "opt_state": ..., "key": uint32[2], ["ema": ...]}

One step is one optimizer update: the batch is split into ``accum_steps`` micro-batches
whose gradients are summed under ``lax.scan`` inside the same compiled function.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lucid_fn.train import segmentation
from lucid_fn.train.data import normalize

# Not decayed: LayerNorm scales and all biases (1-D), position embeddings and the class
# token, as the PVT and DeiT recipes do.
NO_DECAY = ("bias", "scale", "pos_embed", "cls_token")


def decay_mask(params):
    def keep(path, _):
        return not any(getattr(k, "key", None) in NO_DECAY for k in path)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(ocfg, steps: int):
    """Linear warmup, then cosine or poly decay to ``lr * final_lr_ratio`` at ``steps``."""
    end = ocfg.lr * ocfg.final_lr_ratio
    if ocfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if ocfg.warmup_steps else ocfg.lr, peak_value=ocfg.lr,
            warmup_steps=ocfg.warmup_steps, decay_steps=steps, end_value=end)
    poly = optax.polynomial_schedule(init_value=ocfg.lr, end_value=end, power=ocfg.poly_power,
                                     transition_steps=steps - ocfg.warmup_steps)
    if not ocfg.warmup_steps:
        return poly
    warmup = optax.linear_schedule(0.0, ocfg.lr, ocfg.warmup_steps)
    return optax.join_schedules([warmup, poly], [ocfg.warmup_steps])


def make_optimizer(ocfg, steps: int):
    """AdamW (no decay on norms, biases, position embeddings, class token) under a linear
    warmup + cosine or poly schedule, after optional global-norm clipping. Returns (tx,
    schedule)."""
    schedule = make_schedule(ocfg, steps)
    adamw = optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.weight_decay,
                        mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(ocfg.clip_norm), adamw) if ocfg.clip_norm \
        else adamw
    return tx, schedule


# ------------------------------------------------------------------------ sharding


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over every device (all hosts), axis ``"data"``, ordered by process: each
    process's devices hold consecutive rows of a batch, the rows it reads
    (``put_batch``)."""
    devices = sorted(devices if devices is not None else jax.devices(),
                     key=lambda d: d.process_index)  # stable: each process's order kept
    return Mesh(np.asarray(devices), ("data",))


def fsdp_spec(shape, n: int, min_size: int = 2**14) -> P:
    """Shard a leaf's largest axis that ``n`` divides over ``"data"``; small leaves (norms,
    biases, scalars) stay replicated: splitting them saves nothing and costs collectives."""
    if n == 1 or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            return P(*([None] * axis + ["data"]))
    return P()


def state_shardings(abstract_state, mesh: Mesh, mode: str):
    n = mesh.devices.size

    def spec(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, fsdp_spec(shape, n) if mode == "fsdp" else P())

    return jax.tree_util.tree_map(spec, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole on every device: what each process can read without a collective."""
    return NamedSharding(mesh, P())


def put_batch(arrays, sharding: NamedSharding):
    """Host-local numpy batches -> global arrays sharded over ``"data"`` (multi-host: each
    process passes its own part)."""
    return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a))
                 for a in arrays)


# ------------------------------------------------------------------------ mixing


def soft_targets(labels, num_classes: int, smoothing: float):
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def mix(key, x, targets, acfg):
    """Mixup or cutmix (chosen per batch, 50/50 when both are on) with the batch reversed,
    as timm does; applied with probability ``mix_prob``. Returns (x, targets)."""
    alphas = [a for a in (acfg.mixup_alpha, acfg.cutmix_alpha) if a > 0]
    if not alphas:
        return x, targets
    k_apply, k_kind, k_lam, k_box = jax.random.split(key, 4)
    use_cutmix = acfg.cutmix_alpha > 0 and (
        acfg.mixup_alpha <= 0 or jax.random.bernoulli(k_kind, 0.5))
    alpha = jnp.where(use_cutmix, acfg.cutmix_alpha, acfg.mixup_alpha) if len(alphas) == 2 \
        else alphas[0]
    lam = jax.random.beta(k_lam, alpha, alpha)
    b, h, w, _ = x.shape
    # Cutmix box of area (1 - lam), clipped at the borders; lam then follows the real area.
    cy, cx = jax.random.uniform(k_box, (2,)) * jnp.array([h, w])
    rh, rw = jnp.sqrt(1.0 - lam) * h, jnp.sqrt(1.0 - lam) * w
    y0, y1 = jnp.clip(jnp.round(cy - rh / 2), 0, h), jnp.clip(jnp.round(cy + rh / 2), 0, h)
    x0, x1 = jnp.clip(jnp.round(cx - rw / 2), 0, w), jnp.clip(jnp.round(cx + rw / 2), 0, w)
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
    lam_cut = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    flipped = x[::-1]
    mixed_cut = jnp.where(box, flipped, x)
    mixed_up = lam * x + (1.0 - lam) * flipped
    mixed = jnp.where(use_cutmix, mixed_cut, mixed_up)
    lam = jnp.where(use_cutmix, lam_cut, lam)
    apply = jax.random.bernoulli(k_apply, acfg.mix_prob)
    lam = jnp.where(apply, lam, 1.0)
    mixed = jnp.where(apply, mixed, x)
    return mixed, lam * targets + (1.0 - lam) * targets[::-1]


# ------------------------------------------------------------------------ steps

# optax >= 0.2.5 has optax.tree.norm and deprecates global_norm.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the compiled steps close over (all static)."""

    apply: Callable
    tx: Any
    schedule: Callable
    num_classes: int
    mean: tuple
    std: tuple
    augment: Any
    accum_steps: int = 1
    ema_decay: float = 0.0
    task: str = "classify"  # or "segment": labels are (H, W) masks, per-pixel loss


def task_of(model) -> str:
    """What a model predicts: "segment" (per-pixel logits) or "classify"."""
    return getattr(model.config, "task", "classify")


def label_shape(task: str, img_shape: tuple) -> tuple:
    """One example's label: a class index, or a mask of the image's height and width."""
    return tuple(img_shape[:2]) if task == "segment" else ()


def init_state(spec: StepSpec, params, seed: int) -> dict:
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": spec.tx.init(params),
             "key": jax.random.key_data(jax.random.key(seed))}
    if spec.ema_decay:
        state["ema"] = jax.tree_util.tree_map(jnp.copy, params)
    return state


def train_step(spec: StepSpec, state: dict, images, labels):
    """One update. Returns (state, metrics) with metrics small device scalars: loss (mean
    over the batch, or its counted pixels), correct and count (predictions right, and
    scored: images, or pixels not ignored), grad_norm, lr."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
    k_mix, k_model = jax.random.split(key)
    x = normalize(images, spec.mean, spec.std)
    if spec.task == "segment":
        targets = labels  # masks: no smoothing or mixing (loop.check_task refuses them)
    else:
        targets = soft_targets(labels, spec.num_classes, spec.augment.label_smoothing)
        x, targets = mix(k_mix, x, targets, spec.augment)

    def loss_fn(params, xb, tb, lb, k):
        logits = spec.apply(params, xb, train=True, rng=k)
        if spec.task == "segment":
            loss, correct, count = segmentation.mean_pixel_loss(logits, tb)
            return loss, (correct, count)
        loss = optax.softmax_cross_entropy(logits, tb).mean()
        return loss, (jnp.sum(jnp.argmax(logits, -1) == lb), jnp.asarray(lb.shape[0]))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    params, n = state["params"], spec.accum_steps
    if n == 1:
        (loss, (correct, count)), grads = grad_fn(params, x, targets, labels, k_model)
    else:
        def micro(a):  # (B, ...) -> (n, B / n, ...) with each device's rows kept together
            return jnp.moveaxis(a.reshape((a.shape[0] // n, n) + a.shape[1:]), 1, 0)

        def body(carry, xs):
            g_sum, l_sum, c_sum, n_sum = carry
            xb, tb, lb, k = xs
            (l, (c, m)), g = grad_fn(params, xb, tb, lb, k)
            return (jax.tree_util.tree_map(jnp.add, g_sum, g), l_sum + l, c_sum + c,
                    n_sum + m), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (grads, loss, correct, count), _ = jax.lax.scan(
            body, (zeros, 0.0, 0, 0),
            (micro(x), micro(targets), micro(labels), jax.random.split(k_model, n)))
        grads = jax.tree_util.tree_map(lambda g: g / n, grads)
        loss = loss / n
    updates, opt_state = spec.tx.update(grads, state["opt_state"], params)
    new = dict(state, step=state["step"] + 1, params=optax.apply_updates(params, updates),
               opt_state=opt_state)
    if spec.ema_decay:
        d = spec.ema_decay
        new["ema"] = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state["ema"],
                                            new["params"])
    metrics = {"loss": loss, "correct": correct, "count": count,
               "grad_norm": _tree_norm(grads),
               "lr": spec.schedule(state["step"])}
    return new, metrics


def eval_step(spec: StepSpec, params, images, labels, valid, sizes=None):
    """Sums over the valid rows of one batch: (correct, loss, count); for segmentation
    the (K, K) confusion matrix, the loss summed over counted pixels, their count, the
    images, and the batch's predictions (uint8 class maps where K <= 256). ``sizes``
    ((B, 2), segmentation's ``WholeImageBatches``): the logits are first resized to each
    image's original size, where its mask is."""
    logits = spec.apply(params, normalize(images, spec.mean, spec.std))
    if sizes is not None:
        logits = segmentation.resize_logits(logits, sizes, labels.shape[1:3])
    if spec.task == "segment":
        masks = jnp.where(valid[:, None, None], labels, segmentation.IGNORE)
        loss, _, pixels = segmentation.pixel_cross_entropy(logits, masks)
        pred = jnp.argmax(logits, -1)
        return {"confusion": segmentation.confusion_matrix(pred, masks, spec.num_classes),
                "loss": loss, "pixels": pixels, "count": jnp.sum(valid),
                "pred": pred.astype(jnp.uint8 if spec.num_classes <= 256 else jnp.int32)}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return {"correct": jnp.sum(correct), "loss": jnp.sum(jnp.where(valid, loss, 0.0)),
            "count": jnp.sum(valid)}


def compile_steps(spec: StepSpec, abstract_state, mesh: Mesh, mode: str, batch: int,
                  eval_batch: int, img_shape: tuple, whole_images: bool = False):
    """Ahead-of-time compiled (train_step, eval_step, state_shardings, compile_seconds).
    ``whole_images``: the eval step takes ``WholeImageBatches`` (their sizes too), and
    compiles once per shape as they come.

    The train step donates the state: its buffers are reused for the new one."""
    import time

    shardings = state_shardings(abstract_state, mesh, mode)
    data = batch_sharding(mesh)
    t0 = time.perf_counter()
    train = jax.jit(lambda s, x, y: train_step(spec, s, x, y),
                    in_shardings=(shardings, data, data),
                    out_shardings=(shardings, replicated(mesh)),
                    donate_argnums=0)
    img = jax.ShapeDtypeStruct((batch,) + img_shape, jnp.uint8, sharding=data)
    lab_shape = label_shape(spec.task, img_shape)
    lab = jax.ShapeDtypeStruct((batch,) + lab_shape, jnp.int32, sharding=data)
    train = train.lower(abstract_state, img, lab).compile()
    params_sh = shardings["params"]
    if whole_images:
        evaluate = jax.jit(lambda p, x, y, v, s: eval_step(spec, p, x, y, v, s),
                           in_shardings=(params_sh, data, data, data, data),
                           out_shardings=replicated(mesh))
        return train, evaluate, shardings, time.perf_counter() - t0
    evaluate = jax.jit(lambda p, x, y, v: eval_step(spec, p, x, y, v),
                       in_shardings=(params_sh, data, data, data),
                       out_shardings=replicated(mesh))
    e_img = jax.ShapeDtypeStruct((eval_batch,) + img_shape, jnp.uint8, sharding=data)
    e_lab = jax.ShapeDtypeStruct((eval_batch,) + lab_shape, jnp.int32, sharding=data)
    e_val = jax.ShapeDtypeStruct((eval_batch,), jnp.bool_, sharding=data)
    evaluate = evaluate.lower(abstract_state["params"], e_img, e_lab, e_val).compile()
    return train, evaluate, shardings, time.perf_counter() - t0
