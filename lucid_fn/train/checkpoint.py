"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG key, EMA)
and the data iterator's state, together, one directory per step.

orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-write never leaves a checkpoint that looks whole; it keeps the last K and
restores sharded arrays straight onto the mesh they are restored for.
"""

from __future__ import annotations

import pathlib


class Checkpointer:
    def __init__(self, directory, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict) -> None:
        """Starts an asynchronous save; ``wait`` (or the next save) completes it."""
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True)

    def restore(self, abstract_state, step=None):
        """(state, data_state) of ``step`` (default: the latest), placed as
        ``abstract_state``'s shardings say."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
