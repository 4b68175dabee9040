"""Take a model out of Python: a serialised ``jax.export`` artifact (StableHLO) or an ONNX
graph, each checked by running it.

    from lucid_fn import export
    export.save("pvt_v2_b0", "b0.stablehlo", format="stablehlo", params=params)
    logits = export.load_stablehlo("b0.stablehlo").call(images)   # any JAX, no lucid_fn
    export.save("pvt_v2_b0", "b0.onnx", format="onnx", params=params)
    (logits,) = export.run_onnx("b0.onnx", images)                # onnxruntime, CPU

``model`` is a registered name (with builder keywords), a built ``Model``, a ``.safetensors``
file that ``weights.save`` wrote (``lucid-fn convert``, ``lucid-fn train``), or a training
run's workdir (its ``model.safetensors``). Without ``params`` a name or a Model exports
random weights (key 0).

What is traced is the plain XLA path, whatever the device: the model is built again with
every fused kernel off. The Pallas kernels compile for one GPU at run time and ONNX has no
operator for them, so neither format could carry them; on a GPU the exported program is
the XLA one. A StableHLO artifact keeps the XLA forms chosen by platform (``kernels="off"``:
``jax.export`` lowers each platform's own); an ONNX graph cannot switch on the platform it
runs on, so it is traced with one form for all (``kernels="portable"``).

Shapes: the batch is symbolic (``batch="dynamic"``, the default) or fixed. PVT v2 may also
take ``img_size="dynamic"`` in StableHLO (sides any multiple of 32); PVT v1's position
embeddings are learned for one grid, so it exports at a fixed size, resized to
``img_size`` when that differs from the model's (as ``apply`` resizes them). ONNX graphs
take a fixed image size. The ONNX route needs ``pip install -e '.[export]'`` (jax2onnx,
onnx, onnxruntime).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn import nn, weights
from lucid_fn.registry import Model, registry, resolve

FORMATS = ("stablehlo", "onnx")
OPSET = 21  # ONNX opset of the graphs written: onnxruntime reads it from version 1.18 on
PLATFORMS = ("cpu", "cuda")  # what a StableHLO artifact runs on unless told otherwise
EXPORT_EXTRA = "pip install -e '.[export]'"
# the builders' kernels= spec traced for each format (kernels/settings.py)
TRACED_KERNELS = {"stablehlo": "off", "onnx": "portable"}


@dataclasses.dataclass(frozen=True)
class Source:
    """What is exported: ``model`` (built without kernels, at the export's image size) with
    ``params``, and what it is checked against: ``reference`` with ``reference_params``
    (the model as given or loaded)."""
    model: Model
    params: dict
    reference: Model
    reference_params: dict
    described: str  # where the weights came from, for messages


# ------------------------------------------------------------------- the source


def _load_file(path: str) -> tuple[dict, Model]:
    """Params and model of a ``weights.save`` file, or of a run's workdir."""
    if os.path.isdir(path):
        inner = os.path.join(path, "model.safetensors")
        if not os.path.isfile(inner):
            raise FileNotFoundError(f"{path} is a folder without model.safetensors; give a "
                                    f"training run's workdir once the run has finished, or a "
                                    f".safetensors file")
        path = inner
    return weights.load(path)


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith(".safetensors")


def resolve_source(model, params=None, *, img_size=None,
                   **builder_kwargs) -> tuple[Model, dict | None, str]:
    """``(model, params, description)`` from any ``model`` this module takes (see the
    module's docstring). A registered name is built at ``img_size`` (an int) if given.
    ``params`` stays None for random weights, drawn once the export's arguments pass."""
    if isinstance(model, (str, os.PathLike)) and (os.path.exists(model) or (
            _looks_like_path(os.fspath(model)) and os.fspath(model) not in registry)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model file or workdir at {path}; give a registered "
                                    f"model name ('lucid-fn list'), a .safetensors file or a "
                                    f"run's workdir")
        if params is not None or builder_kwargs:
            raise ValueError(f"{path} holds its own params and builder arguments; pass "
                             f"neither params nor builder keywords with a file")
        loaded, built = _load_file(path)
        return built, loaded, f"{path} ({built.name})"
    if isinstance(model, str) and isinstance(img_size, int):
        builder_kwargs = {**builder_kwargs, "img_size": img_size}
    built = resolve(model, builder_kwargs)
    if params is None:
        return built, None, f"{built.name} with random weights (key 0)"
    return built, params, f"{built.name} with the params given"


def _is_v1(cfg) -> bool:
    return hasattr(cfg, "flavor")


def _has_v1_backbone(cfg) -> bool:
    """A PVT v1, or a dense model on one (semantic_fpn), whose apply resizes learned
    position embeddings: fixed image sides only."""
    return _is_v1(getattr(cfg, "backbone_config", cfg))


def _resized_params(params, cfg) -> dict:
    """v1 params with each stage's position embedding resized to ``cfg``'s grid (as
    ``apply`` resizes them for images of another size, class-token row kept)."""
    out = dict(params)
    for i in range(4):
        stage = dict(out[f"stage{i + 1}"])
        grid = (cfg.grid(i),) * 2
        stage["pos_embed"] = nn.resize_pos_embed(stage["pos_embed"], grid, has_cls=i == 3)
        out[f"stage{i + 1}"] = stage
    return out


def prepare(model, params=None, *, img_size=None, format: str = "onnx",
            **builder_kwargs) -> Source:
    """The :class:`Source` of an export to ``format``: the model built as that format is
    traced (``TRACED_KERNELS``) at ``img_size`` (None: its own; ``"dynamic"``: its own, for
    PVT v2's symbolic sides)."""
    reference, reference_params, described = resolve_source(model, params, img_size=img_size,
                                                            **builder_kwargs)
    cfg = reference.config
    size = cfg.img_size if img_size in (None, "dynamic") else img_size
    if img_size == "dynamic" and _has_v1_backbone(cfg):
        raise ValueError(f"{reference.name} is PVT v1, whose position embeddings are learned "
                         f"for one grid: export it at a fixed image size (img_size=N resizes "
                         f"them); only PVT v2 takes img_size='dynamic'")
    if reference_params is None:
        reference_params = reference.init(jax.random.key(0))
    traced = registry[reference.name](**{**reference.kwargs, "img_size": size,
                                         "kernels": TRACED_KERNELS[format]})
    fitted = reference_params
    if _is_v1(cfg) and size != cfg.img_size:
        fitted = _resized_params(reference_params, traced.config)
    return Source(traced, fitted, reference, reference_params, described)


# ------------------------------------------------------------------ StableHLO


def _check_batch(batch) -> None:
    if batch != "dynamic" and (isinstance(batch, bool) or not isinstance(batch, int)
                               or batch < 1):
        raise ValueError(f"batch must be 'dynamic' (a symbolic batch size) or an integer "
                         f">= 1; got {batch!r}")


def _image_spec(cfg, batch, img_size) -> jax.ShapeDtypeStruct:
    """The images' shape, with symbolic batch and (``img_size="dynamic"``) sides: a PVT v2
    runs on any multiple of its total stride."""
    b = "b" if batch == "dynamic" else str(batch)
    s = cfg.total_stride
    side = (f"{s}*h", f"{s}*w") if img_size == "dynamic" else (str(cfg.img_size),) * 2
    shape = jax.export.symbolic_shape(f"{b}, {side[0]}, {side[1]}, {cfg.in_channels}")
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def to_stablehlo(model, params=None, *, batch="dynamic", img_size=None, features=False,
                 bake_params=True, platforms=PLATFORMS, **builder_kwargs):
    """A ``jax.export.Exported`` of the model's inference: ``.call(images)`` with the params
    baked in as constants, or ``.call(params, images)`` with ``bake_params=False``.
    ``features``: the four pyramid maps instead of the logits. ``platforms``: where the
    artifact may run (lowered for each; no GPU needed to export)."""
    return export_source(model, format="stablehlo", params=params, batch=batch,
                         img_size=img_size, features=features, bake_params=bake_params,
                         platforms=platforms, **builder_kwargs)[1]


def _stablehlo(src: Source, *, batch, img_size, features, bake_params, platforms):
    images = _image_spec(src.model.config, batch, img_size)
    apply = functools.partial(src.model.apply, features=features)
    if bake_params:
        fn, args = functools.partial(apply, src.params), (images,)
    else:
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), src.params)
        fn, args = apply, (params, images)
    try:
        return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
    except Exception as e:
        if not _is_symbolic_failure(e):
            raise
        raise ValueError(f"{src.model.name} cannot take symbolic image sides "
                         f"({str(e).splitlines()[0]}); export it at a fixed img_size") from None


def _is_symbolic_failure(e: Exception) -> bool:
    """Whether ``e`` is JAX's error for a shape computation a symbolic size cannot decide
    (its class is public under ``jax.export`` only in newer JAX)."""
    return any(c.__name__ == "InconclusiveDimensionOperation" for c in type(e).__mro__)


def load_stablehlo(path) -> jax.export.Exported:
    """The artifact :func:`save` wrote: ``exported.call(images)`` (or ``call(params,
    images)`` if its params were left as an input) runs it; ``exported.in_avals`` says
    what it takes. Needs only JAX."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 (flatbuffers and MLIR raise many kinds)
        raise ValueError(f"{path} is not a jax.export artifact that jax {jax.__version__} "
                         f"can read ({type(e).__name__}); export it again with "
                         f"format='stablehlo'") from None


# ----------------------------------------------------------------------- ONNX


def _require_onnx():
    try:
        import jax2onnx
        import onnx
    except ImportError as e:
        raise ImportError(f"ONNX export needs jax2onnx and onnx ({e.name} is missing): "
                          f"{EXPORT_EXTRA}") from None
    return jax2onnx, onnx


def _output_names(cfg, features: bool) -> list[str]:
    if features:
        levels = "fpn" if hasattr(cfg, "backbone_config") else "stage"
        return [f"{levels}{i + 1}" for i in range(4)]
    return ["logits" if cfg.num_classes else "pooled"]


def to_onnx(model, params=None, *, batch="dynamic", img_size=None, features=False,
            opset: int = OPSET, **builder_kwargs):
    """An ``onnx.ModelProto`` of the model's inference (jax2onnx): input ``images`` (B, H, W,
    C) float32 with a symbolic batch ``B`` unless ``batch`` fixes it, the params as
    initialisers, outputs ``logits`` (``pooled`` when headless, ``stage1`` .. ``stage4``
    with ``features``)."""
    return export_source(model, format="onnx", params=params, batch=batch,
                         img_size=img_size, features=features, opset=opset,
                         **builder_kwargs)[1]


def _onnx(src: Source, *, batch, features, opset):
    jax2onnx, _ = _require_onnx()
    cfg = src.model.config
    shape = ("B" if batch == "dynamic" else batch, cfg.img_size, cfg.img_size, cfg.in_channels)
    fn = functools.partial(src.model.apply, src.params, features=features)
    # onnx_ir warns once per shape constant it leaves untyped; the graph is checked by
    # running it, so the noise only hides what matters.
    serde = logging.getLogger("onnx_ir.serde")
    level = serde.level
    serde.setLevel(logging.ERROR)
    try:
        return jax2onnx.to_onnx(fn, [shape], model_name=src.model.name, opset=opset,
                                input_names=["images"],
                                output_names=_output_names(cfg, features))
    finally:
        serde.setLevel(level)


def run_onnx(model, images) -> list[np.ndarray]:
    """Run an ONNX graph (a path or an ``onnx.ModelProto``) on ``images`` with
    onnxruntime on the CPU: its outputs, in order."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"running ONNX needs onnxruntime: {EXPORT_EXTRA}") from None
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"no ONNX model at {os.fspath(model)}")
        model = os.fspath(model)
    else:
        model = model.SerializeToString()
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.asarray(images, np.float32)})


# ------------------------------------------------------------- files, checks


def save(model, path, *, format: str, params=None, batch="dynamic", img_size=None,
         features=False, bake_params=True, platforms=PLATFORMS, opset: int = OPSET,
         **builder_kwargs):
    """Export (:func:`to_stablehlo` or :func:`to_onnx`) and write ``path`` atomically:
    the serialised artifact, or the ONNX file. Returns the artifact."""
    src, artifact = export_source(model, format=format, params=params, batch=batch,
                                  img_size=img_size, features=features,
                                  bake_params=bake_params, platforms=platforms, opset=opset,
                                  path=path, **builder_kwargs)
    write(artifact, path)
    return artifact


def export_source(model, *, format: str, path=None, params=None, batch="dynamic",
                  img_size=None, features=False, bake_params=True, platforms=PLATFORMS,
                  opset: int = OPSET, **builder_kwargs):
    """``(source, artifact)``: :func:`prepare` then the export, with every argument
    checked (and ``path``, if given, writable) before the tracing starts."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}; got "
                         f"{format!r}")
    if format == "onnx" and img_size == "dynamic":
        raise ValueError("ONNX export takes a fixed image size; for symbolic sides use "
                         "format='stablehlo' (PVT v2)")
    if format == "onnx" and not bake_params:
        raise ValueError("an ONNX graph keeps its params as initialisers: leave "
                         "bake_params=True, or use format='stablehlo'")
    _check_batch(batch)
    if format == "onnx":
        _require_onnx()
    if path is not None:
        weights.check_writable(path)
    src = prepare(model, params, img_size=img_size, format=format, **builder_kwargs)
    if format == "stablehlo":
        return src, _stablehlo(src, batch=batch, img_size=img_size, features=features,
                               bake_params=bake_params, platforms=platforms)
    return src, _onnx(src, batch=batch, features=features, opset=opset)


def write(artifact, path) -> None:
    """Write an ``Exported`` (serialised) or an ONNX ``ModelProto`` to ``path`` atomically."""
    if isinstance(artifact, jax.export.Exported):
        data = artifact.serialize()

        def dump(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
    else:
        _, onnx = _require_onnx()

        def dump(tmp):
            onnx.save_model(artifact, tmp)
    weights.atomic_write(os.fspath(path), dump)


def run(artifact, images, params=None):
    """The outputs of an artifact on ``images`` as a tuple of arrays: an ``Exported``
    called (``params`` first when it takes them) or an ONNX graph run by onnxruntime."""
    if isinstance(artifact, jax.export.Exported):
        args = (images,) if params is None else (params, images)
        return tuple(np.asarray(a) for a in jax.tree.leaves(artifact.call(*args)))
    return tuple(run_onnx(artifact, images))


def largest_difference(src: Source, artifact, *, batch_size: int = 2, features=False,
                       bake_params=True, seed: int = 0) -> tuple[float, float]:
    """``(max |exported - apply|, max |apply|)`` on a random batch at the export's size:
    the exported model against the reference model's own ``apply``."""
    cfg = src.model.config
    x = jax.random.uniform(jax.random.key(seed),
                           (batch_size, cfg.img_size, cfg.img_size, cfg.in_channels))
    want = [np.asarray(a, np.float32) for a in jax.tree.leaves(jax.jit(
        functools.partial(src.reference.apply, features=features))(src.reference_params, x))]
    got = run(artifact, np.asarray(x), None if bake_params else src.params)
    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    return diff, max(float(np.max(np.abs(w))) for w in want)
