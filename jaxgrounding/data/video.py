"""Reads frames and their true timestamps from a video file.

Grounding targets are seconds, so every returned frame carries the presentation time
of the frame actually decoded (from the container's pts, relative to the first frame),
never an index divided by a nominal fps.

Decoders: decord is the fast path, PyAV the fallback. decord is known to hang or crash
on some broken files, so it only ever sees a file that PyAV has opened and demuxed
first (a cheap pass over packets, no decoding), and only when decord's frame index
agrees with the container's packets; otherwise PyAV decodes the file. Every failure
surfaces as ``VideoDecodeError`` naming the path and the reason.
"""

import dataclasses
import logging
import os
from typing import Literal

import av
import numpy as np
from PIL import Image

from jaxgrounding.data import resize

try:
    import decord  # pylint: disable=g-import-not-at-top
except ImportError:  # decord has no wheels for some platforms; PyAV covers them.
    decord = None

Backend = Literal["auto", "decord", "pyav"]

# Two frames closer than this (seconds) count as the same instant: absorbs pts
# rounding in containers with coarse time bases.
_TIME_EPS = 1e-6


class VideoDecodeError(ValueError):
    """A video could not be read; the message names the path and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode video {path!r}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Video:
    """Decoded frames of one video (or clip).

    frames: [T, H, W, 3] uint8 RGB.
    timestamps: [T] float64 seconds of each returned frame, relative to the first
      frame of the file (clips keep file time, not clip time).
    duration: seconds covered by the whole file's frames.
    fps: the sampling rate asked for (None when every frame was returned); the true
      spacing is ``np.diff(timestamps)``.
    backend: which decoder produced the frames ("decord" or "pyav").
    """

    frames: np.ndarray
    timestamps: np.ndarray
    duration: float
    fps: float | None
    backend: str


@dataclasses.dataclass(frozen=True)
class _Probe:
    """What PyAV learns from the headers and packets, without decoding."""

    pts: np.ndarray  # [N] int, sorted presentation timestamps in time_base units.
    time_base: float
    duration: float


def _probe(path: str) -> _Probe:
    """Opens the container and lists the video packets' pts (presentation order)."""
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file does not exist")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            if stream.time_base is None:
                raise VideoDecodeError(path, "video stream has no time base")
            pts = [packet.pts for packet in container.demux(stream) if packet.pts is not None and packet.size > 0]
            rate = stream.average_rate or stream.guessed_rate
            time_base = float(stream.time_base)
            declared = float(stream.duration * stream.time_base) if stream.duration else None
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    if not pts:
        raise VideoDecodeError(path, "no video frames")
    pts = np.unique(np.asarray(pts, np.int64))
    # The last frame lasts one frame period; the median spacing is robust to VFR gaps.
    if len(pts) > 1:
        frame_period = float(np.median(np.diff(pts))) * time_base
    else:
        frame_period = 1.0 / float(rate) if rate else 0.0
    duration = float(pts[-1] - pts[0]) * time_base + frame_period
    if declared is not None and declared - duration > max(1.0, 0.1 * declared):
        # A file cut after a leading index (faststart): the header promises frames the file no longer
        # holds, and its timestamps would be read as a shorter video.
        raise VideoDecodeError(
            path, f"truncated: its frames cover {duration:.2f} s of the {declared:.2f} s its video stream declares"
        )
    return _Probe(pts=pts, time_base=time_base, duration=duration)


def sample_indices(
    times: np.ndarray,
    *,
    fps: float | None,
    clip: tuple[float, float] | None = None,
    max_frames: int | None = None,
    even_frames: bool = False,
) -> np.ndarray:
    """Chooses which frames to decode.

    times: [N] sorted seconds of every frame. Targets are ``start + k / fps``; each takes
    the frame nearest in time (ties to the earlier one), duplicates are dropped (asking
    for more than the native rate returns each frame once). ``max_frames`` then keeps a
    uniform subset. ``even_frames`` drops the last frame of an odd count (a single frame
    is repeated instead) because Qwen2.5-VL merges frames in pairs.
    """
    start, end = (0.0, float("inf")) if clip is None else clip
    if end < start:
        raise ValueError(f"clip end {end} is before its start {start}")
    inside = np.nonzero((times >= start - _TIME_EPS) & (times <= end + _TIME_EPS))[0]
    if inside.size == 0:
        # A clip between two frames still gets the nearest frame rather than nothing.
        inside = np.array([int(np.argmin(np.abs(times - start)))])
    if fps is None:
        chosen = inside
    else:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        local = times[inside]
        # The grid is anchored at the clip start and runs to the clip end (or the last
        # frame); targets past the last frame fall on it and are deduplicated.
        first, last = max(start, 0.0), min(end, times[-1])
        targets = first + np.arange(int(np.floor((last - first) * fps + _TIME_EPS)) + 1) / fps
        # Nearest neighbour via the insertion point and its left neighbour.
        right = np.clip(np.searchsorted(local, targets), 0, len(local) - 1)
        left = np.clip(right - 1, 0, len(local) - 1)
        take_left = np.abs(local[left] - targets) <= np.abs(local[right] - targets)
        nearest = np.where(take_left, left, right)
        chosen = inside[np.unique(nearest)]
    if max_frames is not None and len(chosen) > max_frames:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        keep = np.round(np.linspace(0, len(chosen) - 1, max_frames)).astype(int)
        chosen = chosen[keep]
    if even_frames and len(chosen) % 2:
        chosen = chosen[:-1] if len(chosen) > 1 else np.repeat(chosen, 2)
    return chosen


def _decode_decord(path: str, indices: np.ndarray, num_frames: int) -> np.ndarray:
    reader = decord.VideoReader(path, num_threads=1)
    if len(reader) != num_frames:
        # decord indexes frames from the container's tables; when they disagree with
        # the packets actually present, the file is damaged and decord may hang.
        raise RuntimeError(f"decord sees {len(reader)} frames, the container has {num_frames}")
    # get_batch wants unique indices in any order; repeats (even_frames) are re-expanded.
    unique, inverse = np.unique(indices, return_inverse=True)
    frames = reader.get_batch(unique.tolist()).asnumpy()
    return frames[inverse]


def _decode_pyav(path: str, probe: _Probe, indices: np.ndarray) -> np.ndarray:
    wanted = {int(p): i for i, p in enumerate(probe.pts[np.unique(indices)])}
    last_wanted = max(wanted)
    decoded: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            first = int(probe.pts[int(indices.min())])
            if first > probe.pts[0]:
                # Seek lands on the keyframe at or before `first`; decoding runs on from there.
                container.seek(first, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                if frame.pts in wanted:
                    decoded[frame.pts] = frame.to_ndarray(format="rgb24")
                if frame.pts >= last_wanted:
                    break
    except (av.FFmpegError, OSError) as e:
        if len(decoded) < len(wanted):
            raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    missing = len(wanted) - len(decoded)
    if missing:
        raise VideoDecodeError(path, f"{missing} of {len(wanted)} frames could not be decoded")
    return np.stack([decoded[int(probe.pts[i])] for i in indices])


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames
    # Bicubic, as the Qwen2-VL processor resizes frames.
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)) for f in frames])


def _target_size(
    frames: np.ndarray,
    size: tuple[int, int] | None,
    min_pixels: int | None,
    max_pixels: int | None,
    total_pixels: int | None,
) -> tuple[int, int] | None:
    if size is not None:
        return size
    if min_pixels is None and max_pixels is None and total_pixels is None:
        return None
    height, width = frames.shape[1:3]
    max_pixels = 768 * 28 * 28 if max_pixels is None else max_pixels
    min_pixels = min(128 * 28 * 28, max_pixels) if min_pixels is None else min_pixels
    if total_pixels is not None:
        max_pixels = resize.video_max_pixels(len(frames), total_pixels, min_pixels=min_pixels, max_pixels=max_pixels)
    return resize.smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)


def read_video(
    path: str | os.PathLike[str],
    fps: float | None = 1.0,
    max_frames: int | None = None,
    *,
    clip: tuple[float, float] | None = None,
    even_frames: bool = False,
    size: tuple[int, int] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int | None = None,
    backend: Backend = "auto",
) -> Video:
    """Decodes frames sampled at ``fps`` (None: every frame) with their true timestamps.

    Args:
      path: video file.
      fps: sampling rate in frames per second; see ``sample_indices`` for the rule.
      max_frames: keep at most this many frames, uniformly spread.
      clip: ``(start, end)`` seconds; only frames inside are returned.
      even_frames: return an even number of frames (Qwen2.5-VL frame pairs).
      size: ``(height, width)`` to resize to. Exclusive with the pixel budget.
      min_pixels, max_pixels: Qwen2-VL per-frame pixel budget; sides become multiples
        of 28 (defaults when only one is given: 128*28*28 and 768*28*28).
      total_pixels: whole-video budget shared by all frames (Qwen2.5-VL), which lowers
        the per-frame ``max_pixels`` for long videos.
      backend: "auto" (decord, PyAV if decord is missing or fails), "decord", "pyav".

    Raises:
      VideoDecodeError: the file is missing, empty, truncated or undecodable.
    """
    path = os.fspath(path)
    if size is not None and (min_pixels or max_pixels or total_pixels):
        raise ValueError("pass either size or a pixel budget, not both")
    probe = _probe(path)
    times = (probe.pts - probe.pts[0]) * probe.time_base
    indices = sample_indices(times, fps=fps, clip=clip, max_frames=max_frames, even_frames=even_frames)
    frames, used = None, "pyav"
    if backend in ("auto", "decord"):
        if decord is None:
            if backend == "decord":
                raise ImportError("backend='decord' asked for but decord is not installed")
        else:
            try:
                frames, used = _decode_decord(path, indices, len(probe.pts)), "decord"
            except Exception as e:  # pylint: disable=broad-except
                # decord raises bare RuntimeError/DECORDError; any of them means "try PyAV".
                if backend == "decord":
                    raise VideoDecodeError(path, f"decord: {e}") from e
                logging.info("decord failed on %s (%s); decoding with PyAV", path, e)
    if frames is None:
        frames = _decode_pyav(path, probe, indices)
    target = _target_size(frames, size, min_pixels, max_pixels, total_pixels)
    if target is not None:
        frames = _resize(frames, *target)
    return Video(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        timestamps=times[indices].astype(np.float64),
        duration=probe.duration,
        fps=fps,
        backend=used,
    )


def probe_duration(path: str | os.PathLike[str]) -> float:
    """Duration in seconds from the container's packets (no decoding)."""
    return _probe(os.fspath(path)).duration
