"""Invert4TVG's inversion tasks: from a grounding sample, three tasks that ask about its action instead.

Invert4TVG (Chen et al. 2025, sec. 2.2) inverts temporal grounding: the model sees the ground-truth clip
(the frames of the first ground-truth window only) and answers about the query's action:

- verb completion: the query with its verbs masked ("Person [] the door"), to be completed;
- action recognition: one verb for the action;
- video description: a description that must contain the query's verbs.

The truth of all three is the query's verbs as lemmas (`truth_verbs`): the sample's own `verbs` when its
source records them (the synthetic set names the event's verbs, leaving out "find" / "locate", which
name the task), otherwise `verbs.verb_lemmas(query)`, the reference's rule. Answers go in
`<answer> </answer>` with no reasoning. The rewards that score them live in `tasks.rewards`.

Task schedule (sec. 2.4, Algorithm 1): each training step is grounding with probability p (0.8), else
one of the inversion tasks, uniformly. `sample_task` draws it from (seed, step) alone, so a resumed run
draws what the uninterrupted one did. (The reference code instead fixes the mix in the data.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxgrounding.data.sample import Sample, Window
from jaxgrounding.tasks import timestamps
from jaxgrounding.tasks import verbs as verbs_lib

INVERSION_TASKS = ("verb_completion", "action_recognition", "video_description")
TASKS = ("grounding",) + INVERSION_TASKS
GROUNDING_PROB = 0.8  # Invert4TVG's p

MASK = "[]"  # what replaces each verb of the query (the paper's "Person [] the door")

# The paper's task sentences, each followed by the answer format and an example in the style of the
# reference's verb-completion prompt.
PROMPTS = {
    "verb_completion": (
        "Add a verb for the event '{masked}' based on the video, making it a complete sentence. "
        "Write the complete sentence within the <answer> </answer> tags, for example "
        "<answer>person closes the door</answer>."
    ),
    "action_recognition": (
        "Use a verb to describe the event based on the video. "
        "Write the single verb within the <answer> </answer> tags, for example <answer>close</answer>."
    ),
    "video_description": (
        "Describe what people have done based on the video. "
        "Write the description within the <answer> </answer> tags, for example "
        "<answer>a person closes the door and walks away</answer>."
    ),
}


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One task built from a grounding sample.

    task: one of TASKS. prompt: the user-turn text. clip: the window (seconds) of frames the model is
    shown, None for the whole video (grounding). verbs: the truth verbs (lemmas). sample: the source.
    """

    task: str
    prompt: str
    clip: Window | None
    verbs: tuple[str, ...]
    sample: Sample


def _check_task(task: str, allowed: tuple[str, ...] = INVERSION_TASKS) -> None:
    if task not in allowed:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(allowed)}")


def _query(sample: Sample) -> str:
    """The query on one line, without a final full stop (as the grounding prompt quotes it)."""
    return " ".join(sample.query.split()).rstrip(" .")


def truth_verbs(sample: Sample) -> tuple[str, ...]:
    """The verbs (lemmas) an inversion answer is scored against (see the module docstring)."""
    if sample.verbs is not None:
        return tuple(dict.fromkeys(verbs_lib.lemma(v) for v in sample.verbs if v.strip()))
    return verbs_lib.verb_lemmas(_query(sample))


def masked_query(sample: Sample) -> str:
    """The query with every verb whose lemma is a truth verb replaced by `MASK`; a truth verb the query
    does not contain (a source's event verb for a query that names a state) leaves nothing to mask."""
    query, truth = _query(sample), set(truth_verbs(sample))
    pieces, cursor = [], 0
    for start, end, lemma in verbs_lib.verb_spans(query):
        if lemma in truth:
            pieces += [query[cursor:start], MASK]
            cursor = end
    return "".join(pieces) + query[cursor:]


def clip_window(sample: Sample) -> Window:
    """The frames an inversion task shows: the first ground-truth window."""
    if not sample.windows:
        raise ValueError(f"sample {sample.id} has no ground-truth window to show")
    return sample.windows[0]


def applicable(task: str, sample: Sample) -> bool:
    """Whether `task` has a reachable answer for `sample`: verb completion needs every truth verb in the
    query (to be masked and recovered), action recognition and description need a truth verb."""
    _check_task(task)
    truth = truth_verbs(sample)
    if not truth or not sample.windows:
        return False
    if task == "verb_completion":
        return set(truth) <= {lemma for _, _, lemma in verbs_lib.verb_spans(_query(sample))}
    return True


def prompt(task: str, sample: Sample) -> str:
    """The user-turn text of an inversion task (the model sees `clip_window(sample)` of the video)."""
    _check_task(task)
    return PROMPTS[task].format(masked=masked_query(sample) if task == "verb_completion" else "")


def target(task: str, sample: Sample) -> str:
    """A completion that earns the task's full reward, for a supervised warm start: the query itself
    (verb completion), the first truth verb (action recognition), the window's caption when it has the
    truth verbs, else the query (description). Raises ValueError when none exists (see `applicable`)."""
    if not applicable(task, sample):
        raise ValueError(f"{task} has no reachable answer for sample {sample.id} (truth verbs {truth_verbs(sample)})")
    truth = set(truth_verbs(sample))
    if task == "verb_completion":
        answer = _query(sample)
    elif task == "action_recognition":
        answer = truth_verbs(sample)[0]
    else:
        candidates = [c for c in (sample.captions or ())[:1] if c and c.strip()] + [_query(sample)]
        answer = next((c for c in candidates if truth <= set(verbs_lib.verb_lemmas(c))), None)
        if answer is None:
            raise ValueError(f"no caption or query of sample {sample.id} contains its verbs {sorted(truth)}")
        answer = " ".join(answer.split())
    return f"<answer>{answer}</answer>"


def example(task: str, sample: Sample, *, thinking: bool = False, phrasing: int = 0) -> TaskExample:
    """The task's prompt, clip and truth in one record (grounding included: the whole video, `thinking`
    and `phrasing` choosing its prompt as `timestamps.grounding_prompt` does)."""
    _check_task(task, TASKS)
    if task == "grounding":
        text = timestamps.grounding_prompt(sample.query, thinking=thinking, phrasing=phrasing)
        return TaskExample(task, text, None, truth_verbs(sample), sample)
    return TaskExample(task, prompt(task, sample), clip_window(sample), truth_verbs(sample), sample)


def sample_task(
    seed: int, step: int, *, grounding_prob: float = GROUNDING_PROB, tasks: tuple[str, ...] = INVERSION_TASKS
) -> str:
    """The task of training step `step`: "grounding" with probability `grounding_prob`, else one of `tasks`
    uniformly; a function of (seed, step) alone (a resumed run redraws the same)."""
    if not 0.0 <= grounding_prob <= 1.0:
        raise ValueError(f"grounding_prob must be in [0, 1], got {grounding_prob}")
    tasks = tuple(tasks)
    for task in tasks:
        _check_task(task)
    if grounding_prob < 1.0 and not tasks:
        raise ValueError("grounding_prob < 1 needs at least one inversion task")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed}, {step}")
    rng = np.random.default_rng([seed, step])
    if rng.random() < grounding_prob:
        return "grounding"
    return tasks[int(rng.integers(len(tasks)))]
