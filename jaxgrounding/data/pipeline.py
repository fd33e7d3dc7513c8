"""The grain input pipeline: samples -> decoded, tokenized, padded, batched arrays.

Graph (``make_pipeline``)::

  MapDataset.source(samples) -> shuffle(seed) -> repeat(num_epochs)
    -> this process's slice of every global batch -> decode + transform (a worker's job)
    -> to_iter_dataset -> pad into buckets + batch (in the worker)
    -> mp_prefetch(worker_count) -> skip accounting (main process)

One global stream, the same for any number of processes: shuffling is global and identical
on every process (grain folds the epoch into the seed, so each epoch has its own order), and
global batch ``s`` is stream positions ``[s * B, (s + 1) * B)`` with ``B = batch_size *
shard_count``. Process ``p`` reads the contiguous rows ``[p * batch_size, (p + 1) * batch_size)``
of each global batch, so the global batch a step trains on (and its row order, which
micro-batching splits) does not depend on how many processes read it, and a run resumed on a
different number of processes continues the same stream (``reshard_state``).

Bad samples: a video that does not decode (``VideoDecodeError``), whose decoded duration
contradicts its annotation (``max_duration_error``), or a sample the transform
cannot turn into arrays (a query longer than the encoder's ``max_tokens``, a target that
cannot be placed: any exception of the transform) is, with ``skip_bad_samples``, dropped
inside the worker; its id, path and reason travel to the main process with the next batch
(``_skipped``), and the iterator logs them, counted by reason, once an epoch is over
(``iterator.epoch_reports``). Without it, the first bad sample stops the run. A resumed run
replays the same order, so a sample that fails once fails again: skipping is what lets it
go on. Skipping is bounded: more than ``max_failure_fraction`` of the samples read failing
(once ``_MIN_READ`` were read), ``_MIN_READ`` failures in a row (storage gone: every read
fails in microseconds and a loop that only skips would spin forever), or a finite pass with
no good sample stop with ``DataFailureError`` listing the reasons.

Resumption: the returned iterator is a ``grain.DatasetIterator``; ``get_state`` /
``set_state`` (JSON-able) and ``grain.checkpoint.CheckpointHandler`` (Orbax) restore it
to yield exactly the batches the uninterrupted iterator would have yielded. Each
worker batches its own slice, so batch composition depends on ``worker_count``: resume
with the same count.
"""

import collections
import dataclasses
import functools
import logging
from typing import Any, Mapping, Protocol, Sequence

from absl import flags
import grain
import numpy as np

from jaxgrounding.data import padding
from jaxgrounding.data import video as video_lib
from jaxgrounding.data.sample import Sample


class Transform(Protocol):
    """Turns one decoded example into model inputs (tokenization lives here).

    ``epoch``: the pass over the data the example is read in; per-sample augmentation drawn from (seed, sample
    id, epoch) differs between epochs and is replayed exactly by a resumed iterator (its state holds the stream
    position, hence the epoch). Arrays whose axis 0 varies between examples must have a bucket in
    ``PipelineConfig.buckets`` (the keys are ``data.schema``'s); everything else must have the same shape every time.
    """

    def __call__(self, sample: Sample, video: video_lib.Video, epoch: int) -> dict[str, np.ndarray]: ...


def default_transform(sample: Sample, video: video_lib.Video, epoch: int) -> dict[str, np.ndarray]:
    """Frames, timestamps and windows as they are; no text (tests, benchmarks)."""
    del epoch  # nothing is drawn
    return {
        "frames": video.frames,
        "timestamps": video.timestamps.astype(np.float32),
        "windows": np.asarray(sample.windows, np.float32).reshape(-1, 2),
        "duration": np.float32(sample.duration),
    }


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Pipeline knobs.

    batch_size: examples per batch on this process.
    seed: shuffle seed (same on all processes).
    num_epochs: passes over the data; None repeats forever.
    shuffle: False keeps the source order (evaluation).
    worker_count: decode processes; 0 decodes in the main process (threads only).
    worker_buffer_size: batches each worker keeps ready.
    read_threads, read_buffer: threads and look-ahead (examples) inside each worker;
      the buffer holds decoded videos, so keep it small.
    skip_bad_samples: drop and report samples that fail to decode or transform (True) or
      raise (False).
    max_failure_fraction: stop (``DataFailureError``) once more than this fraction of the
      samples read failed; 1.0 never stops on the fraction.
    max_duration_error: skip (stage "label") a sample whose annotated duration differs from its
      decoded video's by more than this fraction of the video's (and 1 s): its windows were
      measured on another file. None: no check.
    drop_remainder: drop the last short batch instead of padding it.
    buckets: allowed sizes of axis 0 per transform output key.
    video: keyword arguments for ``read_video`` (fps, max_frames, size, ...).
    shard_index, shard_count: this process's slice; None uses jax's process index/count.
    """

    batch_size: int = 8
    seed: int = 0
    num_epochs: int | None = 1
    shuffle: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer: int = 8
    skip_bad_samples: bool = True
    max_failure_fraction: float = 1.0
    max_duration_error: float | None = None
    drop_remainder: bool = False
    buckets: Mapping[str, Sequence[int]] = dataclasses.field(
        default_factory=lambda: {"frames": (16, 32, 64), "timestamps": (16, 32, 64), "windows": (1, 4, 16)}
    )
    video: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"fps": 1.0, "max_frames": 64})
    shard_index: int | None = None
    shard_count: int | None = None


# Keys that carry bookkeeping, not model inputs.
_EPOCH, _SKIPPED, _BAD = "_epoch", "_skipped", "_bad"

# The failure fraction is judged once this many samples were read (a first batch with one bad
# sample in four is no verdict on the dataset), and this many failures in a row stop the run
# whatever the fraction (a long run whose storage went away).
_MIN_READ = 100


class DataFailureError(RuntimeError):
    """Too many samples failed to decode or transform; the message lists the reasons."""


def _bad(epoch: int, sample: Sample, stage: str, reason: str) -> dict[str, Any]:
    # Tabs separate the fields on their way to the main process; a reason may hold any text.
    reason = " ".join(reason.split())
    return {_EPOCH: epoch, _BAD: f"{sample.id}\t{sample.video}\t{stage}\t{reason}"}


def _decode_and_transform(
    index_and_item: tuple[int, Any],
    *,
    epoch_length: int,
    video_options: Mapping[str, Any],
    transform: Transform,
    skip_bad_samples: bool,
    max_duration_error: float | None,
) -> dict[str, Any]:
    index, item = index_and_item
    epoch = index // epoch_length
    # Pre-extracted records (TFDS with frames) arrive as (Sample, Video) pairs.
    if isinstance(item, tuple):
        sample, video = item
    else:
        sample = item
        try:
            video = video_lib.read_video(sample.video, **video_options)
        except video_lib.VideoDecodeError as e:
            if not skip_bad_samples:
                raise
            return _bad(epoch, sample, "decode", e.reason)
    if max_duration_error is not None and abs(video.duration - sample.duration) > max(
        1.0, max_duration_error * video.duration
    ):
        reason = (
            f"duration_mismatch: the annotation says {sample.duration:.2f} s, "
            f"the video decodes to {video.duration:.2f} s"
        )
        if not skip_bad_samples:
            raise ValueError(f"sample {sample.id} ({sample.video}): {reason}")
        return _bad(epoch, sample, "label", reason)
    try:
        return {_EPOCH: epoch, **transform(sample, video, epoch)}
    except Exception as e:  # pylint: disable=broad-except
        # Any per-sample error (tokenizing, encoding, building targets); a systematic one (a bug)
        # fails every sample and trips the failure cap, which names it.
        if not skip_bad_samples:
            raise
        return _bad(epoch, sample, "transform", f"{type(e).__name__}: {e}")


class _BatchIterator(grain.DatasetIterator):
    """Batches good examples, forwards the bad ones' paths with the next batch.

    Holds nothing between batches (every pulled example leaves with the batch it was
    pulled for), so its state is its parent's.
    """

    def __init__(self, parent, batch_size, buckets, drop_remainder):
        super().__init__(parent)
        self._batch_size = batch_size
        self._buckets = buckets
        self._drop_remainder = drop_remainder

    def __next__(self):
        examples, skipped, epochs = [], [], []
        in_a_row = 0
        while len(examples) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                break
            epoch = element.pop(_EPOCH)
            if _BAD in element:
                skipped.append(f"{epoch}\t{element[_BAD]}")
                in_a_row += 1
                if in_a_row >= _MIN_READ:
                    # Filling a batch from a source that only fails would never end.
                    raise _failure_error(
                        f"the last {in_a_row} samples read all failed (is the data storage reachable?)",
                        [_parse_skipped(entry) for entry in skipped],
                    )
            else:
                examples.append(element)
                epochs.append(epoch)
                in_a_row = 0
        short = len(examples) < self._batch_size
        if not examples or (short and self._drop_remainder):
            if not skipped:
                raise StopIteration
            # Nothing to train on, but the skipped paths must still reach the report.
            return {_SKIPPED: np.asarray(skipped, dtype=str), _EPOCH: np.int64(-1)}
        batch = padding.pad_and_stack(examples, self._batch_size, self._buckets)
        batch[_SKIPPED] = np.asarray(skipped, dtype=str)
        batch[_EPOCH] = np.int64(min(epochs))
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _BatchDataset(grain.IterDataset):

    def __init__(self, parent, batch_size, buckets, drop_remainder):
        super().__init__(parent)
        self._args = (batch_size, {k: tuple(v) for k, v in buckets.items()}, drop_remainder)

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), *self._args)


class PipelineIterator(grain.DatasetIterator):
    """Yields batches; keeps and reports the skipped samples; stops a run that only fails.

    epoch_reports: one ``{"epoch", "count", "ids", "paths", "reasons"}`` per finished epoch
      (logged); ``reasons`` counts the skips per ``"stage: reason"`` (stage: decode or transform).
    skipped: every ``(epoch, id, path, stage, reason)`` skipped so far.
    read, failed: samples read and samples that failed so far (their ratio is capped).

    A sample a later stage cannot use (GRPO builds its prompts at rollout time) is handed back with
    ``skip``: counted and reported like the pipeline's own failures, judged at the next batch.
    """

    def __init__(self, parent, max_failure_fraction: float):
        super().__init__(parent)
        self.skipped: list[tuple[int, str, str, str, str]] = []
        self.epoch_reports: list[dict[str, Any]] = []
        self.read = self.failed = 0
        self._in_a_row = 0  # Failures since the last good sample.
        self._max_failure_fraction = max_failure_fraction
        self._next_report = 0  # First epoch not yet reported.
        self._epoch = 0  # The last batch's epoch: the one ``skip`` files its samples under.

    def _report_until(self, epoch: int | None) -> None:
        """Reports every epoch before ``epoch`` (all of them when None)."""
        last = max([s[0] for s in self.skipped] + [self._next_report - 1])
        stop = last + 1 if epoch is None else epoch
        for e in range(self._next_report, stop):
            entries = [s for s in self.skipped if s[0] == e]
            report = {
                "epoch": e,
                "count": len(entries),
                "ids": [s[1] for s in entries],
                "paths": [s[2] for s in entries],
                "reasons": dict(collections.Counter(_reason_key(s) for s in entries)),
            }
            self.epoch_reports.append(report)
            if entries:
                logging.warning(
                    "epoch %d: skipped %d samples %s: %s", e, len(entries), report["reasons"], report["ids"]
                )
        self._next_report = max(self._next_report, stop)

    def _check_failures(self, finished: bool) -> None:
        """Raises ``DataFailureError`` when failures are no longer the exception."""
        if not self.failed:
            return
        if self._in_a_row >= _MIN_READ:
            why = f"the last {self._in_a_row} samples read all failed (is the data storage reachable?)"
        elif self.read >= _MIN_READ and self.failed > self._max_failure_fraction * self.read:
            why = (
                f"{self.failed} of {self.read} samples read failed, more than data.max_failure_fraction="
                f"{self._max_failure_fraction}"
            )
        elif finished and self.failed == self.read:
            why = f"none of the {self.read} samples could be read"
        else:
            return
        raise _failure_error(why, self.skipped)

    def __next__(self):
        while True:
            try:
                batch = next(self._parent)
            except StopIteration:
                self._report_until(None)
                self._check_failures(finished=True)
                raise
            entries = batch.pop(_SKIPPED).tolist()
            self.skipped += [_parse_skipped(entry) for entry in entries]
            epoch = int(batch.pop(_EPOCH))
            good = int(batch["valid"].sum()) if epoch >= 0 else 0
            self.read += good + len(entries)
            self.failed += len(entries)
            # Any good sample in the batch ends a run of failures.
            self._in_a_row = 0 if good else self._in_a_row + len(entries)
            self._check_failures(finished=False)
            if epoch >= 0:
                self._report_until(epoch)
                self._epoch = epoch
                return batch

    def skip(self, failures: Sequence[tuple[Sample, str, str]]) -> None:
        """Records ``(sample, stage, reason)`` of samples of the last batch that a later stage could not use.

        They were counted as read when their batch came; the failure cap is judged at the next batch (so
        every process of a multi-process run reaches the same point before one of them stops). The last
        batch's epoch is not reported yet (reports cover only epochs before the newest batch's).
        """
        entries = [_bad(self._epoch, sample, stage, reason)[_BAD] for sample, stage, reason in failures]
        self.skipped += [_parse_skipped(f"{self._epoch}\t{entry}") for entry in entries]
        self.failed += len(entries)

    def get_state(self):
        return {
            "parent": self._parent.get_state(),
            "skipped": [list(s) for s in self.skipped],
            "next_report": self._next_report,
            "read": self.read,
            "failed": self.failed,
            "in_a_row": self._in_a_row,
        }

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.skipped = [tuple(s) for s in state["skipped"]]
        self._next_report = state["next_report"]
        self.read, self.failed, self._in_a_row = state["read"], state["failed"], state["in_a_row"]
        self.epoch_reports = []


def _parse_skipped(entry: str) -> tuple[int, str, str, str, str]:
    epoch, sample_id, path, stage, reason = entry.split("\t", 4)
    return int(epoch), sample_id, path, stage, reason


def _failure_error(why: str, skipped: list[tuple[int, str, str, str, str]]) -> DataFailureError:
    reasons = collections.Counter(_reason_key(s) for s in skipped)
    latest = [f"{s[1]} ({s[2]}): {s[3]}: {s[4]}" for s in skipped[-5:]]
    return DataFailureError(f"{why}; failures by reason: {dict(reasons.most_common())}; latest:\n  " + "\n  ".join(latest))


def _reason_key(entry: tuple[int, str, str, str, str]) -> str:
    """What skips are counted by: the stage and the reason's kind (its text up to the first ':',
    so token counts or paths inside a message do not split the count)."""
    return f"{entry[3]}: {entry[4].split(':', 1)[0]}"


class _ReportDataset(grain.IterDataset):

    def __init__(self, parent, max_failure_fraction: float):
        super().__init__(parent)
        self._max_failure_fraction = max_failure_fraction

    def __iter__(self):
        return PipelineIterator(self._parent.__iter__(), self._max_failure_fraction)


class _ProcessRows(grain.MapDataset):
    """Local element k of process `index` of `count` is global stream position
    (k // b) * b * count + index * b + k % b: its rows of every global batch of count * b."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, rows: int, index: int, count: int):
        super().__init__(parent)
        self._rows, self._index, self._count = rows, index, count
        full, rest = divmod(len(parent), rows * count)
        self._length = full * rows + min(max(rest - index * rows, 0), rows)

    def __len__(self) -> int:
        return self._length

    def _global(self, k: int) -> int:
        batch, row = divmod(k, self._rows)
        return (batch * self._count + self._index) * self._rows + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global(index)]

    def _getitems(self, indices):
        return self._parent._getitems([self._global(k) for k in indices])  # pylint: disable=protected-access

    def __str__(self) -> str:
        return f"_ProcessRows(rows={self._rows}, index={self._index}, count={self._count})"


def reshard_state(states: Sequence[Mapping[str, Any]], count: int) -> list[dict[str, Any]]:
    """Iterator states saved by ``len(states)`` processes -> the states of ``count`` processes.

    The processes consume the global stream in lockstep (``batch_size`` rows of each global
    batch), so ``k`` local elements read by each of ``n`` processes are ``k * n`` global ones,
    and ``count`` processes resume at ``k * n / count`` each. If skipped videos made the old
    processes drift apart, the furthest one decides (no example is seen twice). Skipped-video
    records move to process 0. Only the in-process pipeline (``worker_count=0``) has a state
    this can translate; ``mp_prefetch``'s per-worker states are grain's own.
    """
    parents = [s["parent"] for s in states]
    if not all(set(p) == {"next_index"} for p in parents):
        raise ValueError(
            f"a data iterator saved by {len(states)} processes with worker processes (data.workers > 0) can only "
            f"resume on {len(states)} processes, not {count}; resume with that many, or train with data.workers=0"
        )
    consumed = max(p["next_index"] for p in parents) * len(states)
    if consumed % count:
        raise ValueError(
            f"the data iterator consumed {consumed} examples, which {count} processes cannot share evenly; "
            f"resume from a checkpoint whose step times the global batch size is divisible by {count}"
        )
    skipped = sorted(entry for s in states for entry in s["skipped"])
    next_report = min(s["next_report"] for s in states)
    # Failure counts, like the skip records, move to process 0.
    totals = {key: sum(s[key] for s in states) for key in ("read", "failed")}
    in_a_row = max(s["in_a_row"] for s in states)
    return [
        {
            "parent": {"next_index": consumed // count},
            "skipped": skipped if i == 0 else [],
            "next_report": next_report,
            **(totals if i == 0 else {"read": 0, "failed": 0}),
            "in_a_row": in_a_row if i == 0 else 0,
        }
        for i in range(count)
    ]


def _shard(config: PipelineConfig) -> tuple[int, int]:
    if config.shard_index is not None and config.shard_count is not None:
        return config.shard_index, config.shard_count
    import jax  # pylint: disable=g-import-not-at-top  # Only when sharding is implicit.

    return jax.process_index(), jax.process_count()


def make_pipeline(
    source: Sequence[Sample] | Sequence[tuple[Sample, video_lib.Video]],
    config: PipelineConfig = PipelineConfig(),
    transform: Transform = default_transform,
) -> grain.IterDataset:
    """Builds the dataset; ``iter(dataset)`` gives a ``PipelineIterator``.

    Args:
      source: random-access samples, or ``(Sample, Video)`` pairs when frames were
        pre-extracted (then nothing is decoded).
      config: see ``PipelineConfig``.
      transform: model-side conversion to arrays (must be picklable for workers).
    """
    shard_index, shard_count = _shard(config)
    ds = grain.MapDataset.source(source)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    epoch_length = len(ds)
    ds = ds.repeat(config.num_epochs)
    ds = ds.map_with_index(lambda i, item: (i, item))  # i: the global stream position
    ds = _ProcessRows(ds, config.batch_size, shard_index, shard_count)
    if len(ds) == 0:
        raise ValueError(
            f"shard {shard_index}/{shard_count} of the source is empty: {epoch_length} examples, "
            f"{shard_count} processes of batch_size {config.batch_size}"
        )
    ds = ds.map(
        functools.partial(
            _decode_and_transform,
            epoch_length=epoch_length,
            video_options=dict(config.video),
            transform=transform,
            skip_bad_samples=config.skip_bad_samples,
            max_duration_error=config.max_duration_error,
        )
    )
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer))
    it = _BatchDataset(it, config.batch_size, config.buckets, config.drop_remainder)
    if config.worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app (tests, notebooks)
        # they were never parsed and the workers fail, so accept the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.worker_count,
                per_worker_buffer_size=config.worker_buffer_size,
            )
        )
    return _ReportDataset(it, config.max_failure_fraction)
