"""Verb lemmas: accuracy on written sentences (development and held-out), the lemmatiser, auxiliaries,
offsets, robustness, and agreement with the verbs the synthetic set records for its queries."""

import itertools

import numpy as np
import pytest

from jaxgrounding.data import synthetic_scenes as scenes
from jaxgrounding.tasks import verbs
from jaxgrounding.tasks.verbs import MAX_TOKENS, lemma, verb_lemmas, verb_spans

# Sentences in the style of Charades-STA queries and the Invert4TVG paper's examples (sec. 2.2, fig. 1,
# appendix E), with the verb lemmas spaCy's rule gives (POS VERB, auxiliaries out). The lexicon backend's
# grammar rules were written while looking at DEVELOPMENT; HELD_OUT was written before them.
DEVELOPMENT = [
    ("Person closed the door", ("close",)),
    ("Person [closes] the door", ("close",)),
    ("A person walks away and laughs", ("walk", "laugh")),
    ("A person putting on clothes and fastening the buttons.", ("put", "fasten")),
    ("A person jumps and laughs", ("jump", "laugh")),
    ("person is opening a closet", ("open",)),
    ("someone puts the book on the table", ("put",)),
    ("a person reads a book while standing up", ("read", "stand")),
    ("a person sneezes and then takes medicine", ("sneeze", "take")),
    (
        "A man unbuttons his shirt, takes it off, puts on a different one, and buttons it up.",
        ("unbutton", "take", "put", "button"),
    ),
    ("person turns on the light", ("turn",)),
    ("person flipped the light switch", ("flip",)),
    ("a person is putting a book on a shelf", ("put",)),
    ("person sitting on a chair", ("sit",)),
    ("a person eats a sandwich", ("eat",)),
    ("person washing their hands in the sink", ("wash",)),
    ("person holding a broom", ("hold",)),
    ("the person drinks a glass of water", ("drink",)),
    ("a person is laughing at the phone", ("laugh",)),
    ("person picks up a towel", ("pick",)),
    ("a person sits down", ("sit",)),
    ("the person took a picture", ("take",)),
    ("person threw the pillow onto the bed", ("throw",)),
    ("a person ran out of the room", ("run",)),
    ("the person has opened the window", ("open",)),
    ("a person was sitting on the couch", ("sit",)),
    ("people are watching television", ("watch",)),
    ("someone can open the door", ("open",)),
    ("the person does not close the laptop", ("close",)),
    ("person is smiling", ("smile",)),
    ("a person lies on the bed", ("lie",)),
    ("the man began to cook", ("begin", "cook")),
    ("person stood up and left the room", ("stand", "leave")),
    ("person gets dressed", ("get", "dress")),
    ("a person is undressing in the bedroom", ("undress",)),
    ("the woman brought a bag of groceries", ("bring",)),
    ("a person caught a ball", ("catch",)),
    ("person wrote something on paper", ("write",)),
    ("the person fixed the doorknob", ("fix",)),
    ("person pours coffee into a cup", ("pour",)),
    ("a person tidies the shelf", ("tidy",)),
    ("someone snuggles with a blanket", ("snuggle",)),
    ("a person vacuums the floor", ("vacuum",)),
    ("the person went to the kitchen", ("go",)),
    ("person grabbed a bag", ("grab",)),
    ("a person sneezing", ("sneeze",)),
    ("person throws clothes on the floor", ("throw",)),
    ("person opens the refrigerator", ("open",)),
    ("a person is eating food", ("eat",)),
    ("person begins to undress", ("begin", "undress")),
    ("the person fed the dog", ("feed",)),
    ("someone hid the box under the bed", ("hide",)),
    ("person sweeps the floor", ("sweep",)),
    ("a person looks out the window", ("look",)),
    ("person stands up", ("stand",)),
    ("person takes off their shoes", ("take",)),
    ("person puts a bag down", ("put",)),
    ("a person was tying their shoes", ("tie",)),
    ("the person dropped the phone", ("drop",)),
    ("person sat on the floor and played with a cat", ("sit", "play")),
    ("a person cooks at the stove", ("cook",)),
    ("person closing the door", ("close",)),
    ("the person is holding a cup", ("hold",)),
    ("a person fixes their hair in the mirror", ("fix",)),
    ("person walking through the doorway", ("walk",)),
    ("a person was running", ("run",)),
    ("they have eaten the cake", ("eat",)),
    ("the person can't find the keys", ("find",)),
    ("person awakens in bed", ("awaken",)),
    ("the person smiled at the camera", ("smile",)),
    ("the person watches a movie on the laptop", ("watch",)),
    ("a person dresses in front of the mirror", ("dress",)),
    ("a red circle", ()),
    ("the door is open", ()),
    ("is the door open?", ()),
    ("when does the red circle move left?", ("move",)),
    ("find when the blue square turns green.", ("find", "turn")),
    ("when is the red circle shifted left of its place?", ("shift",)),
]
HELD_OUT = [
    ("a person opens a bag", ("open",)),
    ("person puts the dishes away", ("put",)),
    ("the person is tidying up the desk", ("tidy",)),
    ("a person runs into the room", ("run",)),
    ("person pours a drink", ("pour",)),
    ("the person starts sneezing", ("start", "sneeze")),
    ("a person throws a blanket on the floor", ("throw",)),
    ("person takes a sandwich from the fridge", ("take",)),
    ("the person is sitting at a table eating", ("sit", "eat")),
    ("a person lies down on the sofa", ("lie",)),
    ("person closes the cabinet", ("close",)),
    ("someone washes a cup", ("wash",)),
    ("a person is dressing", ("dress",)),
    ("person turns off the light", ("turn",)),
    ("the person laughs", ("laugh",)),
    ("a person holds a pillow", ("hold",)),
    ("person reaches for the doorknob", ("reach",)),
    ("the person sets the box on the table", ("set",)),
    ("a person plays on their phone", ("play",)),
    ("person drank from the cup", ("drink",)),
    ("the person ate some food", ("eat",)),
    ("a person was standing by the window", ("stand",)),
    ("person fixes the vacuum", ("fix",)),
    ("the person smiles at the picture", ("smile",)),
    ("someone works on a laptop", ("work",)),
    ("a person walks to the door", ("walk",)),
    ("person sits in a chair and reads a book", ("sit", "read")),
    ("a person cleans the table with a towel", ("clean",)),
    ("the person is snuggling with a pillow", ("snuggle",)),
    ("person looks at a picture", ("look",)),
    ("the person hugs the dog", ("hug",)),
    ("a person touches the mirror", ("touch",)),
    ("a person wipes the floor", ("wipe",)),
    ("person grasps a doorknob", ("grasp",)),
    ("the person thinks and then writes a note", ("think", "write")),
    ("a person will open the window", ("open",)),
    ("person should close the door", ("close",)),
    ("the person is going to sleep", ("go", "sleep")),
    ("a person has been cooking", ("cook",)),
    ("the person did the laundry", ("do",)),
    ("a person had a sandwich", ("have",)),
    ("person tries to fix the light", ("try", "fix")),
    ("A man is seen speaking to the camera and leads into him playing the drums.", ("see", "speak", "lead", "play")),
    ("A woman is standing in a kitchen holding a knife.", ("stand", "hold")),
    ("The girl then jumps off the diving board into the pool.", ("jump",)),
    ("Two men are playing tennis on a court.", ("play",)),
    ("The man finishes and walks away from the camera.", ("finish", "walk")),
    ("A child rides a bike down the street.", ("ride",)),
    ("She puts lotion on her face and rubs it in.", ("put", "rub")),
    ("They shake hands at the end.", ("shake",)),
    ("person goes to bed", ("go",)),
    ("the person in the chair is reading a newspaper", ("read",)),
    ("a person cuts vegetables on a board", ("cut",)),
    ("person awakens and gets out of bed", ("awaken", "get")),
    ("the coffee cups on the table", ()),
    ("a person fills a glass with water", ("fill",)),
    ("person opens a box and takes out a laptop", ("open", "take")),
    ("a person stirs the soup in a pot", ("stir",)),
    ("the man was pushed by a friend", ("push",)),
    ("person eats while watching tv", ("eat", "watch")),
    ("the person flips through a book", ("flip",)),
    ("someone is lying on the floor laughing", ("lie", "laugh")),
    ("a person sneezes into a tissue", ("sneeze",)),
    ("person is throwing shoes into the closet", ("throw",)),
    ("a person drinks coffee and then puts the cup down", ("drink", "put")),
    ("the person turns the doorknob to open the door", ("turn", "open")),
    ("a person carries a box up the stairs", ("carry",)),
    ("person hangs a towel on the rack", ("hang",)),
    ("the woman paints a picture", ("paint",)),
    ("person plays with their hair", ("play",)),
    ("a person removes their jacket", ("remove",)),
    ("the person is sitting down on the sofa", ("sit",)),
    ("a person sat at the desk and began writing", ("sit", "begin", "write")),
    ("person puts food in the microwave", ("put",)),
    ("the man wipes his hands on a towel", ("wipe",)),
    ("a person leaves through the door", ("leave",)),
    ("person watches out the window", ("watch",)),
    ("a person sweeps up the dust", ("sweep",)),
    ("the person doesn't smile", ("smile",)),
    ("person texts on the phone", ("text",)),
    ("a person tosses clothes onto the bed", ("toss",)),
    ("the person kicks the ball", ("kick",)),
]
VERB_FORMS = [
    ("took", "take"),
    ("taken", "take"),
    ("went", "go"),
    ("gone", "go"),
    ("ran", "run"),
    ("sat", "sit"),
    ("stood", "stand"),
    ("threw", "throw"),
    ("thrown", "throw"),
    ("caught", "catch"),
    ("brought", "bring"),
    ("wrote", "write"),
    ("written", "write"),
    ("ate", "eat"),
    ("eaten", "eat"),
    ("drank", "drink"),
    ("began", "begin"),
    ("fed", "feed"),
    ("hid", "hide"),
    ("left", "leave"),
    ("put", "put"),
    ("held", "hold"),
    ("swept", "sweep"),
    ("lying", "lie"),
    ("lies", "lie"),
    ("sitting", "sit"),
    ("running", "run"),
    ("putting", "put"),
    ("closing", "close"),
    ("opening", "open"),
    ("tying", "tie"),
    ("dying", "die"),
    ("making", "make"),
    ("getting", "get"),
    ("sneezing", "sneeze"),
    ("laughing", "laugh"),
    ("snuggling", "snuggle"),
    ("closes", "close"),
    ("fixes", "fix"),
    ("watches", "watch"),
    ("tidies", "tidy"),
    ("carries", "carry"),
    ("goes", "go"),
    ("does", "do"),
    ("has", "have"),
    ("dresses", "dress"),
    ("vacuums", "vacuum"),
    ("sweeps", "sweep"),
    ("fixed", "fix"),
    ("closed", "close"),
    ("stopped", "stop"),
    ("tried", "try"),
    ("smiled", "smile"),
    ("dropped", "drop"),
]

# Held-out sentences the lexicon backend gets wrong (see the module docstring); they count in the
# accuracy below but are not required one by one.
KNOWN_MISSES = {
    "The girl then jumps off the diving board into the pool.",  # "diving" read as a verb
    "person goes to bed",  # "to bed" read as an infinitive
    "the coffee cups on the table",  # a noun compound read as subject + verb
    "person texts on the phone",  # LemmInflect has no verb "text"
}


def _accuracy(cases):
    return sum(verb_lemmas(sentence) == want for sentence, want in cases) / len(cases)


def test_enough_cases_of_every_kind():
    assert len(DEVELOPMENT) >= 60 and len(HELD_OUT) >= 60 and len(VERB_FORMS) >= 50
    words = " ".join(s for s, _ in DEVELOPMENT).split()
    assert (
        sum(w.endswith("ing") for w in words) >= 10 and sum(w in ("is", "are", "was", "has", "can") for w in words) >= 6
    )


@pytest.mark.parametrize("sentence,want", [c for c in DEVELOPMENT + HELD_OUT if c[0] not in KNOWN_MISSES])
def test_verb_lemmas_of_each_sentence(sentence, want):
    # The cases pin the lexicon backend (spaCy's, when installed, is the reference rule itself).
    assert tuple(dict.fromkeys(lemma_ for _, _, lemma_ in verbs._lexicon_verbs(sentence))) == want


def test_accuracy_of_the_active_backend():
    # Lexicon backend: 78/78 on DEVELOPMENT, 78/82 on HELD_OUT. spaCy must do at least as well as the
    # floor too, or the cases are wrong.
    assert _accuracy(DEVELOPMENT) >= 0.95
    assert _accuracy(HELD_OUT) >= 0.9


@pytest.mark.parametrize("form,want", VERB_FORMS)
def test_lemma_of_inflected_forms(form, want):
    assert lemma(form) == want
    assert lemma(form.upper()) == want and lemma(f"  {form} ") == want


def test_auxiliaries_and_copulas_are_not_verbs():
    for sentence in ("it is", "they are here", "he was", "she can", "the door is open", "the cups were on the table"):
        assert verb_lemmas(sentence) == (), sentence
    # Auxiliaries out, the verbs they carry in.
    assert verb_lemmas("the person has opened the window") == ("open",)
    assert verb_lemmas("the person does not close the laptop") == ("close",)
    assert verb_lemmas("someone can open the door") == ("open",)
    assert verb_lemmas("a person was tying their shoes") == ("tie",)
    # "have" and "do" as main verbs stay (spaCy tags them VERB).
    assert verb_lemmas("a person had a sandwich") == ("have",)
    assert verb_lemmas("the person did the laundry") == ("do",)


def test_order_of_appearance_without_repeats():
    assert verb_lemmas("a person opens the door, closes it and opens it again") == ("open", "close")
    assert verb_lemmas("person sat on the floor and played with a cat") == ("sit", "play")


def test_spans_point_at_the_verbs():
    sentence = "Person [closes] the door, then walks away."
    spans = verb_spans(sentence)
    assert [(sentence[s:e], lemma_) for s, e, lemma_ in spans] == [("closes", "close"), ("walks", "walk")]


@pytest.mark.parametrize(
    "text",
    ["", "   ", "!!!", "\x00\x01", "ünïcödé wörds everywhere", "123 456.7", "<answer></answer>", "a" * 5000,
     "can't won't don't isn't", "\u202eevil\u202c text", "🙂 person 🙂 opens 🙂", "'s 's n't"],
)  # fmt: skip
def test_total_on_odd_text(text):
    result = verb_lemmas(text)
    assert isinstance(result, tuple) and all(isinstance(v, str) and v for v in result)


def test_long_text_is_cut_and_fast():
    import time

    text = " ".join(["person opens the door and walks away"] * 400)  # 2800 tokens
    tick = time.perf_counter()
    spans = verb_spans(text)
    assert time.perf_counter() - tick < 2.0
    assert spans and max(e for _, e, _ in spans) <= len(" ".join(text.split()[:MAX_TOKENS]))


# --- The synthetic set's recorded verbs against the tagger ---------------------------------------------------

TASK_VERBS = {"find", "locate"}  # verbs that name the task, not the event
# Phrasings that name a state, not a change: their recorded verb is the caption's.
STATIVE = {(False, "grow"), (False, "shrink"), (False, "appear"), (False, "change_colour"), (True, "grow"), (True, "shrink")}


def _fields():
    for shape, colour, direction, new_colour in itertools.product(
        scenes.SHAPES, scenes.COLOURS, ("left", "right", "up", "down"), ("green", "purple")
    ):
        yield {"obj": f"{colour} {shape}", "colour": colour, "direction": direction, "new_colour": new_colour}


def test_every_synthetic_query_contains_its_recorded_verbs():
    tables = {False: (scenes._EXPLICIT, scenes._CAPTION), True: (scenes._TASK, scenes._CAPTION)}
    assert set(tables) == set(scenes._QUERY_VERBS)
    stative = set()
    for task, (queries, captions) in tables.items():
        recorded_by_kind = scenes._QUERY_VERBS[task]
        assert set(recorded_by_kind) == set(scenes.EVENT_KINDS) == set(queries)
        for kind in scenes.EVENT_KINDS:
            recorded = set(recorded_by_kind[kind])
            assert recorded and not recorded & TASK_VERBS
            for fields in itertools.islice(_fields(), 0, None, 7):
                found = set(verb_lemmas(queries[kind].format(**fields)))
                if recorded <= found:
                    continue
                # A state ("bigger"): the query has no event verb and the caption has the recorded one.
                assert found <= TASK_VERBS, (queries[kind], found, recorded)
                assert recorded <= set(verb_lemmas(captions[kind].format(**fields))), captions[kind]
                stative.add((task, kind))
    assert stative == STATIVE


def test_described_events_record_the_verbs_of_their_phrasing():
    rng = np.random.default_rng(0)
    cfg = scenes.SceneConfig()
    for _ in range(40):
        scene = scenes.sample_scene(rng, cfg)
        for event in scene.events:
            text = scenes.describe(scene, event, rng, cfg.task_phrasing)
            in_query = set(verb_lemmas(text.query))
            assert set(text.verbs) <= in_query or (
                in_query <= TASK_VERBS and set(text.verbs) <= set(verb_lemmas(text.caption))
            ), (text.query, text.verbs)
