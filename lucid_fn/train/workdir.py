"""A training run's folder: one run at a time, and never anybody else's files.

- **Locked.** ``workdir/.lock`` is held (``fcntl.flock``) for the whole run and names its
  holder (pid, host, start, command). A second run on the folder is refused with those
  details. The operating system drops the lock when its process ends, however it ends
  (SIGKILL, a crash, a reboot), so a lock left by a dead run is simply taken over; the
  file itself stays (removing it would let two runs lock two different files).
- **Owned.** A run writes ``config.toml`` first, with ``HEADER`` as its first line. A folder
  is continued only if it holds checkpoints and a ``config.toml`` that matches the run;
  it is started afresh only if it is empty, new, or holds what a run of the same config
  left before its first checkpoint. Anything else (a user's own ``config.toml``,
  ``metrics.jsonl``, ``model.safetensors``, other files; checkpoints without their
  config) is refused, never overwritten.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import sys

from lucid_fn.train import config as config_lib

LOCK_NAME = ".lock"
CONFIG_NAME = "config.toml"
HEADER = "# Written by lucid-fn train: the resolved config of the run in this folder."
# Names a run leaves that say nothing on their own: the lock and unfinished atomic writes.
_IGNORED_PREFIXES = (LOCK_NAME, ".tmp-")


class WorkdirError(config_lib.ConfigError):
    """train.workdir cannot be used for this run: busy, not writable, or someone else's."""


# ------------------------------------------------------------------------ the folder


def prepare(path) -> pathlib.Path:
    """``train.workdir`` as a folder that exists (created with its parents)."""
    workdir = pathlib.Path(path)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"train.workdir {str(workdir)!r} is a file, not a folder; choose "
                           f"a folder, e.g. --workdir runs/my_run")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create train.workdir {str(workdir)!r}: {e.strerror}; "
                           f"choose a folder you can write to") from None
    return workdir


def write_config(workdir: pathlib.Path, text: str) -> None:
    """The resolved config, atomically, marked as written by a run."""
    from lucid_fn.weights import atomic_write

    atomic_write(workdir / CONFIG_NAME, lambda tmp: pathlib.Path(tmp).write_text(
        f"{HEADER}\n{text}"))


def saved_config(workdir: pathlib.Path):
    """``(config or None, written by a run)`` of the folder's config.toml."""
    path = workdir / CONFIG_NAME
    if not path.is_file():
        return None, False
    ours = path.read_text(errors="replace").startswith(HEADER)
    try:
        return config_lib.load_config(path), ours
    except config_lib.ConfigError as e:
        raise WorkdirError(f"{path} cannot be read as a lucid-fn config ({e}); this folder "
                           f"does not hold a run of this config: choose another "
                           f"train.workdir") from None


def has_checkpoints(workdir: pathlib.Path) -> bool:
    """Whether the folder holds a finished checkpoint (orbax names them by step)."""
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def differences(old, new) -> list[str]:
    """Config keys whose change would make a run compute something else."""
    from lucid_fn.train.loop import RESUMABLE_CHANGES

    old, new = old.to_dict(), new.to_dict()
    return sorted(f"{s}.{k}" for s in new for k in new[s]
                  if old[s][k] != new[s][k] and f"{s}.{k}" not in RESUMABLE_CHANGES)


def check_owned(workdir: pathlib.Path, cfg) -> None:
    """Refuse a folder holding anything a run of ``cfg`` did not write (see the module
    docstring); called under the lock, before anything is written."""
    saved, ours = saved_config(workdir)
    if has_checkpoints(workdir):
        if saved is None:
            raise WorkdirError(
                f"{workdir} holds checkpoints but not the config.toml of their run, so "
                f"resuming could continue them under another config. Put that run's "
                f"config back as {workdir / CONFIG_NAME} (a copy of the config file it "
                f"was started with, with the same --set values), or choose another "
                f"train.workdir")
        changed = differences(saved, cfg)
        if changed:
            raise WorkdirError(
                f"the config differs from the run in {workdir} in {', '.join(changed)}; "
                f"continuing would not continue that run. Use its config "
                f"({workdir / CONFIG_NAME}) or choose another train.workdir")
        return
    if saved is not None and ours:
        changed = differences(saved, cfg)
        if changed:
            raise WorkdirError(
                f"{workdir} holds a run of another config (it differs in "
                f"{', '.join(changed)}); choose another train.workdir, or delete that "
                f"folder if its run is no longer wanted")
        return  # this config's run, stopped before its first checkpoint: start again
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in workdir.iterdir()
                     if not p.name.startswith(_IGNORED_PREFIXES)
                     and not (p.name == "checkpoints" and p.is_dir() and not any(p.iterdir())))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise WorkdirError(
            f"train.workdir {str(workdir)!r} is not empty and holds no lucid-fn run "
            f"({shown}); a new run needs a new or empty folder, so that nothing in it is "
            f"overwritten: choose another --workdir")


# ------------------------------------------------------------------------ the lock


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return (f"pid {h['pid']} on {h['host']}, started {h['started']}: "
                f"{' '.join(h.get('argv', []))}".rstrip(": "))
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


class WorkdirLock:
    """An exclusive lock on a workdir for the life of a run (a context manager)."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot write in train.workdir {str(self.workdir)!r} "
                               f"({e.strerror}); choose a folder you can write to") from None
        if not _try_lock(fd, self.workdir):
            os.lseek(fd, 0, os.SEEK_SET)
            holder = _holder_text(os.read(fd, 4096).decode(errors="replace"))
            os.close(fd)
            raise WorkdirError(
                f"train.workdir {str(self.workdir)!r} is in use by another lucid-fn run "
                f"({holder}); wait for it to finish or stop it, or choose another --workdir")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "argv": [os.path.basename(sys.argv[0])] + sys.argv[1:]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        if hasattr(os, "register_at_fork"):
            # A forked data worker would share the locked file and could keep the folder
            # locked after this run died; its copy is closed (the run's own stays locked).
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no holder; the file stays (see the module docstring)
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def _try_lock(fd, workdir) -> bool:
    """Take the lock without waiting; False if another process holds it. A file system
    without locks (some network mounts) gets a warning, not a refusal."""
    try:
        import fcntl
    except ImportError:  # Windows: a locked byte, also dropped when its process ends
        import msvcrt

        try:
            os.lseek(fd, 1 << 20, os.SEEK_SET)  # beyond the holder text, which stays readable
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        import warnings

        warnings.warn(f"cannot lock train.workdir {str(workdir)!r} ({e.strerror}); make sure "
                      f"no other run uses it", stacklevel=3)
    return True
