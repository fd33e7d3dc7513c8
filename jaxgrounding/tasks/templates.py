"""Instruction templates for MeCo's three task domains: grounding, dense video captioning, reasoning.

MeCo (appendix G, fig. 8) trains with one hand-written, query-focused-captioning-aware instruction
per task domain of E.T.Instruct plus four rephrasings, sampled per example; evaluation uses a fixed
template (fig. 7). Here the first phrasing of each task is the evaluation one (`rng=None`) and
training samples uniformly among all of them.

Every phrasing asks for MeCo's answer format (sec. 3.3, eq. 2): a detailed, query-focused caption
of each event followed by the event token. The prompts name "the event token" in words rather than
writing `<ent>`: the tokenizer would turn a literal `<ent>` into the structural token itself, and a
structural token in the prompt would be mistaken for a generated one by code that looks them up by id.
"""

from __future__ import annotations

import numpy as np

TASKS = ("grounding", "dense_captioning", "reasoning")

# "{query}" is replaced by the normalised query, which ends in "." or "?"; it always closes a
# sentence so that its own punctuation is the sentence's.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "grounding": (
        "Watch the video carefully and find the moment described by the sentence: {query} "
        "Give a detailed description of that moment, then mark it with the event token.",
        "Find the segment of the video that matches: {query} "
        "Describe the segment in detail, focusing on what the query asks about, and end with the event token.",
        "Which part of the video shows the following? {query} "
        "Answer with a detailed caption of that part, followed by the event token.",
        "Locate the event in this video where this happens: {query} "
        "First write a query-focused caption of the event, then output the event token.",
        "Search the video for the moment that fits this description: {query} "
        "Respond with a fine-grained description of the moment and close it with the event token.",
    ),
    "dense_captioning": (
        "Localize every event in the video in the order they happen. "
        "For each event, write a detailed caption and follow it with the event token.",
        "Describe all the events that take place in this video, one after another, "
        "and end the description of each event with the event token.",
        "Watch the video and list its events in chronological order, "
        "giving each a detailed caption followed by the event token.",
        "Break the video into its events. Caption each event in detail, in temporal order, "
        "and place the event token right after each caption.",
        "Identify each step or event shown in the video and describe it, "
        "marking the end of every description with the event token.",
    ),
    "reasoning": (
        "Answer the question about the video: {query} "
        "Find the moment that answers it, describe that moment in detail, then mark it with the event token.",
        "Here is a question about the video: {query} "
        "Identify the event that answers it, give a detailed description of the event, then output the event token.",
        "Watch the video and answer: {query} "
        "Ground your answer by describing the relevant event in detail and ending with the event token.",
        "Use the video to answer this question: {query} "
        "Describe the event that holds the answer, focusing on what the question asks, followed by the event token.",
        "Think about what happens in the video. {query} "
        "Locate the event that answers the question, caption it in detail, and close the caption with the event token.",
    ),
}

# Tasks whose phrasings take a query, and the punctuation a query gets when it has none.
_QUERY_END = {"grounding": ".", "reasoning": "?"}
_TRAILING = ".?!,;:"


def _normalise_query(query: str, default_end: str) -> str:
    """One line, ending in exactly one "." or "?": existing end punctuation is replaced, not doubled.

    A query that ended in a question mark keeps it (a question stays a question in any task);
    otherwise it ends in `default_end`.
    """
    text = " ".join(query.split())
    body = text.rstrip(_TRAILING + " ")
    if not body:
        raise ValueError(f"empty query: {query!r}")
    end = "?" if "?" in text[len(body) :] else default_end
    return body + end


def instruction(task: str, query: str | None, rng: np.random.Generator | None) -> str:
    """The instruction for `task` around `query`: the first phrasing when `rng` is None (evaluation),
    else one drawn uniformly with `rng` (training).

    grounding and reasoning need a query (a sentence to ground, a question); dense_captioning takes
    none, and passing one is an error rather than silently dropped text.
    """
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    phrasings = TEMPLATES[task]
    template = phrasings[0] if rng is None else phrasings[int(rng.integers(len(phrasings)))]
    if task not in _QUERY_END:
        if query is not None:
            raise ValueError(f"task {task!r} takes no query, got {query!r}")
        return template
    if query is None:
        raise ValueError(f"task {task!r} needs a query")
    return template.format(query=_normalise_query(query, _QUERY_END[task]))
