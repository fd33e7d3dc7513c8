"""MeCo's structural tokens: training targets from ground-truth windows, and windows from generated tokens.

MeCo (Pang et al., "Measure twice, cut once", sec. 3.2-3.5 and appendix E) has the video LLM answer
with a temporally ordered sequence of event tokens `<ent>` and transition tokens `<tst>`; every
`<ent>` is preceded by a query-focused caption (QFC, sec. 3.3, eq. 2). This module holds the three
pure-numpy pieces around that format:

- `structural_response`: the target text and one `StructuralToken` (kind + window in seconds) per
  structural token, following the reference's data rules (docs REFERENCE.md, "MeCo"): a leading
  `<tst>` when the first event starts at >= 1 s, a `<tst>` between events separated by >= 2 s, a
  trailing `<tst>` when the last event ends >= 2 s before the end; transition windows share their
  boundary frames with the neighbouring events.
- `token_frame_targets`: the per-token target distribution over frames for L_ST (eq. 4: uniform
  over the token's window frames, cross-entropy against the softmax over time of eq. 5).
- `assign_windows`: inference (appendix E, Algorithm 1, plus the reference evaluation code):
  softmax over time, each frame to its most probable token, runs of an `<ent>` token's frames become
  windows, which are thresholded, dilated, scored and suppressed by greedy NMS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# The literal token strings; they must match `jaxgrounding.model.tokenizer.STRUCTURAL_TOKENS`
# (kept separate so that building targets does not import the tokenizer stack).
ENT, TST = "<ent>", "<tst>"

# Data rules of the reference, in seconds (at its 1 fps these are 1 and 2 frames).
LEADING_TRANSITION_MIN = 1.0  # a video that opens with >= 1 s of background gets a leading <tst>
TRANSITION_MIN_GAP = 2.0  # gaps between events, and after the last one, of >= 2 s get a <tst>

# Float slack for comparing window ends with frame boundaries: frame times built as k / fps are
# off by ~1e-16, which must not move a frame across a window boundary.
_TIME_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class StructuralToken:
    kind: str  # "ent" or "tst"
    window: tuple[float, float]  # seconds, the span this token stands for


@dataclasses.dataclass(frozen=True)
class GroundedWindow:
    start: float  # seconds
    end: float  # seconds
    score: float  # max softmax-over-time probability of the token over the window's frames
    token_index: int  # row of `similarity_kf` the window came from; -1 for the whole-video fallback


def _sanitize_window(window: Sequence[float], duration: float, min_length: float) -> tuple[float, float]:
    start, end = float(window[0]), float(window[1])
    if start > end:
        start, end = end, start
    start, end = min(max(start, 0.0), duration), min(max(end, 0.0), duration)
    if end - start < min_length:
        # Widen around the centre, shifted to stay inside the video (as `data.sample.validate` does),
        # so that a point annotation still covers at least one frame.
        half = min(min_length, duration) / 2
        centre = min(max((start + end) / 2, half), duration - half)
        start, end = centre - half, centre + half
    return start, end


def sanitize_windows(
    windows: Sequence[Sequence[float]], duration: float, min_length: float
) -> list[tuple[float, float]]:
    """Windows clamped to [0, duration], reversed ones swapped, widened to >= `min_length` s, sorted by start.

    Widening is symmetric around the window's centre and shifted back inside the video; a video
    shorter than `min_length` gives [0, duration].
    """
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    return sorted(_sanitize_window(w, duration, min_length) for w in windows)


def structural_response(
    windows: Sequence[Sequence[float]],
    captions: Sequence[str | None] | None,
    duration: float,
    *,
    min_length: float = 1.0,
) -> tuple[str, list[StructuralToken]]:
    """MeCo's target answer for ground-truth `windows` (seconds) with their query-focused `captions`.

    Returns the text, e.g. one event mid-video `"<tst>\\n{caption}<ent>\\n<tst>"`, and the
    structural tokens in text order with the window each stands for. A newline follows every
    structural token that is not the last thing in the text. `captions` is None for an answer of
    bare tokens. Captions travel with their windows when sanitising reorders them.

    Overlapping events are handled with the running end of the events so far: the gap before the
    next event and the trailing transition start there, so a transition never lies inside an event
    (for disjoint windows this is exactly "the previous / last window's end").
    """
    if len(windows) == 0:
        raise ValueError("a structural response needs at least one event window")
    if captions is None:
        captions = [None] * len(windows)
    if len(captions) != len(windows):
        raise ValueError(f"{len(captions)} captions for {len(windows)} windows")
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    # Sorted by window only (a stable sort), so captions never decide the order of equal windows.
    events = sorted(
        ((_sanitize_window(w, duration, min_length), (c or "").strip()) for w, c in zip(windows, captions)),
        key=lambda event: event[0],
    )

    pieces: list[str] = []  # caption text and token strings, in order
    tokens: list[StructuralToken] = []

    def emit(kind: str, window: tuple[float, float], caption: str = "") -> None:
        pieces.append(caption + (ENT if kind == "ent" else TST))
        tokens.append(StructuralToken(kind=kind, window=window))

    first_start = events[0][0][0]
    if first_start >= LEADING_TRANSITION_MIN:
        emit("tst", (0.0, first_start))
    covered_until = None  # running max end of the events emitted so far
    for (start, end), caption in events:
        if covered_until is not None and start - covered_until >= TRANSITION_MIN_GAP:
            emit("tst", (covered_until, start))
        emit("ent", (start, end), caption)
        covered_until = end if covered_until is None else max(covered_until, end)
    if covered_until <= duration - TRANSITION_MIN_GAP:
        emit("tst", (covered_until, float(duration)))
    return "\n".join(pieces), tokens


def token_frame_targets(
    tokens: Sequence[StructuralToken], frame_times: np.ndarray, frame_duration: float
) -> np.ndarray:
    """L_ST targets: [K, F] float32, row k uniform over the frames overlapping token k's window.

    frame_times: [F] start (s) of each frame; frame f covers [frame_times[f], frame_times[f] +
    frame_duration). A frame counts when that span meets the closed window [start, end], so a
    window [1, 3] at 1 fps takes frames 1, 2, 3 (eq. 4 sums t = t_s .. t_e inclusive) and a
    transition shares its boundary frame with the neighbouring event. A window that meets no
    frame (frames sampled sparser than they last) puts all mass on the nearest frame, ties to
    the earlier one. Rows sum to 1.
    """
    frame_times = np.asarray(frame_times, dtype=np.float64)
    if frame_times.ndim != 1 or frame_times.size == 0:
        raise ValueError(f"frame_times must be a non-empty [F] array, got shape {frame_times.shape}")
    if not frame_duration > 0:
        raise ValueError(f"frame_duration must be > 0, got {frame_duration}")
    frame_ends = frame_times + frame_duration
    targets_kf = np.zeros((len(tokens), frame_times.size), np.float32)
    for k, token in enumerate(tokens):
        start, end = token.window
        overlaps_f = (frame_times <= end + _TIME_EPS) & (frame_ends > start + _TIME_EPS)
        if not overlaps_f.any():
            # Distance between the frame's span and the window; 0 would have been an overlap.
            distance_f = np.maximum(np.maximum(frame_times - end, start - frame_ends), 0.0)
            overlaps_f = np.zeros_like(overlaps_f)
            overlaps_f[np.argmin(distance_f)] = True
        targets_kf[k, overlaps_f] = 1.0 / overlaps_f.sum()
    return targets_kf


def time_softmax(similarity_kf: np.ndarray) -> np.ndarray:
    """[K, F] each token's softmax over time (eq. 5), float64."""
    shifted_kf = np.asarray(similarity_kf, np.float64)
    shifted_kf = shifted_kf - shifted_kf.max(axis=1, keepdims=True)
    probs_kf = np.exp(shifted_kf)
    return probs_kf / probs_kf.sum(axis=1, keepdims=True)


def _tiou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of two windows: inter / (len_a + len_b - inter)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    if union <= 0:  # two points: identical or disjoint
        return float(a == b)
    return inter / union


def _runs(mask_f: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) frame index of every run of consecutive True frames."""
    frames = np.flatnonzero(mask_f)
    if frames.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(frames) > 1)
    firsts = np.concatenate([frames[:1], frames[breaks + 1]])
    lasts = np.concatenate([frames[breaks], frames[-1:]])
    return list(zip(firsts.tolist(), lasts.tolist()))


def assign_windows(
    similarity_kf: np.ndarray,
    kinds: Sequence[str],
    frame_times: np.ndarray,
    frame_duration: float,
    duration: float,
    *,
    threshold: float | None = 0.7,
    dilation: int = 1,
    nms_iou: float = 0.7,
    allowed: np.ndarray | None = None,
) -> list[GroundedWindow]:
    """Event windows (seconds) from the similarities of K generated structural tokens to F frames.

    similarity_kf: [K, F] logits (scaled cosine) of each generated structural token, in order,
    against every frame; kinds: [K] "ent" / "tst"; frame_times: [F] frame starts (s), ascending.

    Per `<ent>` token k, a frame is kept when
    - token k is its most probable token under the softmax over time (Algorithm 1's argmax over
      tokens; a tie keeps the frame for every tied token, as the reference's `>=` does), and
    - when `threshold` is not None, the token's similarity row min-max rescaled to [0, 1] exceeds
      `threshold` there (a constant row carries no evidence and keeps nothing).
    The kept frames are dilated by `dilation` frames on both sides (within the video) and then
    split into runs at gaps; dilating before splitting follows the reference code, so runs that
    are at most 2 * dilation frames apart merge. A run becomes [frame_times[first],
    frame_times[last] + frame_duration] clipped to [0, duration].

    Score of a window: the token's largest softmax-over-time probability over the run's frames
    (the reference's confidence). The rescaled similarity is 1 at every token's peak, so it
    cannot rank one token's windows against another's; the probability can.

    `allowed` ([F] bool, TimeScope's fine stage): only these frames can be kept. Probabilities
    and the rescaling still run over every frame, so a token whose mass lies outside the region
    (a leading `<tst>` before a reloaded event) does not have it renormalised onto the region's
    first frames, which masking the logits would do.

    Windows from all `<ent>` tokens are ranked by score (stable: token order, then time, on ties)
    and greedy NMS drops any with tIoU >= nms_iou against an already kept one. When nothing
    survives (no tokens, no `<ent>`, no kept frames) the answer is the whole video with score 0.
    """
    similarity_kf = np.asarray(similarity_kf, dtype=np.float64)
    frame_times = np.asarray(frame_times, dtype=np.float64)
    if frame_times.ndim != 1:
        raise ValueError(f"frame_times must be [F], got shape {frame_times.shape}")
    num_frames = frame_times.size
    if similarity_kf.size == 0 and len(kinds) == 0:
        similarity_kf = similarity_kf.reshape(0, num_frames)
    if similarity_kf.shape != (len(kinds), num_frames):
        raise ValueError(f"similarity_kf has shape {similarity_kf.shape}, want ({len(kinds)}, {num_frames})")
    if any(kind not in ("ent", "tst") for kind in kinds):
        raise ValueError(f"kinds must be 'ent' or 'tst', got {sorted(set(kinds))}")
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    fallback = [GroundedWindow(start=0.0, end=float(duration), score=0.0, token_index=-1)]
    if num_frames == 0 or "ent" not in kinds:
        return fallback

    probs_kf = time_softmax(similarity_kf)
    owned_kf = probs_kf >= probs_kf.max(axis=0, keepdims=True)
    if allowed is not None:
        allowed = np.asarray(allowed, bool)
        if allowed.shape != (num_frames,):
            raise ValueError(f"allowed has shape {allowed.shape}, want ({num_frames},)")
        owned_kf &= allowed[None]

    low_k1 = similarity_kf.min(axis=1, keepdims=True)
    span_k1 = similarity_kf.max(axis=1, keepdims=True) - low_k1
    rescaled_kf = np.where(span_k1 > 0, (similarity_kf - low_k1) / np.where(span_k1 > 0, span_k1, 1.0), 0.0)

    candidates: list[GroundedWindow] = []
    for k, kind in enumerate(kinds):
        if kind != "ent":
            continue
        keep_f = owned_kf[k]
        if threshold is not None:
            keep_f = keep_f & (rescaled_kf[k] > threshold)
        dilated_f = keep_f.copy()
        for step in range(1, dilation + 1):
            dilated_f[:-step] |= keep_f[step:]
            dilated_f[step:] |= keep_f[:-step]
        for first, last in _runs(dilated_f):
            start = min(max(frame_times[first], 0.0), duration)
            end = min(max(frame_times[last] + frame_duration, 0.0), duration)
            score = float(probs_kf[k, first : last + 1].max())
            candidates.append(GroundedWindow(start=float(start), end=float(end), score=score, token_index=k))

    candidates.sort(key=lambda window: -window.score)
    kept: list[GroundedWindow] = []
    for window in candidates:
        if all(_tiou((window.start, window.end), (other.start, other.end)) < nms_iou for other in kept):
            kept.append(window)
    return kept or fallback
