"""Time-R1's text answer for temporal grounding: the prompt, the target completion and the parser.

Time-R1 (Wang et al. 2025) has the model write its answer as text: optional reasoning inside
`<think> </think>` (which may name time ranges "xx.xx to xx.xx"), then `<answer>start to end</answer>`
in seconds with two decimals, e.g. "12.54 to 17.83". The query text comes before the video in the
user turn (the chat encoder places the video; this module writes the text only).

Prompts: `grounding_prompt(query, thinking=...)` writes one of a few phrasings of the task (the first is
the evaluation one; `phrasing_index` picks one per example for training) followed by the answer-format
instruction, with or without the request to reason first. The wording is ours, not Time-R1's: a model
trained with Time-R1's exact prompt should be evaluated with it.

Parsing (`parse_answer`) follows Time-R1's training reward: the last `<answer>` block, and in it the
last "number to number" (or "number and number"). Anything else gives None, never an exception: no
block, no such pair, a number glued to a letter or a sign ("1e999 to 5", "-3 to 5"), a value above
`MAX_SECONDS`, and a reversed pair (start > end). Time-R1's IoU of a reversed pair is 0 (its
intersection is negative), the same as an unparsable answer, so None loses nothing against the
reference; sorting it instead would reward an answer the prompt rules out and would let evaluation
count windows that a user reading the text could not use. Every window returned therefore has
0 <= start <= end <= MAX_SECONDS.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

# Times above this (about 11.6 days) are not answers about a video; float("9" * 400) is even inf.
MAX_SECONDS = 1e6

# The task, in a few phrasings; "{query}" is the query without its final full stop.
PHRASINGS = (
    'Locate the event "{query}" in the video and determine exactly when it starts and when it ends.',
    'When does the event "{query}" take place in the video? Find its precise start and end.',
    'Watch the video and pin down the time span of the event "{query}".',
    'Find the segment of the video in which "{query}" happens, as precisely as you can.',
    'In this video, when does "{query}" happen? Determine the start and the end of the event.',
)
# The answer format, asked for directly or after reasoning.
_ANSWER_FORMAT = (
    'the start and end times in seconds, with two decimal places, in the form "start time to end time" '
    'within the <answer> </answer> tags, for example "12.54 to 17.83".'
)
_ANSWER_ONLY = "Give " + _ANSWER_FORMAT
_THINK_FIRST = (
    "First reason about the video within the <think> </think> tags, where you may name time ranges as "
    '"xx.xx to xx.xx". Then give ' + _ANSWER_FORMAT
)

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A bare decimal on each side: not glued to a letter, digit, point or sign ("1e999", "-3", "v2 to 3").
_NUMBER = r"\d+(?:\.\d+)?"
_RANGE = re.compile(rf"(?<![\w.+\-])({_NUMBER})\s+(?:to|and)\s+({_NUMBER})(?![\w]|\.\d)", re.IGNORECASE)


def grounding_prompt(query: str, *, thinking: bool, phrasing: int = 0) -> str:
    """The user-turn text for grounding `query`: phrasing `phrasing` (0 for evaluation), then the answer
    format; with `thinking` the model is asked to reason in `<think> </think>` before answering."""
    body = " ".join(query.split()).rstrip(" .")
    if not body:
        raise ValueError(f"empty query: {query!r}")
    task = PHRASINGS[phrasing].format(query=body)
    return f"{task}\n\n{_THINK_FIRST if thinking else _ANSWER_ONLY}"


def phrasing_index(seed: int, index: int) -> int:
    """A phrasing for one training example, uniform over `PHRASINGS` and a function of (seed, index) only
    (index: a step, or a stable per-example number such as `zlib.crc32(sample_id)`), so a resumed run
    writes the same prompts."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return int(np.random.default_rng([seed, index]).integers(len(PHRASINGS)))


def format_answer(window: Sequence[float], *, thinking: str | None) -> str:
    """A target completion for a supervised warm start: `<answer>12.54 to 17.83</answer>`, preceded by
    `<think>{thinking}</think>` when `thinking` is the reasoning text to write (None: no reasoning).
    The answer parses back (`parse_answer`) to the window rounded to two decimals."""
    if thinking is not None and not isinstance(thinking, str):
        raise TypeError(f"thinking is the reasoning text or None, got {thinking!r}")
    start, end = float(window[0]), float(window[1])
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start <= end <= MAX_SECONDS):
        raise ValueError(f"not a window: {window!r}")
    answer = f"<answer>{start:.2f} to {end:.2f}</answer>"
    return answer if thinking is None else f"<think>{thinking}</think>\n{answer}"


def _window(match: re.Match | None) -> tuple[float, float] | None:
    if match is None:
        return None
    start, end = float(match.group(1)), float(match.group(2))
    if not (0 <= start <= end <= MAX_SECONDS):  # also rejects inf from a very long digit string
        return None
    return start, end


def _last_range(text: str) -> re.Match | None:
    last = None
    for last in _RANGE.finditer(text):
        pass
    return last


def parse_answer(text: str) -> tuple[float, float] | None:
    """(start, end) seconds from the last `<answer>` block's last "a to b" (Time-R1's training reward), or
    None (see the module docstring for what counts)."""
    blocks = _ANSWER_BLOCK.findall(text)
    return _window(_last_range(blocks[-1])) if blocks else None


def parse_answer_anywhere(text: str) -> tuple[float, float] | None:
    """The lenient reading of Time-R1's evaluation: the last "a to b" anywhere in the text, tags or not
    (so a model that drops the tags still gets its answer read); same validity rules as `parse_answer`."""
    return _window(_last_range(text))
