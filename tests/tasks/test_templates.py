"""Instruction templates: enough distinct phrasings, deterministic evaluation prompt, query handling."""

import numpy as np
import pytest

from jaxgrounding.tasks.templates import TASKS, TEMPLATES, instruction

QUERY_TASKS = ("grounding", "reasoning")


def test_every_task_has_at_least_four_distinct_phrasings():
    assert set(TEMPLATES) == set(TASKS)
    for task in TASKS:
        phrasings = TEMPLATES[task]
        assert len(set(phrasings)) == len(phrasings) >= 4, task
        for phrasing in phrasings:
            # Every phrasing asks for MeCo's format, in words: a literal "<ent>" would become the token.
            assert "event token" in phrasing and "<ent>" not in phrasing and "<tst>" not in phrasing
            assert phrasing.count("{query}") == (1 if task in QUERY_TASKS else 0), (task, phrasing)


@pytest.mark.parametrize("task", TASKS)
def test_no_rng_gives_the_first_phrasing(task):
    query = "the man opens the door" if task in QUERY_TASKS else None
    first = instruction(task, query, None)
    assert first == instruction(task, query, None)
    want_end = "?" if task == "reasoning" else "."
    assert first == TEMPLATES[task][0].format(query=f"the man opens the door{want_end}")


@pytest.mark.parametrize("task", TASKS)
def test_rng_reaches_every_phrasing_and_is_reproducible(task):
    query = "the man opens the door" if task in QUERY_TASKS else None
    draws = [instruction(task, query, np.random.default_rng(seed)) for seed in range(200)]
    assert len(set(draws)) == len(TEMPLATES[task])
    assert draws == [instruction(task, query, np.random.default_rng(seed)) for seed in range(200)]


@pytest.mark.parametrize("task", QUERY_TASKS)
def test_query_is_inserted_in_every_phrasing(task):
    rng = np.random.default_rng(0)
    for _ in range(50):
        text = instruction(task, "  a person   puts a\nbook on the shelf ", rng)
        assert "a person puts a book on the shelf" in text
        assert "{query}" not in text


@pytest.mark.parametrize(
    "task,query,want",
    [
        ("grounding", "person opens the door", "person opens the door."),
        ("grounding", "person opens the door.", "person opens the door."),
        ("grounding", "person opens the door...", "person opens the door."),
        ("grounding", "person opens the door !", "person opens the door."),
        ("grounding", "is the door open?", "is the door open?"),
        ("reasoning", "why does the man fall", "why does the man fall?"),
        ("reasoning", "why does the man fall?", "why does the man fall?"),
        ("reasoning", "why does the man fall ?.", "why does the man fall?"),
    ],
)
def test_trailing_punctuation_is_normalised_not_doubled(task, query, want):
    text = instruction(task, query, None)
    assert TEMPLATES[task][0].format(query=want) == text
    assert ".." not in text and "?." not in text and "??" not in text


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError) as error:
        instruction("captioning", "q", None)
    for task in TASKS:
        assert task in str(error.value)


def test_query_presence_is_checked():
    with pytest.raises(ValueError):
        instruction("grounding", None, None)
    with pytest.raises(ValueError):
        instruction("reasoning", " ?! ", None)
    with pytest.raises(ValueError):
        instruction("dense_captioning", "a query", None)
