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
- `MetricsLog`: train_metrics.jsonl; rows of steps after the checkpoint a run resumes from are replayed by
  it, so the earlier run's rows for them are dropped first.
- `TensorBoard`: the event files, in workdir/tb.

Every file goes through `jaxgrounding.paths`, so the workdir may be an object-store URL (gs://...).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from jaxgrounding import paths

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
    """`with WorkdirLock(workdir):` holds `workdir/run.lock` for the block (this process only).

    Locally the lock is created exclusively (O_EXCL). An object store has no exclusive create through epath:
    there the lock is checked, then written, and two launches within the same second can both pass."""

    def __init__(self, workdir: str):
        self.path = paths.join(workdir, LOCK_FILE)
        self._held = False

    def _holder(self) -> dict | None:
        """The holder recorded in the lock file; None when it is unreadable (a crash while writing it)."""
        try:
            holder = json.loads(paths.read_text(self.path))
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def _create(self, me: dict) -> bool:
        """Writes the lock unless it exists; False when it does."""
        if not paths.is_local(self.path):
            if paths.exists(self.path):
                return False
            paths.write_text(self.path, json.dumps(me))
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return True

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(2):
            if self._create(me):
                self._held = True
                return
            holder = self._holder()
            stale = holder is None or (holder.get("host") == me["host"] and not _pid_alive(int(holder["pid"])))
            if not stale:
                raise WorkdirLockedError(
                    f"{self.path.rsplit('/', 1)[0]} is in use by the run of pid {holder.get('pid')} on "
                    f"{holder.get('host')} (started {holder.get('started')}); wait for it, use another "
                    f"--workdir, or, if that run is dead (another host cannot be checked from here), "
                    f"delete {self.path}"
                )
            log.warning("removing the stale lock %s of a run that is gone: %s", self.path, holder)
            paths.remove(self.path)  # Another launch may remove it first; the retry decides between us.
        raise WorkdirLockedError(f"{self.path}: another launch took the lock at the same time")

    def release(self) -> None:
        if self._held:
            self._held = False
            paths.remove(self.path)

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def checkpoints(workdir: str) -> str:
    """The Orbax directory of `workdir`."""
    return paths.join(workdir, "checkpoints")


def has_checkpoints(workdir: str) -> bool:
    return any(name.isdigit() for name in paths.listdir(checkpoints(workdir)))


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
    path = paths.join(workdir, "config.json")
    if not has_checkpoints(workdir) or not paths.isfile(path):
        return
    saved = json.loads(paths.read_text(path))
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
    """workdir/config.json (whole: a reader sees the old file or the new one)."""
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


class MetricsLog:
    """train_metrics.jsonl, one JSON row per logged step, written by process 0 only.

    Object stores cannot append, so the log is kept in memory and the whole file rewritten (`paths.write_text`)
    on `flush`: at every checkpoint save, at most every `flush_s` seconds for who watches the run, and on close.
    Rows lost by a kill after the last flush are rows after the last checkpoint, which the resumed run replays
    and logs again, so a crash loses none. At run scale (a row per logged step) the file stays small."""

    def __init__(self, path: str, last_step: int, flush_s: float = 60.0):
        """Opens the log of a run resuming after `last_step`: the earlier rows of later steps (replayed by the
        resume) and a torn last line are dropped."""
        self.path, self.flush_s = path, flush_s
        self._lines: list[str] = []
        if paths.isfile(path):
            for line in paths.read_text(path).splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # A line cut by a kill.
                if row.get("step", 0) <= last_step:
                    self._lines.append(line + "\n")
        self._flushed = time.monotonic()
        self.flush()

    def append(self, row: dict) -> None:
        self._lines.append(json.dumps(row) + "\n")
        if time.monotonic() - self._flushed >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        paths.write_text(self.path, "".join(self._lines))
        self._flushed = time.monotonic()

    def close(self) -> None:
        self.flush()


class TensorBoard:
    """TensorBoard event files in workdir/tb. tensorboardX writes local files: for a remote workdir they are
    written to the local cache and copied to workdir/tb on `flush` (at checkpoint saves) and `close`."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self.target = paths.join(workdir, "tb")
        self.local = paths.local_cache(workdir, "tb")
        self._writer = SummaryWriter(self.local)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self._writer.flush()
        paths.upload(self.local, self.target)

    def close(self) -> None:
        self._writer.close()
        paths.upload(self.local, self.target)
