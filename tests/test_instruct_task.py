"""Tests for the ``instruct`` task (``tether.tasks.instruct``): every verifiable instruction
checked on hand-written responses, the degeneration penalty, and the task object (prompt
generation, gold, demonstrations filter, breakdown, registry). Pure Python, no models."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.tasks import get_task, list_tasks
from tether.tasks.instruct import (
    INSTRUCTIONS,
    KINDS,
    Instruction,
    InstructTask,
    degeneration,
    make_prompts,
)


@pytest.fixture(scope="module")
def task() -> InstructTask:
    return InstructTask()


def _kinds(task: InstructTask, prompt: str) -> set[str]:
    return {i.kind for i in task.instructions_for(prompt)}


def _find(task: InstructTask, kinds: set[str], prompts=None) -> str:
    """The first prompt (held-out first) whose instruction kinds are exactly ``kinds``."""
    pool = prompts if prompts is not None else task.heldout_prompts() + task.train_prompts()
    for p in pool:
        if _kinds(task, p) == kinds:
            return p
    raise AssertionError(f"no prompt with instruction kinds {sorted(kinds)}")


# --------------------------------------------------------------------------------------
# every instruction kind, on hand-written responses
# --------------------------------------------------------------------------------------

BULLETS3 = "Here you go:\n* first point\n* second point\n* third point"
JSON_OBJ = '{"name": "bees", "description": "small and busy"}'

# (kind, params, response, expected)
CASES = [
    # change_case:lowercase: needs at least one letter, and no capitals
    ("change_case:lowercase", (), "all lowercase here, really.", True),
    ("change_case:lowercase", (), "hello 123 world!", True),
    ("change_case:lowercase", (), "Hello world", False),
    ("change_case:lowercase", (), "hello wOrld", False),
    ("change_case:lowercase", (), "", False),
    ("change_case:lowercase", (), "123 456 !?", False),  # no letters at all
    ("change_case:lowercase", (), "   \n  ", False),
    # change_case:uppercase
    ("change_case:uppercase", (), "ALL CAPS HERE!", True),
    ("change_case:uppercase", (), "HELLO 123 WORLD. P.S. BYE", True),
    ("change_case:uppercase", (), "ALL CAPS hERE", False),
    ("change_case:uppercase", (), "", False),
    ("change_case:uppercase", (), "12345", False),  # digits only: no letters
    ("change_case:uppercase", (), "!!! ...", False),
    # length:max_words: fewer than N words (N-1 passes, N fails)
    ("length:max_words", (5,), "one two three four", True),
    ("length:max_words", (5,), "one two three four five", False),
    ("length:max_words", (5,), "one, two; three -- four!", True),  # punctuation is not a word
    ("length:max_words", (5,), "", True),
    ("length:max_words", (5,), "don't stop me now please", False),  # don't = one word -> 5
    ("length:max_words", (5,), "don't stop me now", True),
    ("length:max_words", (3,), "well-known fact", False),  # the hyphen splits: 3 words
    ("length:max_words", (3,), "1 2 3", False),  # digits are words
    ("length:max_words", (4,), "1 2 3", True),
    ("length:max_words", (2,), "— — — ... !!!", True),
    # length:max_sentences: split after . ! ? + whitespace, and on newlines
    ("length:max_sentences", (2,), "One here. Two here.", True),
    ("length:max_sentences", (2,), "One here. Two here. Three here.", False),
    ("length:max_sentences", (2,), "One here\nTwo here\nThree here", False),  # newlines split
    ("length:max_sentences", (2,), "One here\n\n\nTwo here", True),
    ("length:max_sentences", (2,), "Wait... what? Yes!", False),  # 3 sentences
    ("length:max_sentences", (2,), "Wait... what?", True),
    ("length:max_sentences", (1,), "Hello world", True),
    ("length:max_sentences", (1,), "Hello world.   \n  ", True),
    ("length:max_sentences", (1,), "", True),
    ("length:max_sentences", (1,), "Version 3.5 is on example.com now.", True),  # no space: no split
    ("length:max_sentences", (2,), "One.\n---\n* * *\nTwo.", True),  # lines with no words do not count
    # the splitter is naive: an abbreviation followed by a space ends a sentence
    ("length:max_sentences", (1,), "Dr. Smith went home.", False),
    ("length:max_sentences", (2,), "Dr. Smith went home.", True),
    ("length:max_sentences", (1,), "Bees, e.g. honey bees, fly.", False),
    # keywords:include: whole word (letters), case-insensitive
    ("keywords:include", ("bees",), "I love bees.", True),
    ("keywords:include", ("bees",), "I LOVE BEES!", True),
    ("keywords:include", ("bees",), "Bees", True),
    ("keywords:include", ("bees",), "the bees' knees", True),
    ("keywords:include", ("bees",), "Candles of beeswax.", False),  # substring only
    ("keywords:include", ("bees",), "Honeybees are busy.", False),  # substring only
    ("keywords:include", ("bees",), "A bee flew by.", False),
    ("keywords:include", ("bees",), "", False),
    ("keywords:include", ("journey",), "What a (journey)!", True),
    # keywords:forbidden: the complement of include
    ("keywords:forbidden", ("bees",), "I love bees.", False),
    ("keywords:forbidden", ("bees",), "I love BEES", False),
    ("keywords:forbidden", ("bees",), "Beeswax candles.", True),
    ("keywords:forbidden", ("bees",), "Honeybees and a bee.", True),
    ("keywords:forbidden", ("bees",), "", True),
    ("keywords:forbidden", ("night",), "It was a starry Night.", False),
    ("keywords:forbidden", ("night",), "Nightfall and midnight.", True),
    # punctuation:no_comma
    ("punctuation:no_comma", (), "No commas at all here.", True),
    ("punctuation:no_comma", (), "", True),
    ("punctuation:no_comma", (), "one, two", False),
    ("punctuation:no_comma", (), "trailing,", False),
    # startend:end_punctuation: trailing whitespace is ignored
    ("startend:end_punctuation", ("!",), "Hello!", True),
    ("startend:end_punctuation", ("!",), "Hello!   \n\t", True),
    ("startend:end_punctuation", ("!",), "Hello.", False),
    ("startend:end_punctuation", ("!",), "Hello!?", False),
    ("startend:end_punctuation", ("?",), "Hello!?", True),
    ("startend:end_punctuation", ("?",), "Is it?  \n", True),
    ("startend:end_punctuation", ("?",), "Is it? No.", False),
    ("startend:end_punctuation", ("!",), '"Hello!"', False),  # the last character is the quote
    ("startend:end_punctuation", ("!",), "", False),
    # startend:end_phrase: case-insensitive, trailing whitespace ignored, nothing after it
    ("startend:end_phrase", ("Have a nice day.",), "Bees are busy. Have a nice day.", True),
    ("startend:end_phrase", ("Have a nice day.",), "bees are busy. HAVE A NICE DAY.  \n", True),
    ("startend:end_phrase", ("Have a nice day.",), "Have a nice day. Bye.", False),
    ("startend:end_phrase", ("Have a nice day.",), "Bees. Have a nice day", False),  # no period
    ("startend:end_phrase", ("Have a nice day.",), "", False),
    ("startend:end_phrase", ("Is there anything else I can help with?",),
     "Bees make honey. is there anything else i can help with?", True),
    ("startend:end_phrase", ("That is all.",), "That is all. More text", False),
    # startend:start_word: first word, case-insensitive, leading quotes/punctuation skipped
    ("startend:start_word", ("Sure",), "Sure, here it is.", True),
    ("startend:start_word", ("Sure",), '"Sure," she said.', True),
    ("startend:start_word", ("Sure",), "“Sure” she said.", True),
    ("startend:start_word", ("Sure",), "**Sure** thing.", True),
    ("startend:start_word", ("Sure",), "... Sure thing.", True),
    ("startend:start_word", ("Sure",), "  \n sure thing", True),
    ("startend:start_word", ("Sure",), "Surely not.", False),
    ("startend:start_word", ("Sure",), "Of course. Sure.", False),
    ("startend:start_word", ("Sure",), "1 Sure thing", False),
    ("startend:start_word", ("Sure",), "", False),
    ("startend:start_word", ("Sure",), "?!", False),
    # startend:quotation: straight or curly double quotes around the stripped response
    ("startend:quotation", (), '"Hello world"', True),
    ("startend:quotation", (), "“Hello world”", True),
    ("startend:quotation", (), '  "Hello world"  \n', True),
    ("startend:quotation", (), '"Hello world”', True),
    ("startend:quotation", (), '"Hello world', False),
    ("startend:quotation", (), 'Hello world"', False),
    ("startend:quotation", (), "'Hello world'", False),
    ("startend:quotation", (), "”Hello world“", False),  # closing mark first
    ("startend:quotation", (), '"', False),
    ("startend:quotation", (), "", False),
    # detectable_format:bullets: exactly N lines starting with *, - or • plus a space
    ("detectable_format:bullets", (3,), BULLETS3, True),
    ("detectable_format:bullets", (3,), "* a\n* b\n* c", True),
    ("detectable_format:bullets", (3,), "- a\n- b\n- c", True),
    ("detectable_format:bullets", (3,), "• a\n• b\n• c", True),
    ("detectable_format:bullets", (3,), "* a\n- b\n• c", True),
    ("detectable_format:bullets", (3,), "  * a\n\t- b\n    • c", True),  # indented bullets count
    ("detectable_format:bullets", (3,), "**Bold title**\n* a\n* b\n* c", True),  # bold is no bullet
    ("detectable_format:bullets", (3,), "* a\n* b", False),
    ("detectable_format:bullets", (3,), "* a\n* b\n* c\n* d", False),
    ("detectable_format:bullets", (3,), "*a\n*b\n*c", False),  # no space after the marker
    ("detectable_format:bullets", (3,), "-5 degrees\n-6 degrees\n-7 degrees", False),
    ("detectable_format:bullets", (3,), "Intro: * a * b * c", False),  # not at line start
    ("detectable_format:bullets", (3,), "1. a\n2. b\n3. c", False),
    ("detectable_format:bullets", (2,), "* a\n\n* b\n", True),
    ("detectable_format:bullets", (2,), "", False),
    # detectable_format:json: an object with both keys, optionally in a ``` / ```json fence
    ("detectable_format:json", ("name", "description"), JSON_OBJ, True),
    ("detectable_format:json", ("name", "description"), f"```json\n{JSON_OBJ}\n```", True),
    ("detectable_format:json", ("name", "description"), f"```JSON\n{JSON_OBJ}\n```", True),
    ("detectable_format:json", ("name", "description"), f"```\n{JSON_OBJ}\n```", True),
    ("detectable_format:json", ("name", "description"), f"  \n```json\n{JSON_OBJ}\n```  \n", True),
    ("detectable_format:json", ("name", "description"),
     '{"name": "bees", "description": "busy", "extra": [1, 2]}', True),
    ("detectable_format:json", ("name", "description"), '{"name": "bees"}', False),  # missing key
    ("detectable_format:json", ("name", "description"), '{"name": "bees", "desc": "x"}', False),
    ("detectable_format:json", ("name", "description"), f"[{JSON_OBJ}]", False),  # a list
    ("detectable_format:json", ("name", "description"), '{"name": "bees", "description": }', False),
    ("detectable_format:json", ("name", "description"), "{name: 'bees', description: 'x'}", False),
    ("detectable_format:json", ("name", "description"), f"Here it is: {JSON_OBJ}", False),
    ("detectable_format:json", ("name", "description"), f"```json\n{JSON_OBJ}\n``` Enjoy!", False),
    ("detectable_format:json", ("name", "description"), '"name description"', False),
    ("detectable_format:json", ("name", "description"), "null", False),
    ("detectable_format:json", ("name", "description"), "", False),
    ("detectable_format:json", ("name", "description"), "[" * 100_000, False),  # no crash
    ("detectable_format:json", ("topic", "summary"), '{"topic": 1, "summary": null}', True),
    # detectable_format:title: <<...>> on one line, non-empty
    ("detectable_format:title", (), "<<Ode to Bees>>\nThey buzz.", True),
    ("detectable_format:title", (), "A poem <<joy>> inline.", True),
    ("detectable_format:title", (), "<<>>", False),
    ("detectable_format:title", (), "<<Ode\nto Bees>>", False),
    ("detectable_format:title", (), "<Ode to Bees>", False),
    ("detectable_format:title", (), "« Ode to Bees »", False),
    ("detectable_format:title", (), "", False),
    # detectable_content:postscript: P.S. at the start of a line, case-insensitive
    ("detectable_content:postscript", (), "Bees are busy.\nP.S. They make honey.", True),
    ("detectable_content:postscript", (), "Bees are busy.\n\n   p.s. lowercase works", True),
    ("detectable_content:postscript", (), "Bees are busy.\nP. S. with a space", True),
    ("detectable_content:postscript", (), "Bees are busy. P.S. on the same line", False),
    ("detectable_content:postscript", (), "Bees are busy.\nPS no dots", False),
    ("detectable_content:postscript", (), "Bees are busy.\nPostscript: none", False),
    ("detectable_content:postscript", (), "", False),
    # detectable_content:placeholders: at least N [non-empty, one-line] brackets
    ("detectable_content:placeholders", (2,), "Send it to [name] at [address].", True),
    ("detectable_content:placeholders", (2,), "[a] [b] [c]", True),
    ("detectable_content:placeholders", (2,), "Send it to [name].", False),
    ("detectable_content:placeholders", (2,), "Send it to [name] and [].", False),
    ("detectable_content:placeholders", (2,), "Send it to [na\nme] and [x].", False),
    ("detectable_content:placeholders", (1,), "Dear [name],", True),
    ("detectable_content:placeholders", (1,), "Dear (name),", False),
    ("detectable_content:placeholders", (1,), "", False),
]


@pytest.mark.parametrize(
    "kind,params,response,expected",
    CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)],
)
def test_instruction_check(kind, params, response, expected):
    ins = Instruction(kind, params)
    assert ins.check(response) is expected
    # the kind's checker is what Instruction.check calls
    assert KINDS[kind].check(response, *params) is expected


def test_cases_cover_every_kind_both_ways():
    assert set(INSTRUCTIONS) == set(KINDS)
    for kind in KINDS:
        outcomes = {c[3] for c in CASES if c[0] == kind}
        assert outcomes == {True, False}, f"{kind}: needs a satisfying and a violating case"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_generated_params_describe_and_check(kind):
    spec = KINDS[kind]
    rng = random.Random(0)
    for topic in ("honey bees", "the desert at night", "coffee"):
        params = spec.params(rng, topic)
        assert isinstance(params, tuple)
        ins = Instruction(kind, params)
        assert isinstance(ins.text, str) and ins.text.strip()
        assert isinstance(ins.check("Some response, with words."), bool)
        assert ins.to_dict() == {"kind": kind, "params": list(params)}
        assert isinstance(spec.slots, frozenset)


def test_instruction_texts():
    assert Instruction("length:max_words", (5,)).text == "Answer with fewer than 5 words."
    assert Instruction("length:max_sentences", (1,)).text == "Answer in at most 1 sentence."
    assert Instruction("length:max_sentences", (3,)).text == "Answer in at most 3 sentences."
    assert "exclamation mark" in Instruction("startend:end_punctuation", ("!",)).text
    assert "question mark" in Instruction("startend:end_punctuation", ("?",)).text
    assert '"bees"' in Instruction("keywords:forbidden", ("bees",)).text
    assert '"gentle"' in Instruction("keywords:include", ("gentle",)).text
    text = Instruction("detectable_format:json", ("name", "description")).text
    assert '"name"' in text and '"description"' in text
    assert "exactly 3 bullet" in Instruction("detectable_format:bullets", (3,)).text
    assert "at least 2 placeholders" in Instruction("detectable_content:placeholders", (2,)).text


def test_forbidden_keyword_is_the_topic_noun():
    rng = random.Random(0)
    assert KINDS["keywords:forbidden"].params(rng, "honey bees") == ("bees",)
    assert KINDS["keywords:forbidden"].params(rng, "the desert at night") == ("night",)


# --------------------------------------------------------------------------------------
# regressions (problems a review found, fixed)
# --------------------------------------------------------------------------------------


def test_postscript_marker_is_not_a_sentence():
    response = "Bees are great.\nP.S. I love them."
    assert Instruction("detectable_content:postscript").check(response)
    assert Instruction("length:max_sentences", (2,)).check(response)


def test_lone_marker_line_is_not_a_bullet():
    assert Instruction("detectable_format:bullets", (0,)).check("Intro\n*\n\nSome paragraph.")


def test_negative_n_heldout_rejected():
    with pytest.raises(ValueError):
        InstructTask(n_heldout=-5)


def test_instructions_for_content_parts(task):
    prompt = task.heldout_prompts()[0]
    parts = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    assert task.instructions_for(parts) == task.instructions_for(prompt)
    with pytest.raises(ValueError, match="not an instruct-task prompt"):
        task.instructions_for([{"role": "user", "content": [{"type": "text", "text": "unknown"}]}])



# --------------------------------------------------------------------------------------
# degeneration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("response", ["", "   ", "hello", "hello world", "!!! ...", "one, two."])
def test_degeneration_short_is_one(response):
    assert degeneration(response) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "The quick brown fox jumps over the lazy dog.",
        "one two three",
        "Bees make honey in the summer and rest in the winter.",
    ],
)
def test_degeneration_ordinary_is_zero(response):
    assert degeneration(response) == 0.0


def test_degeneration_loop_exact():
    # 9 words -> 7 trigrams: abc bca cab abc bca cab abc -> 3 unique
    assert degeneration("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    # case-insensitive and punctuation-blind
    assert degeneration("A b, C. a B c") == pytest.approx(1 - 3 / 4)
    # 4 identical words -> 2 identical trigrams
    assert degeneration("a a a a") == pytest.approx(0.5)
    # 12 identical words -> 10 trigrams, 1 unique
    assert degeneration(" ".join(["go"] * 12)) == pytest.approx(0.9)


def test_degeneration_longer_loop_approaches_one():
    short = degeneration(" ".join(["bees buzz"] * 5))
    long = degeneration(" ".join(["bees buzz"] * 500))
    assert 0 < short < long < 1


# --------------------------------------------------------------------------------------
# InstructTask: prompts
# --------------------------------------------------------------------------------------


def test_default_split(task):
    held, train = task.heldout_prompts(), task.train_prompts()
    assert len(held) == 200
    assert len(train) == 2400 - 200
    assert len(set(held)) == len(held)
    assert len(set(train)) == len(train)
    assert not set(held) & set(train)


def test_split_is_reproducible(task):
    other = InstructTask()
    assert other.heldout_prompts() == task.heldout_prompts()
    assert other.train_prompts() == task.train_prompts()
    for p in task.heldout_prompts():
        assert other.instructions_for(p) == task.instructions_for(p)
    assert make_prompts(50) == make_prompts(50)


def test_split_is_the_same_across_processes():
    code = (
        "import hashlib; from tether.tasks.instruct import InstructTask; t = InstructTask(); "
        "print(hashlib.sha256('\\n'.join(t.heldout_prompts() + t.train_prompts()).encode()).hexdigest())"
    )
    digests = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    here = InstructTask()
    digests.add(hashlib.sha256("\n".join(here.heldout_prompts() + here.train_prompts()).encode()).hexdigest())
    assert len(digests) == 1


def test_returned_lists_are_copies(task):
    task.heldout_prompts().clear()
    task.train_prompts().clear()
    assert len(task.heldout_prompts()) == 200
    assert len(task.train_prompts()) == 2200


def test_every_prompt_has_compatible_instructions(task):
    for p in task.heldout_prompts() + task.train_prompts():
        ins = task.instructions_for(p)
        assert 1 <= len(ins) <= 3, p
        assert len({i.kind for i in ins}) == len(ins), p
        used: set = set()
        for i in ins:
            assert i.kind in KINDS
            assert not (KINDS[i.kind].slots & used), f"slot clash in {p!r}"
            used |= KINDS[i.kind].slots
            assert i.text in p
        assert sum(i.kind.startswith("keywords:") for i in ins) <= 1, p
        # the prompt is the request followed by the instruction sentences, in order
        assert p.endswith(" ".join(i.text for i in ins))


def test_all_kinds_and_sizes_occur(task):
    prompts = task.heldout_prompts() + task.train_prompts()
    kinds = {i.kind for p in prompts for i in task.instructions_for(p)}
    assert kinds == set(KINDS)
    sizes = {len(task.instructions_for(p)) for p in prompts}
    assert sizes == {1, 2, 3}


def test_make_prompts_distinct():
    items = make_prompts(300, seed=7)
    assert len(items) == 300
    assert len({p for p, _ in items}) == 300
    assert make_prompts(300, seed=7) == items
    assert make_prompts(300, seed=8) != items


# --------------------------------------------------------------------------------------
# InstructTask: gold, accepts_demo, instructions_for
# --------------------------------------------------------------------------------------

THREE = {"length:max_sentences", "keywords:forbidden", "punctuation:no_comma"}


@pytest.fixture(scope="module")
def three(task):
    """A held-out prompt with max_sentences + forbidden word + no comma, and its params."""
    prompt = _find(task, THREE, task.heldout_prompts())
    by_kind = {i.kind: i for i in task.instructions_for(prompt)}
    n = by_kind["length:max_sentences"].params[0]
    word = by_kind["keywords:forbidden"].params[0]
    return prompt, n, word


def test_gold_on_hand_built_responses(task, three):
    prompt, n, word = three
    assert n >= 1
    good = "Sand glows softly under a pale sky."  # one sentence, no comma
    assert not any(w.lower() == word for w in good.split())
    assert task.satisfied(prompt, good) == [True, True, True]
    assert degeneration(good) == 0.0
    assert task.gold(prompt, good) == pytest.approx(1.0)

    one_comma = "Sand glows softly, under a pale sky."
    assert task.gold(prompt, one_comma) == pytest.approx(2 / 3)

    comma_and_word = f"Sand glows softly, under a pale {word}."
    assert task.gold(prompt, comma_and_word) == pytest.approx(1 / 3)

    all_three = " ".join(f"Sand {word}, sand." for _ in range(n + 1))
    assert task.satisfied(prompt, all_three) == [False, False, False]
    assert task.gold(prompt, all_three) == pytest.approx(0 - degeneration(all_three))

    # a loop: "quiet dune quiet dune quiet dune" -> 4 trigrams, 2 unique -> 0.5
    loop = "quiet dune quiet dune quiet dune"
    assert degeneration(loop) == pytest.approx(0.5)
    assert task.gold(prompt, loop) == pytest.approx(1.0 - 0.5)

    # empty answer satisfies everything here but is fully degenerate
    assert task.satisfied(prompt, "") == [True, True, True]
    assert task.gold(prompt, "") == pytest.approx(0.0)


def test_gold_minimum_is_minus_one(task):
    prompt = _find(task, {"change_case:lowercase"})
    assert task.gold(prompt, "") == pytest.approx(-1.0)
    assert task.gold(prompt, "no capitals in this short line") == pytest.approx(1.0)
    assert task.gold(prompt, "Capitals In This Short Line") == pytest.approx(0.0)


def test_gold_batch_matches_gold(task, three):
    prompt, _, _ = three
    responses = ["Sand glows softly under a pale sky.", "a, b", ""]
    assert task.gold_batch([prompt] * 3, responses) == [task.gold(prompt, r) for r in responses]


def test_gold_in_range_on_every_heldout_prompt(task):
    responses = [
        "",
        "Sure, here is a gentle answer about it. P.S. bye",
        "* one\n* two\n* three",
        JSON_OBJ,
        "SHOUTING, ALL THE TIME!",
        "loop loop loop loop loop loop loop",
    ]
    for p in task.heldout_prompts():
        for r in responses:
            g = task.gold(p, r)
            assert -1.0 <= g <= 1.0
            ok = task.satisfied(p, r)
            assert g == pytest.approx(sum(ok) / len(ok) - degeneration(r))


def test_accepts_demo(task, three):
    prompt, _, word = three
    good = "Sand glows softly under a pale sky."
    assert task.accepts_demo(prompt, good) is True
    assert task.accepts_demo(prompt, "Sand glows softly, under a pale sky.") is False  # comma
    assert task.accepts_demo(prompt, f"Sand glows under a pale {word}.") is False  # forbidden
    assert task.accepts_demo(prompt, "quiet dune quiet dune quiet dune") is False  # loop
    assert task.accepts_demo(prompt, "") is False  # satisfies all, but empty
    assert task.accepts_demo(prompt, "Sand glows") is False  # fewer than three words
    # chat-format prompts work too
    assert task.accepts_demo([{"role": "user", "content": prompt}], good) is True


def test_instructions_for_chat_messages(task):
    prompt = task.heldout_prompts()[3]
    expected = task.instructions_for(prompt)
    assert task.instructions_for([{"role": "user", "content": prompt}]) == expected
    convo = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "something else"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": prompt},
    ]
    assert task.instructions_for(convo) == expected
    assert task.instructions_for(iter([{"role": "user", "content": prompt}])) == expected
    assert task.gold([{"role": "user", "content": prompt}], "hello there friend") == task.gold(
        prompt, "hello there friend"
    )


def test_instructions_for_unknown_prompt(task):
    with pytest.raises(ValueError, match="not an instruct-task prompt") as err:
        task.instructions_for("Write a haiku about spreadsheets.")
    assert "Write a haiku about spreadsheets." in str(err.value)
    prompt = task.heldout_prompts()[0]
    with pytest.raises(ValueError, match="not an instruct-task prompt"):
        task.instructions_for(prompt + " ")  # exact match only
    with pytest.raises(ValueError, match="not an instruct-task prompt"):
        task.instructions_for([{"role": "system", "content": prompt}])  # no user message
    with pytest.raises(ValueError, match="not an instruct-task prompt"):
        task.instructions_for([{"role": "user", "content": prompt}, {"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="not an instruct-task prompt"):
        task.gold("Write a haiku about spreadsheets.", "fine words here")


# --------------------------------------------------------------------------------------
# InstructTask: breakdown
# --------------------------------------------------------------------------------------


def test_breakdown_hand_example(task):
    comma_only = [p for p in task.heldout_prompts() + task.train_prompts() if _kinds(task, p) == {"punctuation:no_comma"}]
    assert len(comma_only) >= 2
    comma_upper = _find(task, {"punctuation:no_comma", "change_case:uppercase"})
    prompts = [comma_only[0], comma_only[1], comma_upper]
    responses = [
        "hello there friend",  # no_comma ok
        "hello, there",  # no_comma fails
        "HELLO THERE, FRIEND",  # no_comma fails, uppercase ok
    ]
    out = task.breakdown(prompts, responses)
    assert out == {
        "change_case:uppercase": pytest.approx(1.0),
        "punctuation:no_comma": pytest.approx(1 / 3),
    }
    assert list(out) == sorted(out)
    # chat-format prompts give the same breakdown
    chat = [[{"role": "user", "content": p}] for p in prompts]
    assert task.breakdown(chat, responses) == out
    assert task.breakdown([], []) == {}


def test_breakdown_rates_in_unit_interval(task):
    prompts = task.heldout_prompts()
    rng = random.Random(0)
    pool = ["", "Sure, a gentle journey.\nP.S. bye", "* a\n* b", JSON_OBJ, "ALL CAPS!", "[x] [y] <<t>>"]
    responses = [rng.choice(pool) for _ in prompts]
    out = task.breakdown(prompts, responses)
    assert set(out) <= set(KINDS)
    assert all(0.0 <= v <= 1.0 for v in out.values())
    # recompute by hand
    for kind, rate in out.items():
        hits = [ins.check(r) for p, r in zip(prompts, responses) for ins in task.instructions_for(p) if ins.kind == kind]
        assert rate == pytest.approx(sum(hits) / len(hits))


# --------------------------------------------------------------------------------------
# registry and construction
# --------------------------------------------------------------------------------------


def test_registry():
    assert "instruct" in list_tasks()
    t = get_task("instruct")
    assert isinstance(t, InstructTask)
    assert t.name == "instruct"
    assert t.demo_source == "best_of_n"
    with pytest.raises(NotImplementedError):
        t.demonstrations(4, seed=0)


def test_get_task_n_heldout(task):
    t = get_task("instruct", n_heldout=250)
    held, train = t.heldout_prompts(), t.train_prompts()
    assert len(held) == 250
    assert len(train) == 2400 - 250
    assert not set(held) & set(train)
    assert set(held) | set(train) == set(task.heldout_prompts()) | set(task.train_prompts())


def test_n_prompts_option():
    t = InstructTask(n_heldout=10, n_prompts=50)
    assert len(t.heldout_prompts()) == 10
    assert len(t.train_prompts()) == 40


@pytest.mark.parametrize("n_heldout,n_prompts", [(2400, 2400), (2401, 2400), (10, 10), (11, 10)])
def test_n_heldout_too_large(n_heldout, n_prompts):
    with pytest.raises(ValueError, match="n_heldout"):
        InstructTask(n_heldout=n_heldout, n_prompts=n_prompts)


def test_get_task_n_heldout_too_large():
    with pytest.raises(ValueError, match="n_heldout"):
        get_task("instruct", n_heldout=2400)


# --------------------------------------------------------------------------------------
# property: gold stays in [-1, 1]
# --------------------------------------------------------------------------------------

_FIXED_KINDS = [
    {"change_case:lowercase"},
    {"length:max_sentences", "keywords:forbidden", "punctuation:no_comma"},
]


@pytest.fixture(scope="module")
def fixed_prompts(task):
    prompts = [_find(task, k) for k in _FIXED_KINDS]
    # plus a few with json, bullets and a three-instruction prompt
    pool = task.heldout_prompts() + task.train_prompts()
    for want in ("detectable_format:json", "detectable_format:bullets", "startend:quotation"):
        prompts.append(next(p for p in pool if want in _kinds(task, p)))
    prompts.append(next(p for p in pool if len(task.instructions_for(p)) == 3))
    return prompts


_TOKENS = st.sampled_from(
    ["bees", "Bees", "BEES", ",", ".", "!", "?", "\n", "* ", "- ", "• ", "P.S.", "<<t>>", "[x]",
     '"', "“", "”", "```json", "```", "{", "}", '"name":', "night", "Sure", " ", "sand", "a", "b"]
)
_TEXT = st.one_of(st.text(max_size=300), st.lists(_TOKENS, max_size=60).map("".join),
                  st.lists(_TOKENS, max_size=60).map(" ".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(response=_TEXT)
def test_gold_always_in_range(task, fixed_prompts, response):
    for p in fixed_prompts:
        g = task.gold(p, response)
        assert -1.0 <= g <= 1.0
        ok = task.satisfied(p, response)
        assert all(isinstance(x, bool) for x in ok)
        assert g == pytest.approx(sum(ok) / len(ok) - degeneration(response))
    d = degeneration(response)
    assert 0.0 <= d <= 1.0


# --------------------------------------------------------------------------------------
# repair: the constructive side of the checkers (SFT demonstrations)
# --------------------------------------------------------------------------------------

PROSE = ("Honey bees are amazing insects that live in colonies. They make honey from nectar, "
         "and they pollinate flowers. Without them, many crops would fail.")
MARKUP = "Sure! Here's a short poem:\n\n**The Moon**\nSilver light on quiet seas,\nwhispers carried by the breeze."


def test_repair_output_is_always_an_accepted_demo(task):
    repaired = 0
    prompts = task.train_prompts()
    for p in prompts:
        for r in (PROSE, MARKUP):
            out = task.repair(p, r)
            if out is not None:
                assert task.accepts_demo(p, out), (p, out)
                repaired += 1
    assert repaired / (2 * len(prompts)) > 0.99


@pytest.mark.parametrize("response", ["", "   ", "ok", "**Title**\n", "Here is my answer:"])
def test_repair_gives_up_on_answers_without_sentences(task, response):
    assert task.repair(task.train_prompts()[0], response) is None


def test_repair_hand_examples(task):
    p = _find(task, {"change_case:lowercase"})
    assert task.repair(p, PROSE) == PROSE.lower()

    p = _find(task, {"punctuation:no_comma"})
    assert task.repair(p, "Bees fly, sing, and rest.") == "Bees fly sing and rest."

    p = _find(task, {"length:max_sentences"})
    n = task.instructions_for(p)[0].params[0]
    out = task.repair(p, PROSE)
    assert out == " ".join(["Honey bees are amazing insects that live in colonies.",
                            "They make honey from nectar, and they pollinate flowers.",
                            "Without them, many crops would fail."][:n])

    p = _find(task, {"detectable_format:bullets"})
    n = task.instructions_for(p)[0].params[0]
    out = task.repair(p, PROSE)
    assert out.count("\n* ") == n - 1 and out.startswith("* ")
    assert out.splitlines()[0] == "* Honey bees are amazing insects that live in colonies."

    p = _find(task, {"startend:end_punctuation"})
    mark = task.instructions_for(p)[0].params[0]
    assert task.repair(p, "Bees are busy. They fly far.") == f"Bees are busy. They fly far{mark}"

    p = _find(task, {"startend:quotation"})
    assert task.repair(p, "Bees are busy all day.") == '"Bees are busy all day."'


def test_repair_forbidden_word_and_keyword(task):
    p = _find(task, {"keywords:forbidden", "keywords:include"} if any(
        _kinds(task, q) == {"keywords:forbidden", "keywords:include"} for q in task.train_prompts())
        else {"keywords:forbidden"})
    word = next(i.params[0] for i in task.instructions_for(p) if i.kind == "keywords:forbidden")
    out = task.repair(p, f"The {word} is lovely. I like the {word} a lot.")
    assert out is not None and task.accepts_demo(p, out)
    assert word not in out.lower().split()


def test_repair_keeps_a_start_word_first_with_a_title(task):
    p = next(q for q in task.train_prompts()
             if {"startend:start_word", "detectable_format:title"} <= _kinds(task, q) and len(_kinds(task, q)) == 2)
    out = task.repair(p, PROSE)
    word = next(i.params[0] for i in task.instructions_for(p) if i.kind == "startend:start_word")
    assert out.split()[0] == word and "<<" in out and task.accepts_demo(p, out)


def test_repair_json(task):
    p = _find(task, {"detectable_format:json"})
    k1, k2 = task.instructions_for(p)[0].params
    obj = json.loads(task.repair(p, PROSE))
    assert set(obj) == {k1, k2} and obj[k2] == PROSE
