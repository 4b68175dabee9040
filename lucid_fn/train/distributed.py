"""Joining a multi-process job: which cluster a run is part of, read once and passed in.

A run is one process unless its environment says otherwise:

- ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``: all three, or none. ``jax.distributed.initialize()`` reads only the
  address itself, so the other two are passed to it explicitly. ``JAX_LOCAL_DEVICE_IDS``
  (which GPUs this process drives, e.g. ``0`` or ``0,1``) is optional.
- Otherwise a SLURM job or an Open MPI launch of more than one task: JAX detects the
  address, the count and the rank itself (``JAX_COORDINATOR_ADDRESS`` may still name the
  address).

``Cluster.from_environ()`` reads and checks these into a value; ``initialize(cluster)``
joins. A partial or inconsistent set is a ``ClusterError`` naming the variable and the fix,
raised before JAX starts.
"""

from __future__ import annotations

import dataclasses
import os

from lucid_fn.train.config import ConfigError

ADDRESS, COUNT, RANK, LOCAL_IDS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                   "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")
EXPLICIT = (ADDRESS, COUNT, RANK)


class ClusterError(ConfigError):
    """The environment describes a multi-process job incompletely or inconsistently."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins a job. ``num_processes=None`` with ``auto=True``: SLURM or
    Open MPI, detected by JAX. ``num_processes == 1`` and not ``auto``: one process, no
    coordinator."""

    coordinator_address: str | None = None
    num_processes: int | None = 1
    process_id: int | None = 0
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = False  # what JAX's own cluster detection found
    source: str = "one process"

    @property
    def multi_process(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1

    @classmethod
    def from_environ(cls, environ=None) -> "Cluster":
        env = os.environ if environ is None else environ
        local = _device_ids(env)
        given = [name for name in EXPLICIT if env.get(name, "").strip()]
        scheduler = _scheduler_tasks(env)
        if COUNT in given or RANK in given or (ADDRESS in given and not scheduler):
            missing = [name for name in EXPLICIT if name not in given]
            if missing:
                raise ClusterError(
                    f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but "
                    f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; a "
                    f"multi-process run needs all three, e.g. {ADDRESS}=node0:12355 "
                    f"{COUNT}=2 {RANK}=0 (1 on the other process), or unset them all to "
                    f"run one process")
            address = _address(env[ADDRESS].strip())
            count = _integer(env, COUNT, 1)
            rank = _integer(env, RANK, 0)
            if rank >= count:
                raise ClusterError(
                    f"{RANK}={rank} but {COUNT}={count}: process ids run from 0 to "
                    f"{count - 1}; give each process its own id in that range")
            return cls(address, count, rank, local, False, "environment " + ", ".join(
                f"{n}={env[n].strip()}" for n in EXPLICIT))
        if scheduler:
            name, tasks = scheduler
            address = env.get(ADDRESS, "").strip() or None
            return cls(address and _address(address), None, None, local, True,
                       f"{name} with {tasks} tasks")
        return cls(local_device_ids=local)


def _scheduler_tasks(env):
    """``(name, tasks)`` of a SLURM job or Open MPI launch of more than one task."""
    for name, var in (("SLURM", "SLURM_NTASKS"), ("Open MPI", "OMPI_COMM_WORLD_SIZE")):
        text = env.get(var, "").strip()
        if text.isdigit() and int(text) > 1:
            return name, int(text)
    return None


def _integer(env, name: str, minimum: int) -> int:
    text = env[name].strip()
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ClusterError(f"{name}={text!r} must be an integer >= {minimum}")
    return value


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"{ADDRESS}={text!r} must be host:port of process 0 (e.g. "
                           f"localhost:12355 or node0:12355), reachable from every process")
    return text


def _device_ids(env):
    text = env.get(LOCAL_IDS, "").strip()
    if not text:
        return None
    try:
        ids = tuple(int(t) for t in text.split(","))
    except ValueError:
        ids = ()
    if not ids or min(ids) < 0:
        raise ClusterError(f"{LOCAL_IDS}={text!r} must be comma-separated device numbers "
                           f"(e.g. 0 or 0,1): the GPUs this process drives")
    return ids


def initialize(cluster: Cluster) -> None:
    """Join ``cluster`` (nothing for one process, or when JAX already joined one: a script
    that called ``jax.distributed.initialize`` itself keeps its own settings)."""
    import jax

    if not cluster.multi_process or jax.distributed.is_initialized():
        return
    kw = dict(coordinator_address=cluster.coordinator_address,
              local_device_ids=list(cluster.local_device_ids or ()) or None)
    if not cluster.auto:
        kw.update(num_processes=cluster.num_processes, process_id=cluster.process_id)
    jax.distributed.initialize(**kw)
