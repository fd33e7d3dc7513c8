"""Rewards of Time-R1 and Invert4TVG for text completions, registered by name.

A reward is a function `(text, sample, task, **options) -> float | None` of one completion, the grounding
`Sample` it answers and the task it was asked ("grounding" or an inversion task); None means "does not
apply to this task" (not 0), as TRL's GRPOTrainer lets a reward function answer, so tasks can share a
batch and a registry. `options` carries the run's settings (`thinking`, `distance_weighted`); a reward
ignores the ones it does not use. `register_reward` adds a user's own; `task_rewards` evaluates a list
of names on one completion.

The built-in rewards (all in [0, 1], finite on any text):

- "iou" (grounding): IoU of `timestamps.parse_answer` with the first ground-truth window, 0 when the
  answer does not parse (Time-R1, Invert4TVG eq. 8). With `distance_weighted` it is Time-R1's "iou_v2",
  IoU * (1 - |s - s'| / D) * (1 - |e - e'| / D); each factor is clamped at 0 here (the reference's goes
  negative, and the product positive again, for an end far past the video).
- "format": grounding with `thinking`: the whole output is `<think>...</think>` then
  `<answer>...</answer>` (whitespace between and around); grounding without `thinking` and the
  inversion tasks: the whole output is one `<answer>...</answer>` (Invert4TVG eq. 9). The blocks' contents
  may not contain these tags: the references' `.*?` also accepts repeated or nested blocks.
- "verb_completion" (eq. 5, as the reference code scores it): 1 when the truth verbs are a subset of the
  verbs of the first `<answer>` block; a truth with no verb rewards only an answer with no verb.
- "action_recognition" (eq. 6): 1 when the lemma of the answer's first word is a truth verb.
- "video_description" (eq. 7): 1 when every truth verb is a verb of the description.

Structural answers (MeCo's `<ent>`/`<tst>`, `answer.format = "structural"`), whose windows are not in the text
but come from the structural tokens' frame similarities (`inference`), which the caller passes as `windows`:

- "structural_iou" (grounding): IoU of the top-ranked window with the first ground-truth window, 0 when
  the answer yields no window (the caller passes only windows that a structural token chose, not
  `assign_windows`' whole-video fallback).
- "structural_format" (grounding): the whole output is MeCo's answer (`tasks.structural`): pieces joined
  by newlines, each a caption ended by `<ent>` or a bare `<tst>`, with at least one `<ent>`.

The three inversion rewards give 0 when the output has no `<answer>` block (the reference scores a
missing block as an empty answer, which earns 1 on a verb-free truth). Truth verbs:
`inversion.truth_verbs`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from jaxgrounding.data.sample import Sample
from jaxgrounding.tasks import inversion, structural, timestamps
from jaxgrounding.tasks import verbs as verbs_lib

RewardFn = Callable[..., "float | None"]
REWARDS: dict[str, RewardFn] = {}

# Invert4TVG's rewards: IoU + format for grounding, the task's reward + format for an inversion task.
DEFAULT_REWARDS = ("iou", "format", "verb_completion", "action_recognition", "video_description")
# GRPO on MeCo's structural answers (grounding only: the inversion tasks answer in text).
STRUCTURAL_REWARDS = ("structural_iou", "structural_format")

# A block's content: any text without an opening or closing think / answer tag.
_TAG_FREE = r"(?:(?!</?(?:think|answer)>).)*"
_THINK_THEN_ANSWER = re.compile(rf"<think>{_TAG_FREE}</think>\s*<answer>{_TAG_FREE}</answer>", re.DOTALL)
_ANSWER_ONLY = re.compile(rf"<answer>{_TAG_FREE}</answer>", re.DOTALL)
_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# One piece of a structural answer: a caption (no tags, no newline) ended by <ent>, or a bare <tst>.
_PIECE = rf"(?:[^<>\n]*{re.escape(structural.ENT)}|{re.escape(structural.TST)})"
_STRUCTURAL = re.compile(rf"{_PIECE}(?:\n{_PIECE})*")
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: registers `fn(text, sample, task, **options) -> float | None` under `name`."""

    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"a reward named {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return register


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise KeyError(f"no reward named {name!r}; registered: {', '.join(REWARDS)}")
    return REWARDS[name]


def task_rewards(
    text: str, sample: Sample, task: str, *, names: Sequence[str] = DEFAULT_REWARDS, **options
) -> dict[str, float]:
    """{name: value} of the rewards in `names` that apply to `task` (those answering None are left out)."""
    if task not in inversion.TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(inversion.TASKS)}")
    out = {}
    for name in names:
        value = get_reward(name)(text, sample, task, **options)
        if value is not None:
            out[name] = float(value)
    return out


def total_reward(text: str, sample: Sample, task: str, **kwargs) -> float:
    """The sum of the applicable rewards: IoU + format for grounding, the task's reward + format for an
    inversion task (Invert4TVG eq. 10-12)."""
    return sum(task_rewards(text, sample, task, **kwargs).values())


# --- The scores themselves, on plain arguments ----------------------------------------------------------------


def iou(pred: Sequence[float], window: Sequence[float]) -> float:
    """Temporal IoU of two (start, end) windows; 0 when the union is empty (two equal points)."""
    inter = max(0.0, min(pred[1], window[1]) - max(pred[0], window[0]))
    union = (pred[1] - pred[0]) + (window[1] - window[0]) - inter
    return inter / union if union > 0 else 0.0


def iou_reward(
    text: str, window: Sequence[float], duration: float | None = None, *, distance_weighted: bool = False
) -> float:
    """IoU of the parsed answer with `window`; 0 for an unparsable answer. `distance_weighted` (needs the
    video's `duration`) multiplies by Time-R1's boundary-distance factors, each clamped to [0, 1]."""
    pred = timestamps.parse_answer(text)
    if pred is None:
        return 0.0
    value = iou(pred, window)
    if distance_weighted:
        if duration is None or not duration > 0:
            raise ValueError(f"the distance-weighted IoU needs the video duration, got {duration}")
        for p, w in zip(pred, window):
            value *= min(max(1.0 - abs(p - w) / duration, 0.0), 1.0)
    return value if math.isfinite(value) else 0.0


def format_reward(text: str, task: str, *, thinking: bool = True) -> float:
    """1.0 when the whole output has the task's format (module docstring), else 0.0."""
    if task not in inversion.TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(inversion.TASKS)}")
    pattern = _THINK_THEN_ANSWER if task == "grounding" and thinking else _ANSWER_ONLY
    return 1.0 if pattern.fullmatch(text.strip()) else 0.0


def structural_format_reward(text: str) -> float:
    """1.0 when the whole output is a structural answer with at least one `<ent>` (module docstring)."""
    text = text.strip()
    return 1.0 if _STRUCTURAL.fullmatch(text) and structural.ENT in text else 0.0


def _first_answer(text: str) -> str | None:
    match = _FIRST_ANSWER.search(text)
    return None if match is None else match.group(1).strip()


def verb_completion_reward(text: str, truth_verbs: Sequence[str]) -> float:
    """1.0 when the truth verbs are all among the first answer's verbs (a verb-free truth: when the answer
    has no verb either)."""
    answer = _first_answer(text)
    if answer is None:
        return 0.0
    predicted, truth = set(verbs_lib.verb_lemmas(answer)), set(truth_verbs)
    return float(truth <= predicted if truth else not predicted)


def action_recognition_reward(text: str, truth_verbs: Sequence[str]) -> float:
    """1.0 when the lemma of the first answer's first word is one of the truth verbs."""
    answer = _first_answer(text)
    word = None if answer is None else _WORD.search(answer)
    return float(word is not None and verbs_lib.lemma(word.group()) in set(truth_verbs))


def video_description_reward(text: str, truth_verbs: Sequence[str]) -> float:
    """1.0 when every truth verb is a verb of the first answer (0 for a verb-free truth: nothing to find)."""
    answer, truth = _first_answer(text), set(truth_verbs)
    if answer is None or not truth:
        return 0.0
    return float(truth <= set(verbs_lib.verb_lemmas(answer)))


# --- Registered: the same on (text, sample, task) ------------------------------------------------------------


@register_reward("iou")
def _iou(text: str, sample: Sample, task: str, *, distance_weighted: bool = False, **_) -> float | None:
    if task != "grounding":
        return None
    return iou_reward(text, sample.windows[0], sample.duration, distance_weighted=distance_weighted)


@register_reward("format")
def _format(text: str, sample: Sample, task: str, *, thinking: bool = True, **_) -> float | None:
    del sample
    return format_reward(text, task, thinking=thinking)


def _inversion_reward(task: str, score: Callable[[str, Sequence[str]], float]) -> RewardFn:
    def reward(text: str, sample: Sample, asked: str, **_) -> float | None:
        return score(text, inversion.truth_verbs(sample)) if asked == task else None

    reward.__name__ = score.__name__
    return reward


register_reward("verb_completion")(_inversion_reward("verb_completion", verb_completion_reward))
register_reward("action_recognition")(_inversion_reward("action_recognition", action_recognition_reward))
register_reward("video_description")(_inversion_reward("video_description", video_description_reward))


@register_reward("structural_iou")
def _structural_iou(text: str, sample: Sample, task: str, *, windows=None, **_) -> float | None:
    """`windows`: the answer's ranked (start, end) windows, best first (`inference`'s frame assignment)."""
    del text
    if task != "grounding":
        return None
    if windows is None:
        raise ValueError("structural_iou needs the answer's windows (windows=...), read from its structural tokens")
    return iou(windows[0], sample.windows[0]) if len(windows) else 0.0


@register_reward("structural_format")
def _structural_format(text: str, sample: Sample, task: str, **_) -> float | None:
    del sample
    return structural_format_reward(text) if task == "grounding" else None
