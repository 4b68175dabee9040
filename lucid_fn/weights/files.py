"""Weight files: our own safetensors format, and reading any checkpoint file.

``save`` writes params as safetensors with the model's name and builder arguments in the
metadata, so that ``load`` rebuilds ``(init, apply)`` too; both check the tensors against
the model. ``read_state_dict`` reads a PyTorch checkpoint (torch's restricted unpickler) or
a safetensors file, recognised by its first bytes; ``load_torch_checkpoint`` converts one
through ``lucid_fn.weights.convert``. Every file is written through ``atomic_write``.
safetensors and torch are imported only where a file is read or written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lucid_fn.kernels.settings import KernelSettings
from lucid_fn.registry import registry
from lucid_fn.weights.convert import _check_params, from_state_dict, to_state_dict

_META_MODEL, _META_KWARGS = "lucid_fn.model", "lucid_fn.builder_kwargs"


def encode_builder_kwargs(kwargs: dict) -> str:
    def encode(v):
        if isinstance(v, (tuple, list)):
            return [encode(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, KernelSettings):  # as the spec string builders read back
            return str(v)
        try:
            return {"dtype": jnp.dtype(v).name}
        except TypeError:
            raise ValueError(f"builder argument {v!r} cannot be stored in a file") from None

    return json.dumps({k: encode(v) for k, v in kwargs.items()})


def decode_builder_kwargs(text: str) -> dict:
    kw = json.loads(text)
    return {k: jnp.dtype(v["dtype"]) if isinstance(v, dict) else v for k, v in kw.items()}


def _flatten(params) -> dict:
    return {".".join(str(k.key) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _unflatten(flat: Mapping) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return tree


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``: a
    reader sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        _fsync_folder(folder)  # the rename itself survives a power cut
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(path) -> None:
    """``path`` can take a new file: not a folder, in a folder that exists and we may
    write (checked before any work, so that a long job does not fail at its last step)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"the output {path!r} is a folder; give a file name in it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the output's folder {folder!r} does not exist; create it "
                                f"first")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write in {folder!r} (the output's folder); choose a "
                              f"folder you can write to")


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path, params, name: str, **builder_kwargs) -> None:
    """Save params as safetensors, with the model name and builder arguments in the
    metadata so that ``load`` rebuilds ``(init, apply)`` too. The write is atomic."""
    from safetensors.numpy import save_file

    model = registry[name](**builder_kwargs)  # fails early on a bad name or arguments
    _check_params(params, model, name)  # so that load never rejects what save wrote
    metadata = {_META_MODEL: name, _META_KWARGS: encode_builder_kwargs(builder_kwargs)}
    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in _flatten(params).items()}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not np.isfinite(np.asarray(leaf)).all():  # a file of NaNs loads and runs: refuse
            raise ValueError(f"params{jax.tree_util.keystr(keypath)} holds NaN or infinity; "
                             f"not saved to {os.fspath(path)}")
    atomic_write(os.fspath(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def load(path):
    """``(params, model)`` from a file written by ``save``; ``model`` unpacks as
    ``(init, apply)``. A truncated or foreign file is a ValueError, never a partial tree."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            if _META_MODEL not in metadata:
                raise ValueError(
                    f"{path} is a safetensors file but not one lucid_fn.weights.save wrote "
                    f"(no '{_META_MODEL}' metadata). For another layout use "
                    f"load_torch_checkpoint(path, name, ...) or from_state_dict."
                )
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be "
                         f"truncated or of another format") from None
    try:
        kwargs = decode_builder_kwargs(metadata.get(_META_KWARGS, "{}"))
        model = registry[metadata[_META_MODEL]](**kwargs)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ValueError(f"{path}: its metadata describes a model this lucid_fn cannot build "
                         f"({why})") from None
    params = _unflatten(flat)
    try:
        _check_params(params, model, model.name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: tensors do not fit {model.name} as its metadata "
                         f"describes: {str(e).split('. Were the params')[0]}") from None
    for key, value in flat.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{path}: tensor {key} holds NaN or infinity; the file is "
                             f"damaged (lucid_fn.weights.save never writes one)")
    return params, model


# ------------------------------------------------------------- any checkpoint file


def read_state_dict(path) -> Mapping:
    """The raw state dict of a PyTorch checkpoint (``.pth``/``.pt``/``.bin``, read with
    torch, weights only) or of a ``.safetensors`` file (no torch needed)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give a checkpoint file (.safetensors, .pth, "
                         f".bin)")
    kind = _sniff(path)
    if kind is None:
        raise ValueError(f"{path} is neither a safetensors file nor a PyTorch checkpoint (a "
                         f"zip archive or a pickle); give a .safetensors, .pth or .bin file")
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            if not is_own_file(path):  # read the header first: each file is read once
                return load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        return _own_file_as_state_dict(path)
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {os.path.basename(path)} needs PyTorch, which is not installed: "
            f"pip install torch (CPU is enough), or convert the checkpoint to .safetensors"
        ) from None
    try:
        # weights_only: torch's restricted unpickler, tensors and containers only.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad file)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(
            f"{path} cannot be read as a PyTorch checkpoint of tensors ({first}); it may be "
            f"truncated, not a checkpoint, or hold Python objects, which are never unpickled "
            f"here") from None


def _sniff(path) -> str | None:
    """"safetensors", "torch" or None, from the file's first bytes (not its name): a
    safetensors header is a little-endian length then JSON; torch.save writes a zip
    archive, or a pickle in its legacy format."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    return "safetensors" if path.endswith(".safetensors") else None  # its reader says why


def is_own_file(path) -> bool:
    """Whether ``path`` is a safetensors file that ``save`` wrote (read from its header)."""
    from safetensors import SafetensorError, safe_open

    if _sniff(path) != "safetensors":
        return False
    try:
        with safe_open(path, framework="numpy") as f:
            return _META_MODEL in (f.metadata() or {})
    except SafetensorError:  # not readable: the reader that loads it says why
        return False


def _own_file_as_state_dict(path) -> dict:
    """A file ``save`` wrote, as a PyTorch-layout state dict (v1 lucid flavor: Lucid's
    keys; otherwise the official ones), so that it goes through ``from_state_dict`` like
    any checkpoint: checked, head kept or reset, v1 position embeddings resized."""
    params, model = load(path)
    layout = "lucid" if getattr(model.config, "flavor", None) == "lucid" else "official"
    return to_state_dict(params, model.name, layout=layout, **model.kwargs)


def load_torch_checkpoint(path, name: str, **kwargs) -> dict:
    """Params from a checkpoint file (see ``read_state_dict``; also a ``.safetensors``
    that ``save`` wrote, e.g. a training run's model.safetensors) in any layout
    ``from_state_dict`` takes; ``kwargs`` go to it (builder arguments, ``head=``)."""
    return from_state_dict(read_state_dict(path), name, **kwargs)
