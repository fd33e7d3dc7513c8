"""Parsers from the public grounding annotation formats to ``Sample``.

Formats (``load_annotations(format=...)``):
  charades_sta: ``vid start end##sentence`` lines (Gao et al. 2017). Durations from the
    Charades csv (``id,...,length``) passed as ``durations=``, else probed from the
    video file.
  activitynet: ActivityNet Captions JSON ``{vid: {duration, timestamps, sentences}}``;
    one sample per sentence.
  qvhighlights: JSONL ``{qid, query, vid, duration, relevant_windows}``; all windows of
    a query in one sample (test files have no windows: the sample has none).
  et_instruct: E.T.Instruct 164K JSON list ``{task, source, video, duration, src, tgt,
    conversations}``. ``tgt`` is the flat list of timestamps in the answer: pairs
    ``[s1, e1, s2, e2, ...]`` become windows; an odd count (single timestamps, e.g.
    highlight points) becomes point windows ``(t, t)``. The first human turn (minus
    ``<image>``/``<video>`` tags) is the query, the first gpt turn the response.
  jsonl: the generic format, one object per line::

      {"video": "a.mp4", "duration": 30.0, "query": "...", "windows": [[s, e], ...],
       "captions": ["...", ...], "verbs": ["...", ...], "id": "...", "task": "..."}

    ``id``, ``captions``, ``verbs`` and ``task`` are optional; ``video`` is relative
    to ``video_root`` unless absolute.

Video paths must resolve inside ``video_root`` (no ``../`` or absolute path leaving it, so an
annotation file cannot point a run at arbitrary files) unless ``allow_outside_video_root``;
a sample whose video leaves it is rejected as ``video_outside_root``.

Every sample goes through ``sample.validate``; what was fixed or rejected is in the
returned ``Annotations.report`` (and logged once).
"""

import csv
import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterator, Literal

from jaxgrounding.data import sample as sample_lib
from jaxgrounding.data import video as video_lib

Sample = sample_lib.Sample
Format = Literal["charades_sta", "activitynet", "qvhighlights", "et_instruct", "jsonl"]
OnBadLine = Literal["raise", "skip"]

# ActivityNet and E.T. videos come as mp4, mkv or webm depending on the download.
_VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
_MEDIA_TAG = re.compile(r"<(image|video)>\s*")


@dataclasses.dataclass(frozen=True)
class Annotations:
    """samples: the valid samples, file order. report: what was fixed or rejected."""

    samples: list[Sample]
    report: sample_lib.LoadReport


def resolve_video(video_root: str | None, name: str) -> str:
    """Path of a video given its id or relative name; tries the usual extensions."""
    path = name if video_root is None else os.path.join(video_root, name)
    if os.path.splitext(name)[1].lower() in _VIDEO_EXTENSIONS:
        return path
    for ext in _VIDEO_EXTENSIONS:
        if os.path.exists(path + ext):
            return path + ext
    # Missing files are reported by the pipeline (skipped and counted), not here.
    return path + ".mp4"


def _charades_durations(path: str) -> dict[str, float]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["id"]: float(row["length"]) for row in csv.DictReader(f)}


# Each parser yields (where, sample-or-exception). Exceptions are parse failures of one
# line or entry, raised or counted by load_annotations according to `on_bad_line`.
Parsed = Iterator[tuple[str, Sample | Exception]]


def _lines(path: str) -> Iterator[tuple[str, str | UnicodeDecodeError]]:
    """(where, text) of each non-blank line; a line that is not UTF-8 comes as its decode error, so
    the bad-line policy names it by file and line like any other unparsable line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", e
                continue
            if line.strip():
                yield f"{path}:{lineno}", line


def _parse_charades(path: str, video_root: str | None, durations: str | dict[str, float] | None) -> Parsed:
    lengths = _charades_durations(durations) if isinstance(durations, str) else durations
    for where, line in _lines(path):
        lineno = int(where.rsplit(":", 1)[1])
        if isinstance(line, Exception):
            yield where, line
            continue
        try:
            head, sentence = line.rstrip("\n").split("##", 1)
            vid, start, end = head.split()
            start, end = float(start), float(end)
        except ValueError as e:
            yield where, e
            continue
        video = resolve_video(video_root, vid)
        if lengths is not None:
            duration = lengths.get(vid, 0.0)
        else:
            try:
                duration = video_lib.probe_duration(video)
            except video_lib.VideoDecodeError:
                duration = 0.0  # Rejected as bad_duration by validation, and counted.
        yield where, Sample(
            id=f"{vid}:{lineno}",
            video=video,
            duration=duration,
            query=sentence,
            windows=((start, end),),
        )


def _load_json(path: str) -> Any:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise sample_lib.AnnotationError(f"{path}:{line}: not UTF-8 (byte {e.start}: {e.reason})") from e
    except json.JSONDecodeError as e:
        raise sample_lib.AnnotationError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def _parse_activitynet(path: str, video_root: str | None, durations: Any) -> Parsed:
    del durations  # The JSON carries them.
    for vid, entry in _load_json(path).items():
        where = f"{path}:{vid}"
        try:
            duration = float(entry["duration"])
            pairs = list(zip(entry["timestamps"], entry["sentences"], strict=True))
        except (KeyError, TypeError, ValueError) as e:
            yield where, e
            continue
        video = resolve_video(video_root, vid)
        for k, ((start, end), sentence) in enumerate(pairs):
            yield f"{where}[{k}]", Sample(
                id=f"{vid}:{k}",
                video=video,
                duration=duration,
                query=sentence,
                windows=((float(start), float(end)),),
            )


def _json_lines(path: str) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    for where, line in _lines(path):
        if isinstance(line, Exception):
            yield where, line
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, e


def _parse_qvhighlights(path: str, video_root: str | None, durations: Any) -> Parsed:
    del durations
    for where, entry in _json_lines(path):
        if isinstance(entry, Exception):
            yield where, entry
            continue
        try:
            windows = tuple((float(s), float(e)) for s, e in entry.get("relevant_windows", ()))
            yield where, Sample(
                id=str(entry["qid"]),
                video=resolve_video(video_root, entry["vid"]),
                duration=float(entry["duration"]),
                query=entry["query"],
                windows=windows,
            )
        except (KeyError, TypeError, ValueError) as e:
            yield where, e


def _turn(conversations: list[dict[str, str]], speaker: str) -> str | None:
    for turn in conversations:
        if turn.get("from") == speaker:
            return turn.get("value", "")
    return None


def _parse_et_instruct(path: str, video_root: str | None, durations: Any) -> Parsed:
    del durations
    entries = _load_json(path)
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        try:
            stamps = [float(t) for t in entry.get("tgt") or ()]
            if len(stamps) % 2 == 0:
                windows = tuple(zip(stamps[0::2], stamps[1::2]))
            else:
                windows = tuple((t, t) for t in stamps)
            conversations = entry["conversations"]
            query = _MEDIA_TAG.sub("", _turn(conversations, "human") or "")
            yield where, Sample(
                id=f"{entry.get('task', 'et')}:{entry['video']}:{index}",
                video=resolve_video(video_root, entry["video"]),
                duration=float(entry["duration"]),
                query=query,
                windows=windows,
                task=entry.get("task", "grounding"),
                response=_turn(conversations, "gpt"),
            )
        except (KeyError, TypeError, ValueError) as e:
            yield where, e


def _parse_jsonl(path: str, video_root: str | None, durations: Any) -> Parsed:
    del durations
    name = os.path.splitext(os.path.basename(path))[0]
    for where, entry in _json_lines(path):
        if isinstance(entry, Exception):
            yield where, entry
            continue
        try:
            captions, verbs = entry.get("captions"), entry.get("verbs")
            yield where, Sample(
                id=str(entry.get("id", f"{name}:{where.rsplit(':', 1)[1]}")),
                video=resolve_video(video_root, entry["video"]),
                duration=float(entry["duration"]),
                query=entry["query"],
                windows=tuple((float(s), float(e)) for s, e in entry.get("windows", ())),
                captions=None if captions is None else tuple(captions),
                verbs=None if verbs is None else tuple(verbs),
                task=entry.get("task", "grounding"),
            )
        except (KeyError, TypeError, ValueError) as e:
            yield where, e


_PARSERS: dict[str, Callable[[str, str | None, Any], Parsed]] = {
    "charades_sta": _parse_charades,
    "activitynet": _parse_activitynet,
    "qvhighlights": _parse_qvhighlights,
    "et_instruct": _parse_et_instruct,
    "jsonl": _parse_jsonl,
}
FORMATS = tuple(_PARSERS)


def load_annotations(
    path: str | os.PathLike[str],
    format: Format,  # pylint: disable=redefined-builtin
    *,
    video_root: str | os.PathLike[str] | None = None,
    durations: str | dict[str, float] | None = None,
    on_bad_line: OnBadLine = "raise",
    validation: sample_lib.Validation = sample_lib.Validation(),
    allow_outside_video_root: bool = False,
) -> Annotations:
    """Parses and validates one annotation file.

    Args:
      path: annotation file.
      format: one of ``FORMATS`` (see the module docstring).
      video_root: directory the video names are relative to.
      durations: Charades-STA only: the Charades csv path or ``{vid: seconds}``.
      on_bad_line: "raise" an ``AnnotationError`` naming file and line, or "skip" it
        and count it as ``rejected["unparsable_line"]``.
      validation: switches for window repair (see ``sample.Validation``).
      allow_outside_video_root: accept videos outside ``video_root`` (absolute paths, ``../``).

    Returns:
      ``Annotations(samples, report)``; the report is also logged when non-empty.
    """
    if format not in _PARSERS:
        raise ValueError(f"unknown annotation format {format!r}; known: {FORMATS}")
    path = os.fspath(path)
    root = None if video_root is None else os.fspath(video_root)
    real_root = None if root is None or allow_outside_video_root else os.path.realpath(root)
    report = sample_lib.LoadReport()
    samples = []
    for where, parsed in _PARSERS[format](path, root, durations):
        if isinstance(parsed, Exception):
            if on_bad_line == "raise":
                raise sample_lib.AnnotationError(
                    f"{where}: cannot parse ({type(parsed).__name__}: {parsed})"
                ) from parsed
            report.reject("unparsable_line", where)
            continue
        valid = sample_lib.validate(parsed, report, where, validation)
        if valid is None:
            continue
        if real_root is not None and os.path.commonpath([real_root, os.path.realpath(valid.video)]) != real_root:
            report.reject("video_outside_root", where)
            continue
        samples.append(valid)
    report.num_samples = len(samples)
    report.log(f"{path} ({format})")
    return Annotations(samples=samples, report=report)
