"""TimeScope's coarse-to-fine step: which segments to reload in full for an interval.

Inference: the coarse stage answers over the HVR of the whole video; its top window, widened by
`margin` seconds, picks the segments whose DVR is reloaded for the fine stage.

Training (TimeScope's second SFT stage, "temporal augmentation"): a fraction of the samples are
fine-stage samples whose coarse interval is the ground-truth window jittered, so the model learns
to answer over a mixed memory whose full-resolution region is near, but not exactly on, the event
(what a real coarse stage hands it).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class CoarseToFineConfig:
    """margin: seconds added on both sides of the coarse interval; max_reload_segments: at most
    this many segments are reloaded (those nearest the interval's centre); fine_fraction: share
    of training samples built as fine-stage samples; jitter: each end of the ground-truth window
    moves by up to this fraction of the window's length (plus `margin`-sized slack) in training.
    Built from the config's `coarse_to_fine` section (its values are the defaults: configs/meco.py)."""

    margin: float
    max_reload_segments: int
    fine_fraction: float
    jitter: float

    @classmethod
    def from_config(cls, config) -> CoarseToFineConfig:
        c = config.coarse_to_fine
        return cls(
            margin=c.margin, max_reload_segments=c.max_reload_segments, fine_fraction=c.fine_fraction, jitter=c.jitter
        )


def segment_spans(grid_times: np.ndarray, grid_duration: float, segment_frames: int, num_segments: int) -> np.ndarray:
    """[num_segments, 2] start/end seconds of each segment (NaN for segments past the video)."""
    grids = grid_times.shape[0]
    spans = np.full((num_segments, 2), np.nan)
    for k in range(num_segments):
        first, last = k * segment_frames, min((k + 1) * segment_frames, grids) - 1
        if first < grids:
            spans[k] = (grid_times[first], grid_times[last] + grid_duration)
    return spans


def segments_for_interval(interval, spans: np.ndarray, config: CoarseToFineConfig, scores=None) -> np.ndarray:
    """Indices (sorted) of the segments `reload_segments` chooses for `interval`."""
    return reload_segments(interval, spans, config, scores)[0]


def reload_segments(interval, spans: np.ndarray, config: CoarseToFineConfig, scores=None) -> tuple[np.ndarray, bool]:
    """(indices (sorted) of the segments overlapping [start - margin, end + margin], whether the cap cut some).
    When more than `max_reload_segments` overlap, the fine stage keeps those with the highest `scores`
    ([segments]: the coarse stage's confidence per segment, `segment_scores`), or without scores those whose
    centres are nearest the interval's centre (training's jittered intervals). Always at least one (the nearest)
    so the fine stage has something to look at."""
    start, end = float(interval[0]) - config.margin, float(interval[1]) + config.margin
    real = np.flatnonzero(~np.isnan(spans[:, 0]))
    if real.size == 0:
        raise ValueError("no segment covers any frame")
    overlapping = real[(spans[real, 0] < end) & (spans[real, 1] > start)]
    centre = (float(interval[0]) + float(interval[1])) / 2
    distance = np.abs(spans[:, 0] + spans[:, 1] - 2 * centre)
    if overlapping.size == 0:
        overlapping = real[np.argsort(distance[real])[:1]]
    if overlapping.size <= config.max_reload_segments:
        return np.sort(overlapping), False
    if scores is None:
        order = np.argsort(distance[overlapping], kind="stable")
    else:  # highest score first; ties go to the segment nearest the centre
        order = np.lexsort((distance[overlapping], -np.asarray(scores, np.float64)[overlapping]))
    return np.sort(overlapping[order[: config.max_reload_segments]]), True


def hvr_frames(
    frame_states: np.ndarray, frame_valid: np.ndarray, grid_times: np.ndarray, grid_duration: np.ndarray, temporal: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The frame states the coarse stage reads: the streamed frame states [B, F, E] pooled like the HVR, `temporal`
    consecutive grids to one slot (segments hold a multiple of `temporal` grids, so slots never straddle two).

    The coarse stage answers over the HVR: it attends to one pooled key per slot, and its windows are read at that
    resolution too. Reading them from the per-grid states instead gives the coarse stage the detail only the DVR
    holds, and leaves the fine stage nothing to add (measured: fine == coarse). Returns
    (slot states [B, S, E], slot valid [B, S], slot start times [B, S], slot duration [B]), S = ceil(F / temporal);
    a slot's state is the mean of its valid grids' states."""
    b, f, e = frame_states.shape
    slots = -(-f // temporal)
    pad = slots * temporal - f
    states = np.pad(np.asarray(frame_states, np.float32), ((0, 0), (0, pad), (0, 0)))
    valid = np.pad(np.asarray(frame_valid, bool), ((0, 0), (0, pad)))
    weights = valid.reshape(b, slots, temporal).astype(np.float32)
    sums = (states.reshape(b, slots, temporal, e) * weights[..., None]).sum(axis=2)
    counts = weights.sum(axis=2)
    times = np.asarray(grid_times, np.float64)[:, ::temporal]
    return sums / np.maximum(counts, 1.0)[..., None], counts > 0, times, np.asarray(grid_duration) * temporal


def segment_scores(probabilities: np.ndarray, segment_frames: int, num_segments: int) -> np.ndarray:
    """[num_segments] the highest per-frame probability inside each segment (0 past the video):
    `probabilities` [F] is the coarse top window's token's softmax over time."""
    scores = np.zeros(num_segments)
    for k in range(num_segments):
        inside = probabilities[k * segment_frames : (k + 1) * segment_frames]
        if inside.size:
            scores[k] = float(np.max(inside))
    return scores


def jitter_window(window, duration: float, rng: np.random.Generator, config: CoarseToFineConfig) -> tuple[float, float]:
    """A coarse interval around a ground-truth window: each end moved independently by up to
    `jitter` x the window length (at least one second of slack), clipped to the video, never empty."""
    start, end = float(window[0]), float(window[1])
    slack = max(config.jitter * (end - start), 1.0)
    a = np.clip(start + rng.uniform(-slack, slack), 0.0, duration)
    b = np.clip(end + rng.uniform(-slack, slack), 0.0, duration)
    a, b = min(a, b), max(a, b)
    return (a, max(b, min(a + 1.0, duration)))


def sample_rng(seed: int, epoch: int, sample_id: str) -> np.random.Generator:
    """The augmentation draws of one sample in one epoch: a function of the run's seed, the epoch and the sample
    alone, so a resumed run (its data iterator knows the epoch), or the same global batch read by any number of
    processes or workers, draws the same."""
    return np.random.default_rng([seed, epoch, zlib.crc32(str(sample_id).encode())])


def training_reloads(example: dict, segment_frames: int, config: CoarseToFineConfig, rng: np.random.Generator) -> np.ndarray:
    """[segments] bool: the segments one training example (`tasks.encoding`: windows, grid_times, grid_duration,
    duration) reloads, none for a coarse-stage example. A fine-stage example jitters one of its ground-truth
    windows, drawn with `rng`."""
    times = np.asarray(example["grid_times"])
    num_segments = -(-times.shape[0] // segment_frames)
    reloaded = np.zeros(num_segments, bool)
    windows = np.asarray(example["windows"]).reshape(-1, 2)
    if windows.shape[0] == 0 or rng.random() >= config.fine_fraction:
        return reloaded
    window = windows[rng.choice(windows.shape[0])]
    spans = segment_spans(times, float(example["grid_duration"]), segment_frames, num_segments)
    coarse = jitter_window(window, float(example["duration"]), rng, config)
    reloaded[segments_for_interval(coarse, spans, config)] = True
    return reloaded
