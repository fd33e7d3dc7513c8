"""Inversion tasks: masking, prompts, truths, targets that earn their reward, and the task schedule."""

import math

import numpy as np
import pytest

from jaxgrounding.data.sample import Sample
from jaxgrounding.tasks import inversion, rewards


def _sample(query, verbs=None, captions=None, windows=((2.0, 6.5), (10.0, 12.0))):
    return Sample(id="v/0", video="v.mp4", duration=30.0, query=query, windows=windows, captions=captions, verbs=verbs)


def test_the_papers_verb_completion_example():
    sample = _sample("Person closed the door.")
    assert inversion.masked_query(sample) == "Person [] the door"
    text = inversion.prompt("verb_completion", sample)
    assert text.startswith("Add a verb for the event 'Person [] the door' based on the video")
    assert "<answer> </answer>" in text
    assert inversion.truth_verbs(sample) == ("close",)


def test_every_verb_of_the_query_is_masked():
    sample = _sample("A person putting on clothes and fastening the buttons.")
    assert inversion.masked_query(sample) == "A person [] on clothes and [] the buttons"
    assert inversion.truth_verbs(sample) == ("put", "fasten")


def test_recorded_verbs_override_the_tagger():
    # The synthetic set records the event's verb; "find" names the task and stays.
    sample = _sample("find the moment the red circle travels left across the scene.", verbs=("travel",))
    assert inversion.truth_verbs(sample) == ("travel",)
    assert inversion.masked_query(sample) == "find the moment the red circle [] left across the scene"
    # Recorded forms are lemmatised.
    assert inversion.truth_verbs(_sample("x", verbs=("Opening", "closed", " "))) == ("open", "close")


def test_the_papers_prompts_for_recognition_and_description():
    sample = _sample("A person walks to the sofa and laughs")
    assert inversion.prompt("action_recognition", sample).startswith(
        "Use a verb to describe the event based on the video."
    )
    assert inversion.prompt("video_description", sample).startswith(
        "Describe what people have done based on the video."
    )
    for task in inversion.INVERSION_TASKS:
        text = inversion.prompt(task, sample)
        assert "<answer> </answer>" in text and "<think>" not in text
        # The clip is the answer to the grounding task; the query's words are only in verb completion.
        assert ("sofa" in text) == (task == "verb_completion")


def test_the_clip_is_the_first_ground_truth_window():
    sample = _sample("person opens a door")
    assert inversion.clip_window(sample) == (2.0, 6.5)
    for task in inversion.INVERSION_TASKS:
        example = inversion.example(task, sample)
        assert example.clip == (2.0, 6.5) and example.task == task and example.verbs == ("open",)
        assert example.prompt == inversion.prompt(task, sample)
    grounding = inversion.example("grounding", sample, thinking=True)
    assert (
        grounding.clip is None
        and "<think> </think>" in grounding.prompt
        and '"person opens a door"' in grounding.prompt
    )
    with pytest.raises(ValueError):
        inversion.clip_window(_sample("person opens a door", windows=()))
    with pytest.raises(ValueError):
        inversion.prompt("grounding", sample)  # grounding's prompt is timestamps.grounding_prompt


@pytest.mark.parametrize(
    "sample",
    [
        _sample("Person closed the door."),
        _sample("A person walks away and laughs"),
        _sample("person is opening a closet", captions=("A man opens the closet door slowly.", "x")),
        _sample("find when the red circle turns green.", verbs=("turn",), captions=("The red circle turns green.", "")),
        _sample("when is the red circle bigger?", verbs=("swell",), captions=("The red circle swells.", "")),
    ],
    ids=["closed", "walks", "caption", "synthetic", "stative"],
)
def test_targets_earn_the_full_reward(sample):
    for task in inversion.INVERSION_TASKS:
        if not inversion.applicable(task, sample):
            with pytest.raises(ValueError):
                inversion.target(task, sample)
            continue
        completion = inversion.target(task, sample)
        assert rewards.task_rewards(completion, sample, task) == {"format": 1.0, task: 1.0}, (task, completion)


def test_applicability():
    assert all(inversion.applicable(t, _sample("Person closed the door")) for t in inversion.INVERSION_TASKS)
    stative = _sample("when is the red circle bigger?", verbs=("swell",), captions=("The red circle swells.", ""))
    # The verb to recover is not in the query: nothing is masked, so verb completion has no answer.
    assert inversion.masked_query(stative) == "when is the red circle bigger?"
    assert not inversion.applicable("verb_completion", stative)
    assert inversion.applicable("action_recognition", stative) and inversion.applicable("video_description", stative)
    verbless = _sample("a red circle on a table")
    assert inversion.truth_verbs(verbless) == ()
    assert not any(inversion.applicable(t, verbless) for t in inversion.INVERSION_TASKS)
    assert inversion.target("video_description", _sample("Person closed the door", captions=("It opens.", ""))) == (
        "<answer>Person closed the door</answer>"  # the caption lacks the verb: the query instead
    )


def test_task_schedule_frequencies_and_determinism():
    n = 10_000
    draws = [inversion.sample_task(7, step) for step in range(n)]
    assert draws == [inversion.sample_task(7, step) for step in range(n)]  # resumes exactly
    counts = {task: draws.count(task) for task in inversion.TASKS}
    assert sum(counts.values()) == n

    def within(count, p):  # 5 standard deviations of Binomial(n, p)
        return abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p))

    assert within(counts["grounding"], 0.8), counts
    for task in inversion.INVERSION_TASKS:
        assert within(counts[task], 0.2 / 3), counts
    assert draws != [inversion.sample_task(8, step) for step in range(n)]
    # The step, not the call order, decides.
    assert [inversion.sample_task(7, s) for s in (9, 3, 9)] == [draws[9], draws[3], draws[9]]


def test_task_schedule_settings():
    assert {inversion.sample_task(0, s, grounding_prob=1.0) for s in range(500)} == {"grounding"}
    assert {inversion.sample_task(0, s, grounding_prob=0.0) for s in range(500)} == set(inversion.INVERSION_TASKS)
    only = {inversion.sample_task(0, s, grounding_prob=0.5, tasks=("action_recognition",)) for s in range(500)}
    assert only == {"grounding", "action_recognition"}
    assert inversion.sample_task(0, 1, grounding_prob=1.0, tasks=()) == "grounding"
    for bad in (
        dict(grounding_prob=1.5),
        dict(grounding_prob=-0.1),
        dict(tasks=("grounding",)),
        dict(tasks=("captioning",)),
        dict(grounding_prob=0.5, tasks=()),
    ):
        with pytest.raises(ValueError):
            inversion.sample_task(0, 0, **bad)
    with pytest.raises(ValueError):
        inversion.sample_task(-1, 0)


def test_schedule_matches_an_independent_draw():
    """The draw is u ~ U[0, 1) from numpy's generator seeded with [seed, step], grounding when u < p, else
    the next integer picks the task: pin it, so a change of generator is a deliberate, visible one."""
    for step in range(50):
        rng = np.random.default_rng([11, step])
        want = "grounding" if rng.random() < 0.8 else inversion.INVERSION_TASKS[rng.integers(3)]
        assert inversion.sample_task(11, step) == want
