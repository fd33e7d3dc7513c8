"""The bookkeeping of a run's workdir: one run at a time, the config it was started with, and a metrics
log that a resume continues rather than duplicates.

- `WorkdirLock`: `run.lock` names the holder (host, pid, start time). A second launch on the same workdir
  refuses with that name instead of deleting the first one's in-flight checkpoints. A lock left by a
  crashed run is stale when its host is this host and its pid is gone; a lock from another host cannot
  be checked from here, and the message says to delete it once that run is known to be dead.
- `check_resume_config`: a workdir with checkpoints resumes only with the model and data config it was
  trained with (a different tiny model would silently reuse the old one's weights; different data
  would continue the old stream's position in a new one); the differing keys are named.
- `write_config`: config.json, written atomically once the run has really started, so a launch that
  fails early never replaces the config `evaluate` and `ground` read.
- `truncate_metrics`: rows of steps after the checkpoint a run resumes from are replayed by it, so the
  earlier run's rows for them are dropped first.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# The sections a resume must agree on: what the checkpoint's arrays and the data iterator's position mean.
RESUME_SECTIONS = ("method", "model", "data")


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


class ConfigMismatchError(ValueError):
    """A resume's config disagrees with the one its checkpoints were written with."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Someone else's process: alive.
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `workdir/run.lock` for the block (this process only)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._held = False

    def _holder(self) -> dict | None:
        """The holder recorded in the lock file; None when it is unreadable (a crash while writing it)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                stale = holder is None or (holder.get("host") == me["host"] and not _pid_alive(int(holder["pid"])))
                if not stale:
                    raise WorkdirLockedError(
                        f"{os.path.dirname(self.path)} is in use by the run of pid {holder.get('pid')} on "
                        f"{holder.get('host')} (started {holder.get('started')}); wait for it, use another "
                        f"--workdir, or, if that run is dead (another host cannot be checked from here), "
                        f"delete {self.path}"
                    ) from None
                log.warning("removing the stale lock %s of a run that is gone: %s", self.path, holder)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass  # Another launch removed it first; the retry decides between us.
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return
        raise WorkdirLockedError(f"{self.path}: another launch took the lock at the same time")

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def has_checkpoints(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else key)
    return out


def _as_json(config) -> dict:
    """The config as config.json holds it (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def check_resume_config(config, workdir: str) -> None:
    """Raises `ConfigMismatchError` naming the keys of `RESUME_SECTIONS` that differ from the config the workdir's
    checkpoints were written with; nothing to compare without checkpoints or config.json."""
    path = os.path.join(workdir, "config.json")
    if not has_checkpoints(workdir) or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    now = _as_json(config)
    saved = _flat({k: saved.get(k) for k in RESUME_SECTIONS})
    now = _flat({k: now.get(k) for k in RESUME_SECTIONS})
    # Keys on one side only come from another version of the configs (a setting added or removed), not from the
    # user: the config is locked, so a typo cannot add one.
    differ = [
        f"{key}: checkpoints {saved[key]!r}, now {now[key]!r}"
        for key in sorted(saved.keys() & now.keys())
        if saved[key] != now[key]
    ]
    if differ:
        raise ConfigMismatchError(
            f"{workdir} holds checkpoints trained with another config; a resume must keep "
            f"{', '.join(RESUME_SECTIONS)} as they were. Differing keys:\n  " + "\n  ".join(differ)
            + "\nUse a new --workdir for a different model or data."
        )


def write_config(config, workdir: str) -> None:
    """workdir/config.json (atomically: a reader sees the old file or the new one)."""
    path = os.path.join(workdir, "config.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)


def truncate_metrics(path: str, last_step: int) -> None:
    """Drops the rows of `path` (JSON lines with a "step") after `last_step`, and a torn last line."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # A line cut by a kill.
            if row.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
