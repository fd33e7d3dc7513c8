"""The annotation record every source is parsed into, and its validation rules.

A ``Sample`` is one query on one video with its ground-truth windows in seconds.
Validation follows the sanitising of the MeCo reference (windows clamped to the video,
reversed windows swapped) and counts every fix or rejection in a ``LoadReport`` so a
dataset's quirks are visible rather than silently absorbed.
"""

import collections
import dataclasses
import logging
import math

Window = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One grounding example.

    id: stable string, unique within a dataset (derived from the source's own ids).
    video: path of the video file.
    duration: video length in seconds (> 0).
    query: the text to ground (for instruction data, the user's instruction).
    windows: ground-truth ``(start, end)`` seconds, ``0 <= start <= end <= duration``,
      in the source's order. Empty for unlabelled (test) annotations.
    captions: query-focused captions, one per window, when the source has them.
    verbs: the event's verbs (lemmas), when known; used by the inversion tasks.
    task: "grounding" or the source's own task name (E.T.Instruct: "tvg", "dvc", ...).
    response: the reference answer text, when the source stores one (E.T.Instruct).
    """

    id: str
    video: str
    duration: float
    query: str
    windows: tuple[Window, ...] = ()
    captions: tuple[str, ...] | None = None
    verbs: tuple[str, ...] | None = None
    task: str = "grounding"
    response: str | None = None


class AnnotationError(ValueError):
    """An annotation line does not parse; names the file and line."""


@dataclasses.dataclass
class LoadReport:
    """What loading changed or dropped.

    fixed: count per kind of repair ("clipped_window", "swapped_window").
    rejected: count per reason a sample was dropped ("empty_query", "bad_duration",
      "non_finite_window", "reversed_window", "window_outside_video", "unparsable_line",
      "video_outside_root", ...).
    examples: up to a few ``(reason, where)`` per reason, for the log.
    """

    fixed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    num_samples: int = 0

    def fix(self, kind: str, where: str) -> None:
        self.fixed[kind] += 1
        self._remember(kind, where)

    def reject(self, reason: str, where: str) -> None:
        self.rejected[reason] += 1
        self._remember(reason, where)

    def _remember(self, kind: str, where: str) -> None:
        seen = self.examples.setdefault(kind, [])
        if len(seen) < 5:
            seen.append(where)

    def log(self, name: str) -> None:
        if self.fixed or self.rejected:
            logging.warning(
                "%s: %d samples kept; fixed %s; rejected %s; e.g. %s",
                name,
                self.num_samples,
                dict(self.fixed),
                dict(self.rejected),
                self.examples,
            )


@dataclasses.dataclass(frozen=True)
class Validation:
    """Switches for ``validate``.

    swap_reversed: swap ``start > end`` windows (True) or reject the sample (False).
    min_window: windows shorter than this after clipping (seconds) are widened around
      their centre to this length, inside the video; 0 keeps point windows.
    """

    swap_reversed: bool = True
    min_window: float = 0.0


def validate(sample: Sample, report: LoadReport, where: str, rules: Validation = Validation()) -> Sample | None:
    """Returns the sample with repaired windows, or None (counted) when unusable."""
    if not sample.query or not sample.query.strip():
        report.reject("empty_query", where)
        return None
    duration = sample.duration
    if not duration or duration <= 0 or not math.isfinite(duration):
        report.reject("bad_duration", where)
        return None
    windows = []
    for start, end in sample.windows:
        if not (math.isfinite(start) and math.isfinite(end)):
            # A NaN passes every comparison below and would land the target on frame 0.
            report.reject("non_finite_window", where)
            return None
        if start > end:
            if not rules.swap_reversed:
                report.reject("reversed_window", where)
                return None
            start, end = end, start
            report.fix("swapped_window", where)
        clipped = (min(max(start, 0.0), duration), min(max(end, 0.0), duration))
        if clipped[1] - clipped[0] <= 0 < end - start:
            # Clipping ate the whole window: it lies outside the video, the label is wrong.
            report.reject("window_outside_video", where)
            return None
        if clipped != (start, end):
            report.fix("clipped_window", where)
        if clipped[1] - clipped[0] < rules.min_window:
            centre = (clipped[0] + clipped[1]) / 2
            half = min(rules.min_window, duration) / 2
            centre = min(max(centre, half), duration - half)
            clipped = (centre - half, centre + half)
            report.fix("widened_window", where)
        windows.append((float(clipped[0]), float(clipped[1])))
    if sample.captions is not None and len(sample.captions) != len(windows):
        report.reject("captions_windows_mismatch", where)
        return None
    return dataclasses.replace(
        sample,
        query=sample.query.strip(),
        duration=float(duration),
        windows=tuple(windows),
    )
