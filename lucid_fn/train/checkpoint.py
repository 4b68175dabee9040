"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG key, EMA)
and the data iterator's state, together, one directory per step.

orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-write never leaves a checkpoint that looks whole; it keeps the last K and
restores sharded arrays straight onto the mesh they are restored for.

What orbax does not do, this module does: a state with NaN or infinity is never saved;
each checkpoint also holds a CRC-32 of every array's bytes (in its ``meta`` item, with
the model's name and builder arguments), and a restored state must match them bit for
bit and be finite, else ``CheckpointError`` names the checkpoint, the first array that
differs and what to do. A checkpoint orbax cannot
read at all (truncated, deleted files) is the same error, not a TensorStore trace.
"""

from __future__ import annotations

import logging
import pathlib
import zlib

import jax
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, altered since it was written, or
    holding non-finite values."""


class NonFiniteStateError(RuntimeError):
    """A state to be saved holds NaN or infinity (training diverged); nothing was saved."""


def _leaf_name(path) -> str:
    return "".join(f"[{k.key!r}]" if hasattr(k, "key") else str(k) for k in path)


def _host_leaves(state) -> list[tuple[str, np.ndarray | None]]:
    """``(name, host copy)`` per leaf, in tree order; None for a leaf this process holds
    only part of (a multi-host sharded array), which is not checked."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        full = getattr(leaf, "is_fully_addressable", True) or leaf.is_fully_replicated
        out.append((_leaf_name(path), np.asarray(jax.device_get(leaf)) if full else None))
    return out


def first_non_finite(leaves) -> str | None:
    """The name of the first floating-point leaf holding NaN or infinity, if any."""
    for name, value in leaves:
        if value is not None and np.issubdtype(value.dtype, np.inexact) \
                and not np.isfinite(value).all():
            return name
    return None


def crc32s(leaves) -> dict[str, int]:
    """CRC-32 of each leaf's bytes: any flipped bit or byte changes it."""
    return {name: zlib.crc32(np.ascontiguousarray(value).view(np.uint8).ravel())
            for name, value in leaves if value is not None}


class Checkpointer:
    def __init__(self, directory, keep: int, *, create: bool = True):
        """``create=False``: read only (``lucid-fn eval``); the folder must exist."""
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoint in {self.directory} (no such folder)")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        if not create:  # without the warnings orbax logs when it adjusts these itself
            options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=0,
                                                   create=False, read_only=True)
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR if not create else level)  # "directory is read only"
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl.setLevel(level)

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict | None = None) -> None:
        """Starts an asynchronous save; ``wait`` (or the next save) completes it. The state
        is checked first (finite); its CRCs and ``meta`` (JSON) go into the checkpoint."""
        ocp = self._ocp
        leaves = _host_leaves(state)
        bad = first_non_finite(leaves)
        if bad is not None:
            raise NonFiniteStateError(
                f"state{bad} holds NaN or infinity after step {step}; not saved. The last "
                f"checkpoint in {self.directory} is untouched. Lower optim.lr or set "
                f"optim.clip_norm, then continue with --resume")
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({**(meta or {}), "crc32": crc32s(leaves)})), force=True)

    def _fix(self, step) -> str:
        earlier = [s for s in self.all_steps() if s < step]
        if earlier:
            return (f"Delete {self.directory / str(step)} to go back to step {max(earlier)}, "
                    f"or start a new train.workdir")
        return "Start a new train.workdir (or delete this run's folder)"

    def _restore(self, step, **items):
        try:
            return self.manager.restore(step, args=self._ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise many kinds)
            # TensorStore's first line is enough; the rest is a page of internals.
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            first = first.split(". See full TensorStore details")[0][:300]
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be read ({type(e).__name__}: "
                f"{first}); it is damaged or incomplete. {self._fix(step)}") from None

    def meta(self, step=None) -> dict | None:
        """The ``meta`` item of ``step`` (default: the latest); None for checkpoints of
        versions that wrote none."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if not (self.directory / str(step) / "meta").is_dir():
            return None
        return self._restore(step, meta=self._ocp.args.JsonRestore())["meta"]

    def restore(self, abstract_state, step=None):
        """(state, data_state) of ``step`` (default: the latest), placed as
        ``abstract_state``'s shardings say, and checked against its CRCs and for
        non-finite values."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        where = self.directory / str(step)
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     data=ocp.args.JsonRestore())
        has_meta = (where / "meta").is_dir()  # checkpoints of older versions have none
        if has_meta:
            items["meta"] = ocp.args.JsonRestore()
        out = self._restore(step, **items)
        leaves = _host_leaves(out["state"])
        bad = first_non_finite(leaves)
        if bad is not None:
            raise CheckpointError(
                f"checkpoint {where} holds NaN or infinity in state{bad}: it is corrupted "
                f"(lucid_fn never saves a non-finite state). {self._fix(step)}")
        if has_meta:
            saved = out["meta"].get("crc32", {})
            for name, crc in crc32s(leaves).items():
                if name in saved and saved[name] != crc:
                    raise CheckpointError(
                        f"checkpoint {where}: state{name} does not hold the bytes that were "
                        f"saved (CRC-32 differs): the files were altered or damaged. "
                        f"{self._fix(step)}")
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
