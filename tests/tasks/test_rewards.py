"""Rewards: hand-computed cases (the papers' examples among them), the registry, and a fuzz test."""

import math
import time

import numpy as np
import pytest

from jaxgrounding.data.sample import Sample
from jaxgrounding.tasks import rewards
from jaxgrounding.tasks.inversion import INVERSION_TASKS, TASKS
from jaxgrounding.tasks.rewards import (
    action_recognition_reward,
    format_reward,
    iou,
    iou_reward,
    task_rewards,
    total_reward,
    verb_completion_reward,
    video_description_reward,
)


def _sample(query="A person walks away and laughs", windows=((2.0, 6.0),), duration=30.0, verbs=None):
    return Sample(id="v/0", video="v.mp4", duration=duration, query=query, windows=windows, verbs=verbs)


# --- IoU ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred,window,want",
    [
        ((3.0, 5.0), (2.0, 6.0), 0.5),  # inside: 2 / 4
        ((0.0, 4.0), (2.0, 6.0), 2.0 / 6.0),  # overlap 2, union 6
        ((2.0, 6.0), (2.0, 6.0), 1.0),
        ((7.0, 9.0), (2.0, 6.0), 0.0),  # disjoint
        ((6.0, 9.0), (2.0, 6.0), 0.0),  # touching
        ((4.0, 4.0), (2.0, 6.0), 0.0),  # a point inside: measure zero
        ((4.0, 4.0), (4.0, 4.0), 0.0),  # empty union: guarded (the reference raises)
    ],
)
def test_iou(pred, window, want):
    assert iou(pred, window) == pytest.approx(want, abs=1e-12)
    assert iou(window, pred) == pytest.approx(want, abs=1e-12)


def test_iou_reward_parses_the_answer():
    assert iou_reward("<think>x</think><answer>3.00 to 5.00</answer>", (2.0, 6.0)) == pytest.approx(0.5)
    assert iou_reward("3.00 to 5.00", (2.0, 6.0)) == 0.0  # no answer block
    assert iou_reward("<answer>5.00 to 3.00</answer>", (2.0, 6.0)) == 0.0  # reversed: as Time-R1's (negative overlap)


def test_distance_weighted_iou_is_time_r1s_iou_v2():
    # IoU 0.5, start off by 1 s, end off by 1 s, in a 30 s video.
    value = iou_reward("<answer>3 to 5</answer>", (2.0, 6.0), 30.0, distance_weighted=True)
    assert value == pytest.approx(0.5 * (1 - 1 / 30) * (1 - 1 / 30))
    exact = iou_reward("<answer>2 to 6</answer>", (2.0, 6.0), 30.0, distance_weighted=True)
    assert exact == 1.0
    # An end far past the video: the reference's factor goes negative; clamped here, so 0 not < 0.
    assert iou_reward("<answer>2 to 99999</answer>", (2.0, 6.0), 30.0, distance_weighted=True) == 0.0
    with pytest.raises(ValueError):
        iou_reward("<answer>2 to 6</answer>", (2.0, 6.0), None, distance_weighted=True)


# --- Format ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,want",
    [
        ("<think>The action is at the end.</think><answer>12.54 to 17.83</answer>", 1.0),
        ("  <think>multi\nline</think>\n\n<answer>1 to 2</answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),  # the format says nothing of the content
        ("<answer>12.54 to 17.83</answer>", 0.0),  # no reasoning
        ("<think>a</think>", 0.0),
        ("<think>a</think> text <answer>1 to 2</answer>", 0.0),
        ("<think>a</think><answer>1 to 2</answer> more", 0.0),
        ("prefix <think>a</think><answer>1 to 2</answer>", 0.0),
        ("<answer>1 to 2</answer><think>a</think>", 0.0),
        ("<think>a</think><answer>1 to 2</answer><answer>3 to 4</answer>", 0.0),  # repeated blocks
        ("<think>a<think>b</think></think><answer>1 to 2</answer>", 0.0),  # nested
        ("<think>a</think><answer>1 to 2", 0.0),  # unclosed
        ("<THINK>a</THINK><ANSWER>1 to 2</ANSWER>", 0.0),
    ],
)
def test_grounding_format(text, want):
    assert format_reward(text, "grounding") == want


@pytest.mark.parametrize(
    "text,want",
    [
        ("<answer>close</answer>", 1.0),
        (" <answer>Person closes the door</answer>\n", 1.0),
        ("<think>hm</think><answer>close</answer>", 0.0),
        ("close", 0.0),
        ("<answer>close</answer> because", 0.0),
        ("<answer>a</answer><answer>b</answer>", 0.0),
    ],
)
def test_answer_only_format(text, want):
    for task in INVERSION_TASKS:
        assert format_reward(text, task) == want
    assert format_reward(text, "grounding", thinking=False) == want


# --- Inversion rewards ----------------------------------------------------------------------------------------


def test_verb_completion_the_papers_example():
    truth = ("close",)  # "Person closed the door"
    assert verb_completion_reward("<answer>Person [closes] the door</answer>", truth) == 1.0
    assert verb_completion_reward("<answer>Person closes the door</answer>", truth) == 1.0
    assert verb_completion_reward("<answer>Person [opens] the door</answer>", truth) == 0.0
    # More verbs than the truth are fine (a subset is asked), fewer are not.
    assert verb_completion_reward("<answer>person puts on clothes and fastens the buttons</answer>", ("put",)) == 1.0
    assert verb_completion_reward("<answer>person puts on clothes</answer>", ("put", "fasten")) == 0.0
    # Only the first answer block counts.
    assert verb_completion_reward("<answer>person opens it</answer><answer>person closes it</answer>", truth) == 0.0


def test_verb_completion_with_no_verb_to_recover():
    assert verb_completion_reward("<answer>a red circle</answer>", ()) == 1.0
    assert verb_completion_reward("<answer>a red circle moves</answer>", ()) == 0.0
    assert verb_completion_reward("no answer at all", ()) == 0.0
    assert verb_completion_reward("no answer at all", ("close",)) == 0.0


def test_action_recognition_the_papers_example():
    truth = ("walk", "laugh")  # "A person walks away and laughs"
    for answer in ("walk", "walks", "walked", "Walking", "laugh", " walking away ", "walk."):
        assert action_recognition_reward(f"<answer>{answer}</answer>", truth) == 1.0, answer
    for answer in ("run", "person walks", "", "123"):
        assert action_recognition_reward(f"<answer>{answer}</answer>", truth) == 0.0, answer
    assert action_recognition_reward("walk", truth) == 0.0
    assert action_recognition_reward("<answer>took</answer>", ("take",)) == 1.0  # irregular


def test_video_description_the_papers_example():
    assert video_description_reward("<answer>A person jumps and laughs</answer>", ("jump",)) == 1.0
    assert video_description_reward("<answer>A person jumped</answer>", ("jump",)) == 1.0
    assert video_description_reward("<answer>A person laughs</answer>", ("jump",)) == 0.0
    assert video_description_reward("<answer>A person jumps</answer>", ("jump", "laugh")) == 0.0  # all of them
    assert video_description_reward("<answer>A person jumps</answer>", ()) == 0.0
    assert video_description_reward("A person jumps", ("jump",)) == 0.0


# --- Registry and totals --------------------------------------------------------------------------------------


def test_rewards_that_do_not_apply_answer_none():
    sample, text = _sample(), "<answer>walk</answer>"
    for task in TASKS:
        for name in rewards.DEFAULT_REWARDS:
            value = rewards.get_reward(name)(text, sample, task)
            applies = name == "format" or name == task or (name == "iou" and task == "grounding")
            assert (value is not None) == applies, (name, task)


def test_task_rewards_and_totals():
    sample = _sample()
    grounding = "<think>They walk off at the start.</think> <answer>3.00 to 5.00</answer>"
    assert task_rewards(grounding, sample, "grounding") == {"iou": 0.5, "format": 1.0}
    assert total_reward(grounding, sample, "grounding") == 1.5
    assert task_rewards("<answer>3 to 5</answer>", sample, "grounding", thinking=False) == {"iou": 0.5, "format": 1.0}
    weighted = total_reward(grounding, sample, "grounding", distance_weighted=True)
    assert weighted == pytest.approx(1.0 + 0.5 * (1 - 1 / 30) ** 2)
    assert task_rewards("<answer>walked</answer>", sample, "action_recognition") == {
        "format": 1.0,
        "action_recognition": 1.0,
    }
    assert total_reward("I think it is walk", sample, "action_recognition") == 0.0
    assert total_reward("<answer>A person walks and laughs</answer>", sample, "video_description") == 2.0
    assert total_reward("<answer>A person walks away and smiles</answer>", sample, "verb_completion") == 1.0
    with pytest.raises(ValueError):
        task_rewards("x", sample, "captioning")


def test_users_register_their_own_rewards():
    name = "test_length_penalty"
    try:

        @rewards.register_reward(name)
        def length_penalty(text, sample, task, **_):
            return None if task != "grounding" else -0.001 * len(text)

        assert rewards.get_reward(name) is length_penalty
        names = rewards.DEFAULT_REWARDS + (name,)
        got = task_rewards("<answer>3 to 5</answer>", _sample(), "grounding", names=names)
        assert got == {"iou": 0.5, "format": 0.0, name: pytest.approx(-0.023)}
        assert name not in task_rewards("<answer>walk</answer>", _sample(), "action_recognition", names=names)
        with pytest.raises(ValueError):
            rewards.register_reward(name)(length_penalty)
    finally:
        rewards.REWARDS.pop(name, None)
    with pytest.raises(KeyError):
        rewards.get_reward(name)


# --- Fuzz -----------------------------------------------------------------------------------------------------

_NUMBERS = (
    "12.54", "17.83", "0", "3.", ".5", "1e999", "5", "-5", "+2", "nan", "inf", "-inf", "1e-300", "9" * 400,
    "1" * 20, "0.00", "007", "2.5.3", "१२", "٣",
)  # fmt: skip
_WORDS = (
    "person", "opens", "the", "door", "walks", "away", "and", "laughs", "closed", "putting", "is", "can't",
    "[]", "[closes]", "to", "and", "from", "sitting", "a", "ünï", "🙂", "\u202e", "\x00", "<", ">", "/", "\n",
)  # fmt: skip
_TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "<Answer>", "</think")


def _random_text(rng: np.random.Generator) -> str:
    kind = rng.integers(6)
    if kind == 0:  # random bytes, decoded
        return bytes(rng.integers(0, 256, size=rng.integers(0, 200), dtype=np.uint8)).decode("utf-8", "replace")
    if kind == 1:  # random code points (surrogates excluded: they cannot be encoded)
        points = rng.integers(0, 0x10FFFF, size=rng.integers(0, 80))
        return "".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF)
    pieces = []
    for _ in range(rng.integers(0, 24)):
        r = rng.random()
        if r < 0.3:
            pieces.append(str(rng.choice(_TAGS)))
        elif r < 0.55:
            pieces.append(f"{rng.choice(_NUMBERS)} {rng.choice(['to', 'and', 'TO', '-'])} {rng.choice(_NUMBERS)}")
        elif r < 0.65:
            pieces.append(f"{rng.uniform(-50, 80):.{rng.integers(0, 4)}f} to {rng.uniform(-50, 80):.2f}")
        else:
            pieces.append(str(rng.choice(_WORDS)))
    text = " ".join(pieces) if rng.random() < 0.7 else "".join(pieces)
    if kind == 5:  # well-formed, with random content
        inner = text.replace("<", "(").replace(">", ")")
        return f"<think>{inner}</think><answer>{inner[: rng.integers(0, 40)]}</answer>"
    return text


def test_fuzz_rewards_are_total_finite_and_in_range():
    rng = np.random.default_rng(1234)
    samples = [
        _sample(),
        _sample("Person closed the door.", windows=((0.0, 0.0),), duration=1e-3),
        _sample("find when the red circle turns green.", verbs=("turn",), windows=((10.0, 40.0),), duration=60.0),
        _sample("a red circle", windows=((5.0, 5.5),)),
    ]
    tick = time.perf_counter()
    seen = set()
    for i in range(10_000):
        text = _random_text(rng)
        sample = samples[i % len(samples)]
        for task in TASKS:
            for distance_weighted in (False, True):
                values = task_rewards(text, sample, task, distance_weighted=distance_weighted, thinking=i % 2 == 0)
                assert set(values) == {"iou" if task == "grounding" else task, "format"}
                for name, value in values.items():
                    assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, (name, text)
                    seen.add((name, value > 0))
    # The generator reaches both outcomes of every reward, so the ranges above were exercised.
    assert seen >= {(n, b) for n in ("iou", "format") + INVERSION_TASKS for b in (False, True)}, seen
    assert time.perf_counter() - tick < 20.0


# --- Structural answers (answer.format = "structural") ---------------------------------------------------------


@pytest.mark.parametrize(
    "text,want",
    [
        ("a person opens the door<ent>", 1.0),
        ("<tst>\na person opens the door<ent>\n<tst>", 1.0),  # structural_response's layout
        ("<tst>\nthe man sits<ent>\n<tst>\nhe stands<ent>", 1.0),
        (" <tst>\nthe man sits<ent>\n", 1.0),  # surrounding whitespace
        ("<tst>", 0.0),  # no event
        ("<tst>\n<tst>", 0.0),
        ("the man sits<ent> and then", 0.0),  # text after the last token
        ("the man sits<ent>\n\n<tst>", 0.0),  # an empty piece
        ("<tst><ent>", 0.0),  # pieces not separated by a newline
        ("<answer>1 to 2</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_structural_format(text, want):
    assert rewards.structural_format_reward(text) == want


def test_structural_iou_scores_the_top_window():
    sample = _sample()  # truth (2, 6)
    text = "<tst>\nwalks away<ent>\n<tst>"
    names = rewards.STRUCTURAL_REWARDS
    got = task_rewards(text, sample, "grounding", names=names, windows=[(3.0, 5.0), (2.0, 6.0)])
    assert got == {"structural_iou": 0.5, "structural_format": 1.0}
    assert task_rewards("<tst>", sample, "grounding", names=names, windows=[]) == {
        "structural_iou": 0.0,
        "structural_format": 0.0,
    }
    assert task_rewards(text, sample, "verb_completion", names=names, windows=[(2.0, 6.0)]) == {}
    with pytest.raises(ValueError, match="windows"):
        task_rewards(text, sample, "grounding", names=names)


def test_fuzz_structural_format_is_total():
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(10_000):
        pieces = [str(rng.choice(("<ent>", "<tst>", "\n", "a person", "<", "🙂", "\x00", " "))) for _ in range(rng.integers(0, 8))]
        text = "".join(pieces) if rng.random() < 0.5 else _random_text(rng) + "".join(pieces)
        value = rewards.structural_format_reward(text)
        assert value in (0.0, 1.0)
        seen.add(value)
    assert seen == {0.0, 1.0}
