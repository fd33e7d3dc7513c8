"""Time-R1's answer format: prompts, target completions and the parser, on hand-written cases."""

import math

import numpy as np
import pytest

from jaxgrounding.tasks.timestamps import (
    MAX_SECONDS,
    PHRASINGS,
    format_answer,
    grounding_prompt,
    parse_answer,
    parse_answer_anywhere,
    phrasing_index,
)


def test_prompt_puts_the_query_first_and_asks_for_the_format():
    text = grounding_prompt("  person   closed the door. ", thinking=False)
    assert text.startswith(PHRASINGS[0].format(query="person closed the door"))
    assert "<answer> </answer>" in text and '"12.54 to 17.83"' in text and "two decimal places" in text
    assert "<think>" not in text


def test_thinking_prompt_asks_for_reasoning_before_the_answer():
    text = grounding_prompt("person closed the door", thinking=True)
    assert text.index("<think> </think>") < text.index("<answer> </answer>")
    assert '"xx.xx to xx.xx"' in text and '"12.54 to 17.83"' in text
    assert text.split("\n\n")[0] == grounding_prompt("person closed the door", thinking=False).split("\n\n")[0]


def test_phrasings_are_distinct_and_all_reachable():
    assert len(set(PHRASINGS)) == len(PHRASINGS) >= 4
    prompts = {grounding_prompt("a person sits down", thinking=False, phrasing=i) for i in range(len(PHRASINGS))}
    assert len(prompts) == len(PHRASINGS) and all('"a person sits down"' in p for p in prompts)
    draws = [phrasing_index(3, i) for i in range(5000)]
    assert draws == [phrasing_index(3, i) for i in range(5000)]  # a function of (seed, index) only
    counts = np.bincount(draws, minlength=len(PHRASINGS))
    assert np.all(np.abs(counts - 1000) < 5 * math.sqrt(5000 * 0.2 * 0.8)), counts
    assert draws != [phrasing_index(4, i) for i in range(5000)]


def test_prompt_rejects_an_empty_query():
    with pytest.raises(ValueError):
        grounding_prompt(" . ", thinking=True)


@pytest.mark.parametrize(
    "text,want",
    [
        ("<answer>12.54 to 17.83</answer>", (12.54, 17.83)),  # the prompt's own example
        ("<think>The person picks up clothes.</think>\n<answer> 12.54 to 17.83 </answer>", (12.54, 17.83)),
        ("<answer>3 and 7.5</answer>", (3.0, 7.5)),
        ("<answer>3 TO 7</answer>", (3.0, 7.0)),
        ("<answer>from\n3.25\nto\n7</answer>", (3.25, 7.0)),
        ("<answer>0 to 0</answer>", (0.0, 0.0)),  # a point: valid, its IoU is another matter
        # The last <answer> block, and the last pair in it.
        ("<answer>1 to 2</answer> no, <answer>5 to 9</answer>", (5.0, 9.0)),
        ("<answer>first 1 to 2, rather 4.5 to 6.</answer>", (4.5, 6.0)),
        # A range inside <think> is reasoning, not the answer.
        ("<think>maybe 1.00 to 2.00</think><answer>3.00 to 4.00</answer>", (3.0, 4.0)),
        ("<think>it happens from 1.00 to 2.00</think><answer>at the start</answer>", None),
        # Not answers.
        ("12.54 to 17.83", None),  # no block
        ("<answer>12.54 to 17.83", None),  # unclosed
        ("<answer>12.54 - 17.83</answer>", None),
        ("<answer>twelve to seventeen</answer>", None),
        ("<answer>1e999 to 5</answer>", None),  # an exponent is not a bare decimal
        ("<answer>5 to 1e3</answer>", None),
        ("<answer>-3 to 5</answer>", None),
        ("<answer>+3 to 5</answer>", None),
        ("<answer>nan to 5</answer>", None),
        ("<answer>inf to 5</answer>", None),
        ("<answer>3 to " + "9" * 400 + "</answer>", None),  # float() of it is inf
        (f"<answer>1 to {MAX_SECONDS * 2:.0f}</answer>", None),
        ("<answer>17.83 to 12.54</answer>", None),  # reversed: Time-R1's IoU would be 0 too
        ("<answer>1 to 2 then 9 to 3</answer>", None),  # the last pair decides, and it is reversed
        ("<answer>12.5s to 17.8s</answer>", None),
    ],
)
def test_parse_answer(text, want):
    assert parse_answer(text) == want


def test_anywhere_reads_the_last_pair_tags_or_not():
    assert parse_answer_anywhere("The event happens from 3.5 to 8.25 seconds.") == (3.5, 8.25)
    assert parse_answer_anywhere("<answer>1 to 2</answer> and later 4 to 6") == (4.0, 6.0)
    assert parse_answer_anywhere("<answer>1e999 to 5</answer>") is None
    assert parse_answer_anywhere("nothing here") is None


def test_format_answer_round_trips():
    rng = np.random.default_rng(0)
    for start, end in np.sort(rng.uniform(0, 500, size=(200, 2)), axis=1):
        text = format_answer((start, end), thinking=None)
        assert text == f"<answer>{start:.2f} to {end:.2f}</answer>"
        assert parse_answer(text) == (round(start, 2), round(end, 2))
        thought = format_answer((start, end), thinking="The door closes near the end.")
        assert thought.startswith("<think>The door closes near the end.</think>\n<answer>")
        assert parse_answer(thought) == parse_answer(text)


@pytest.mark.parametrize("window", [(5.0, 3.0), (-1.0, 2.0), (0.0, math.inf), (math.nan, 1.0)])
def test_format_answer_rejects_non_windows(window):
    with pytest.raises(ValueError):
        format_answer(window, thinking=None)


def test_format_answer_takes_the_reasoning_text_not_a_switch():
    with pytest.raises(TypeError):
        format_answer((1.0, 2.0), thinking=True)
