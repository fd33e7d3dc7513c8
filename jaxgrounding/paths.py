"""Workdir paths anywhere: every read and write of a run's workdir goes through here, over `etils.epath`.

A workdir is a local directory or an object-store URL (`gs://bucket/run`: epath reaches it through fsspec +
gcsfs, the `cloud` extra, or through tf.io.gfile where TensorFlow is installed). Object stores differ from a
disk in what this module hides:

- no rename and no append: a file is written whole, as one object (`write_text`), which readers see complete
  or not at all; a local file is written beside its place and renamed in, for the same guarantee;
- no local path: what must be a local file for a library (the tiny model's directory for transformers'
  tokenizer, the generated synthetic videos for the decoders, TensorBoard's event writer) lives in a local cache
  (`local_cache`: `$XDG_CACHE_HOME/jaxgrounding/...`, by default `~/.cache/jaxgrounding/...`) and is copied
  to or from the workdir (`upload`, `download`).

Orbax writes its checkpoints through epath and tensorstore itself: it is given the URL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from etils import epath

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
    """A path of this machine's filesystem (no `scheme://`)."""
    return "://" not in os.fspath(path)


def join(path: PathLike, *parts: str) -> str:
    """`path/part/...` as a string (URLs keep their scheme)."""
    return os.fspath(epath.Path(path).joinpath(*parts))


def exists(path: PathLike) -> bool:
    return epath.Path(path).exists()


def isfile(path: PathLike) -> bool:
    p = epath.Path(path)
    return p.exists() and not p.is_dir()


def isdir(path: PathLike) -> bool:
    return epath.Path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
    """The names in directory `path` ([] when it does not exist)."""
    p = epath.Path(path)
    return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path: PathLike) -> None:
    """Creates `path` and its parents (object stores have no directories: nothing to do there)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
    """Removes the file `path` if it is there."""
    try:
        epath.Path(path).unlink()
    except FileNotFoundError:
        pass


def read_text(path: PathLike) -> str:
    return epath.Path(path).read_text(encoding="utf-8")


def write_text(path: PathLike, text: str) -> None:
    """Writes `path` whole: a reader sees the old contents or the new, never part of them (locally: written
    beside it and renamed in; an object store: one object written in one request, which is atomic there)."""
    if not is_local(path):
        with epath.Path(path).open("w") as f:
            f.write(text)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def cache_root() -> str:
    """This machine's cache of what must be local: `$XDG_CACHE_HOME/jaxgrounding` (default ~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxgrounding")


def local_cache(workdir: PathLike, name: str) -> str:
    """A local directory for `workdir/name`: that directory itself for a local workdir; for a remote one, a
    directory of this machine's cache named after the workdir's URL (so runs never share one)."""
    if is_local(workdir):
        return os.path.join(os.fspath(workdir), name)
    digest = hashlib.sha256(os.fspath(workdir).encode()).hexdigest()[:12]
    return os.path.join(cache_root(), "workdirs", digest, name)


def upload(local_dir: str, target: PathLike) -> None:
    """Copies the files of `local_dir` (recursively) to `target` (a no-op when they are the same directory)."""
    if is_local(target) and os.path.abspath(target) == os.path.abspath(local_dir):
        return
    for root, _, files in os.walk(local_dir):
        relative = os.path.relpath(root, local_dir)
        destination = epath.Path(target) if relative == "." else epath.Path(target) / relative
        destination.mkdir(parents=True, exist_ok=True)
        for name in files:
            epath.Path(os.path.join(root, name)).copy(destination / name, overwrite=True)


def download(source: PathLike, local_dir: str) -> str:
    """`source`'s files copied into `local_dir` (recursively; written beside it and renamed in, so a
    `local_dir` that exists is complete); returns `local_dir`. A local `source` is returned as it is."""
    if is_local(source):
        return os.fspath(source)
    if os.path.isdir(local_dir):
        return local_dir
    parent = os.path.dirname(os.path.abspath(local_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(local_dir)}.tmp-", dir=parent)
    for root, _, files in epath.Path(source).walk():
        relative = os.path.relpath(os.fspath(root), os.fspath(source)) if os.fspath(root) != os.fspath(source) else "."
        os.makedirs(os.path.join(tmp, relative), exist_ok=True)
        for name in files:
            (epath.Path(root) / name).copy(epath.Path(os.path.join(tmp, relative, name)), overwrite=True)
    try:
        os.replace(tmp, local_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # Another process finished it first.
    return local_dir


class Staged:
    """`with Staged(target) as local:` a local directory whose files end up in `target`: `target` itself when
    it is local, else a temporary directory uploaded when the block ends without error (export/)."""

    def __init__(self, target: PathLike):
        self.target = os.fspath(target)
        self._tmp = None

    def __enter__(self) -> str:
        if is_local(self.target):
            os.makedirs(self.target, exist_ok=True)
            return self.target
        self._tmp = tempfile.mkdtemp(prefix="jaxgrounding-stage-")
        return self._tmp

    def __exit__(self, exc_type, *_) -> None:
        if self._tmp is None:
            return
        try:
            if exc_type is None:
                upload(self._tmp, self.target)
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
