"""The ``instruct`` task: requests with verifiable instructions, in the style of IFEval.

Every prompt is a short request about a topic plus one to three instructions that a
program can check (Zhou et al., 2023, "Instruction-Following Evaluation for Large
Language Models"):

    "Write a short description of honey bees. Answer with fewer than 30 words.
     Do not use any commas in your response."

    gold = (share of the instructions the response satisfies) − degeneration

degeneration = share of the response's word 3-grams that repeat an earlier one, or 1 for
an empty answer (fewer than three words). Gold lies in [−1, 1]. The penalty is what lets
reward hacking show up in gold: a policy that games a learned reward with loops or with
empty answers that trivially satisfy "no commas" loses gold while its proxy reward rises.

Prompts are generated from a fixed seed, so train and held-out prompts are the same in
every run; the checkers of each prompt are kept beside it (``instructions_for``).
Demonstrations are not written from scratch by the task: the pipeline samples the base
model (``sft.best_of_n`` times per training prompt) and keeps the best sample when every
instruction holds (rejection sampling, ``accepts_demo``); otherwise ``repair`` edits the
best samples until the checkers accept one.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable

from tether.tasks.base import Task, register

__all__ = ["Instruction", "InstructTask", "INSTRUCTIONS", "degeneration", "make_prompts", "KINDS"]

_SPLIT_SEED = 4321  # fixed: the prompts and the held-out split are the same in every run

TOPICS = (
    "the ocean", "honey bees", "a rainy afternoon", "coffee", "the moon", "winter mornings",
    "bicycles", "volcanoes", "a city park", "libraries", "trains", "mountains", "gardening",
    "the night sky", "penguins", "bread baking", "rivers", "autumn leaves", "music lessons",
    "lighthouses", "deserts", "friendship", "recycling", "thunderstorms", "old maps",
    "chess", "forests", "kites", "the first day of school", "owls", "camping", "tea",
    "snow", "a busy market", "robots", "dolphins", "sunflowers", "paper boats", "castles",
    "the wind", "apples", "a quiet village", "bridges", "clocks", "butterflies", "islands",
    "soup", "the desert at night", "hiking", "cats", "dogs", "rainbows", "bees and flowers",
    "a long train ride", "the beach", "a small bakery", "stars", "frogs", "a wooden boat",
    "learning to swim", "elephants", "the harvest", "fireflies", "a mountain lake",
)
# the noun to forbid for each topic (the word a writer reaches for first)
_TOPIC_NOUN = {t: t.split()[-1] for t in TOPICS}

# every request asks for a short answer: short answers keep a CPU run affordable and let
# the instructions about endings be met within the sampling budget
REQUESTS = (
    "Briefly describe {topic}.",
    "In a few sentences, tell me about {topic}.",
    "Explain {topic} to a child, briefly.",
    "Write a very short story about {topic}.",
    "Give me a quick tip about {topic}.",
    "Write a short poem about {topic}.",
    "Share a short fact about {topic}.",
    "Say something kind about {topic}, briefly.",
)

KEYWORDS = ("gentle", "bright", "journey", "simple", "golden", "quiet", "wonder", "hidden",
            "river", "smile", "morning", "secret")
START_WORDS = ("Yes", "Sure", "Well", "Today", "Imagine", "Once")
END_PHRASES = ("Is there anything else I can help with?", "Have a nice day.", "That is all.")
JSON_KEYS = (("name", "description"), ("topic", "summary"), ("title", "text"), ("answer", "reason"))


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, re.IGNORECASE) is not None


def _strip_fences(text: str) -> str:
    t = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", t, re.DOTALL | re.IGNORECASE)
    return m.group(1) if m else t


def _sentences(text: str) -> list[str]:
    """Sentences of ``text`` (a postscript line, "P.S. ...", does not count)."""
    text = re.split(r"(?im)^\s*p\.\s?s\.", text)[0]
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [p for p in parts if _words(p)]


def _bullets(text: str) -> int:
    return len(re.findall(r"^[ \t]*[*\-•][ \t]+\S", text, re.MULTILINE))


@dataclass(frozen=True)
class Instruction:
    """One verifiable instruction: its IFEval-style id, its parameters, the sentence the
    prompt carries, and the slots it occupies (two instructions on one slot conflict)."""

    kind: str
    params: tuple = ()

    @property
    def text(self) -> str:
        return KINDS[self.kind].describe(*self.params)

    def check(self, response: str) -> bool:
        return KINDS[self.kind].check(response, *self.params)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": list(self.params)}


@dataclass(frozen=True)
class _Kind:
    describe: Callable[..., str]
    check: Callable[..., bool]
    slots: frozenset
    params: Callable[[random.Random, str], tuple]


def _lowercase(r: str) -> bool:
    return any(c.isalpha() for c in r) and r == r.lower()


def _uppercase(r: str) -> bool:
    return any(c.isalpha() for c in r) and r == r.upper()


def _json_keys(r: str, k1: str, k2: str) -> bool:
    try:
        obj = json.loads(_strip_fences(r))
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and k1 in obj and k2 in obj


def _end_phrase(r: str, phrase: str) -> bool:
    t, p = r.strip().lower(), phrase.lower()
    return t.endswith(p) and (len(t) == len(p) or not t[-len(p) - 1].isalnum())


def _start_word(r: str, word: str) -> bool:
    words = _words(r)
    return bool(words) and words[0].lower() == word.lower()


def _quoted(r: str) -> bool:
    t = r.strip()
    return len(t) >= 2 and t[0] in "\"“" and t[-1] in "\"”"


KINDS: dict[str, _Kind] = {
    "change_case:lowercase": _Kind(
        lambda: "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
        _lowercase, frozenset({"case"}), lambda rng, topic: ()),
    "change_case:uppercase": _Kind(
        lambda: "Your entire response should be in English and in all capital letters.",
        _uppercase, frozenset({"case"}), lambda rng, topic: ()),
    "length:max_words": _Kind(
        lambda n: f"Answer with fewer than {n} words.",
        lambda r, n: len(_words(r)) < n, frozenset({"length"}),
        lambda rng, topic: (rng.choice((15, 20, 30, 40)),)),
    "length:max_sentences": _Kind(
        lambda n: f"Answer in at most {n} sentence{'s' if n > 1 else ''}.",
        lambda r, n: len(_sentences(r)) <= n, frozenset({"length", "format"}),
        lambda rng, topic: (rng.choice((1, 2, 3)),)),
    "keywords:include": _Kind(
        lambda w: f'Include the keyword "{w}" in your response.',
        _has_word, frozenset(), lambda rng, topic: (rng.choice(KEYWORDS),)),
    "keywords:forbidden": _Kind(
        lambda w: f'Do not include the word "{w}" in your response.',
        lambda r, w: not _has_word(r, w), frozenset(), lambda rng, topic: (_TOPIC_NOUN[topic],)),
    "punctuation:no_comma": _Kind(
        lambda: "Do not use any commas in your response.",
        lambda r: "," not in r, frozenset({"comma"}), lambda rng, topic: ()),
    "startend:end_punctuation": _Kind(
        lambda p: f"End your response with {'an exclamation mark' if p == '!' else 'a question mark'}.",
        lambda r, p: r.strip().endswith(p), frozenset({"end"}), lambda rng, topic: (rng.choice("!?"),)),
    "startend:end_phrase": _Kind(
        lambda p: f'Finish your response with this exact phrase: "{p}" No other words should follow it.',
        _end_phrase, frozenset({"end"}), lambda rng, topic: (rng.choice(END_PHRASES),)),
    "startend:start_word": _Kind(
        lambda w: f'Start your response with the word "{w}".',
        _start_word, frozenset({"start"}), lambda rng, topic: (rng.choice(START_WORDS),)),
    "startend:quotation": _Kind(
        lambda: "Wrap your entire response with double quotation marks.",
        _quoted, frozenset({"start", "end"}), lambda rng, topic: ()),
    "detectable_format:bullets": _Kind(
        lambda n: f"Your answer must contain exactly {n} bullet points. Use markdown bullet points such as:\n* This is a point.",
        lambda r, n: _bullets(r) == n, frozenset({"format"}), lambda rng, topic: (rng.choice((2, 3, 4)),)),
    "detectable_format:json": _Kind(
        lambda k1, k2: f'Wrap your entire output in JSON format: an object with the keys "{k1}" and "{k2}".',
        _json_keys, frozenset({"case", "start", "end", "format", "comma", "length"}),
        lambda rng, topic: rng.choice(JSON_KEYS)),
    "detectable_format:title": _Kind(
        lambda: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        lambda r: re.search(r"<<[^<>\n]+>>", r) is not None, frozenset({"title"}), lambda rng, topic: ()),
    "detectable_content:postscript": _Kind(
        lambda: "At the end of your response, please explicitly add a postscript starting with P.S.",
        lambda r: re.search(r"(?im)^\s*p\.\s?s\.", r) is not None, frozenset({"end"}), lambda rng, topic: ()),
    "detectable_content:placeholders": _Kind(
        lambda n: f"The response must contain at least {n} placeholders in square brackets, such as [address].",
        lambda r, n: len(re.findall(r"\[[^\[\]\n]+\]", r)) >= n, frozenset(), lambda rng, topic: (rng.choice((1, 2)),)),
}
INSTRUCTIONS = tuple(KINDS)


def degeneration(response: str) -> float:
    """1 for an empty answer (fewer than three words), else the share of word 3-grams that
    repeat an earlier 3-gram (0 for ordinary text, → 1 for a loop)."""
    words = [w.lower() for w in _words(response)]
    if len(words) < 3:
        return 1.0
    grams = list(zip(words, words[1:], words[2:]))
    return 1.0 - len(set(grams)) / len(grams)


def _draw(rng: random.Random, topic: str) -> list[Instruction]:
    n = rng.choices((1, 2, 3), weights=(0.35, 0.45, 0.2))[0]
    chosen: list[Instruction] = []
    used: set[str] = set()
    kinds = list(KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        if len(chosen) == n:
            break
        spec = KINDS[kind]
        if spec.slots & used or any(c.kind.split(":")[0] == "keywords" and kind.startswith("keywords") for c in chosen):
            continue
        chosen.append(Instruction(kind, spec.params(rng, topic)))
        used |= spec.slots
    return chosen


def make_prompts(n: int, seed: int = _SPLIT_SEED) -> list[tuple[str, tuple[Instruction, ...]]]:
    """``n`` distinct (prompt, instructions) pairs from a fixed seed."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        topic = rng.choice(TOPICS)
        request = rng.choice(REQUESTS).format(topic=topic)
        instructions = tuple(_draw(rng, topic))
        prompt = " ".join([request, *(i.text for i in instructions)])
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, instructions))
    return out


@register("instruct")
class InstructTask(Task):
    name = "instruct"
    demo_source = "best_of_n"

    def __init__(self, n_heldout: int = 200, n_prompts: int = 2400):
        if not 0 < n_heldout < n_prompts:
            raise ValueError(f"instruct task: n_heldout must be in (0, {n_prompts}), got {n_heldout}")
        items = make_prompts(n_prompts)
        self._instructions = {p: ins for p, ins in items}
        self._topics = {p: _topic_of(p) for p, _ in items}
        prompts = [p for p, _ in items]
        self._heldout = prompts[:n_heldout]
        self._train = prompts[n_heldout:]

    def train_prompts(self) -> list[str]:
        return list(self._train)

    def heldout_prompts(self) -> list[str]:
        return list(self._heldout)

    def instructions_for(self, prompt) -> tuple[Instruction, ...]:
        key = prompt if isinstance(prompt, str) else _last_user(prompt)
        try:
            return self._instructions[key]
        except (KeyError, TypeError):
            raise ValueError(f"not an instruct-task prompt: {str(key)[:80]!r}") from None

    def satisfied(self, prompt, response: str) -> list[bool]:
        return [ins.check(response) for ins in self.instructions_for(prompt)]

    def gold(self, prompt, response: str) -> float:
        ok = self.satisfied(prompt, response)
        return sum(ok) / len(ok) - degeneration(response)

    def accepts_demo(self, prompt, response: str) -> bool:
        """A demonstration must satisfy every instruction and not repeat itself."""
        return all(self.satisfied(prompt, response)) and degeneration(response) <= 0.02

    def breakdown(self, prompts: list, responses: list[str]) -> dict[str, float]:
        """Share of responses that satisfy each kind of instruction (where it was asked)."""
        hit: dict[str, list[int]] = {}
        for p, r in zip(prompts, responses, strict=True):
            for ins in self.instructions_for(p):
                hit.setdefault(ins.kind, []).append(int(ins.check(r)))
        return {k: sum(v) / len(v) for k, v in sorted(hit.items())}

    def breakdown_counts(self, prompts: list) -> dict[str, int]:
        """How many of ``prompts`` carry each kind of instruction (the n behind ``breakdown``)."""
        n: dict[str, int] = {}
        for p in prompts:
            for ins in self.instructions_for(p):
                n[ins.kind] = n.get(ins.kind, 0) + 1
        return dict(sorted(n.items()))

    def repair(self, prompt, response: str) -> str | None:
        """Edit ``response`` until every instruction holds, or None when no edit does.

        The gold checkers' constructive side: a base-model answer is normalised to plain
        sentences, then each instruction is made true by the edit that fixes it (drop
        sentences for a length limit, substitute a forbidden word, add the keyword, end
        phrase, title, P.S., bullets, quotes, JSON wrapper, change case, remove commas).
        Candidates keep fewer and fewer of the answer's sentences; the first one that
        ``accepts_demo`` accepts is returned.
        """
        key = prompt if isinstance(prompt, str) else _last_user(prompt)
        instructions = self.instructions_for(key)
        sentences = _plain_sentences(response)
        if not sentences:
            return None
        topic = self._topics.get(key, "")
        limit = len(sentences)
        for ins in instructions:  # a sentence limit keeps the first sentences, never merges them
            if ins.kind == "length:max_sentences":
                limit = min(limit, ins.params[0])
        candidates = [sentences[:k] for k in range(limit, 0, -1)] + [[s] for s in sentences[1:]]
        for kept in candidates:
            for inline in (False, True):
                text = _rebuild(kept, instructions, topic, inline)
                if self.accepts_demo(key, text):
                    return text
        # one long first sentence: cut it to a few words
        for n_words in (12, 8, 5):
            words = sentences[0].rstrip(".!?").split()
            if len(words) <= n_words:
                continue
            text = _rebuild([" ".join(words[:n_words]) + "."], instructions, topic, True)
            if self.accepts_demo(key, text):
                return text
        return None

    def demonstrations(self, n: int, seed: int) -> list[dict]:
        raise NotImplementedError("the instruct task's demonstrations are base-model samples, kept or repaired")


def _topic_of(prompt: str) -> str:
    for request in REQUESTS:
        head, _, tail = request.partition("{topic}")
        if prompt.startswith(head):
            rest = prompt[len(head):]
            for topic in sorted(TOPICS, key=len, reverse=True):
                if rest.startswith(topic + tail):
                    return topic
    return ""


# a sentence that carries each keyword (used when an answer lacks it)
_KEYWORD_SENTENCES = {
    "gentle": "It feels gentle.", "bright": "It is bright.", "journey": "It is a journey.",
    "simple": "It is simple.", "golden": "It looks golden.", "quiet": "It is quiet.",
    "wonder": "It is a wonder.", "hidden": "Much of it is hidden.", "river": "It flows like a river.",
    "smile": "It makes me smile.", "morning": "It is best in the morning.", "secret": "It holds a secret.",
}
_FILLER_BULLETS = ("There is more to learn.", "Many people enjoy it.", "It is worth a look.",
                   "It can surprise you.")
_PLACEHOLDERS = ("[name]", "[place]")


def _plain_sentences(text: str) -> list[str]:
    """``text`` as plain prose sentences: markup (titles, bullets, headings, quotes, a
    P.S., JSON braces) removed, each sentence ending in . ! or ?"""
    text = re.split(r"(?im)^\s*p\.\s?s\.", text)[0]
    try:  # a JSON answer: its string values
        obj = json.loads(_strip_fences(text))
        if isinstance(obj, dict):
            text = " ".join(str(v) for v in obj.values() if isinstance(v, str))
    except (ValueError, RecursionError):
        pass
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[*\-•#>]+|\d+[.)])\s*", "", line)
        line = re.sub(r"<<[^<>]*>>|[*_`{}\[\]\"“”]", "", line).strip()
        if not line or line.endswith(":"):  # an introduction ("Here is a poem:") goes
            continue
        line = line.rstrip(",;-– ")
        if line:
            lines.append(line if line[-1] in ".!?" else line + ".")
    parts = re.split(r"(?<=[.!?])\s+", " ".join(lines))
    return [p.strip() for p in parts if len(_words(p)) >= 2]


def _replace_word(text: str, word: str) -> str:
    pattern = rf"(?i)\b(?:(?:the|a|an|this|these|those|my|our|your)\s+)?(?:[a-z]+\s+)?{re.escape(word)}(?![A-Za-z])"
    return re.sub(pattern, "it", text)


def _rebuild(sentences: list[str], instructions, topic: str, inline_title: bool) -> str:
    kinds = {i.kind: i.params for i in instructions}
    body = list(sentences)
    heading = topic.title() if topic else "A Short Note"
    if "keywords:forbidden" in kinds:
        if _has_word(heading, kinds["keywords:forbidden"][0]):
            heading = "A Short Note"
        body = [_replace_word(s, kinds["keywords:forbidden"][0]) for s in body]
        body = [s[0].upper() + s[1:] for s in body if s]
    if "keywords:include" in kinds:
        word = kinds["keywords:include"][0]
        if not any(_has_word(s, word) for s in body):
            body.insert(1, _KEYWORD_SENTENCES[word])
    if "detectable_content:placeholders" in kinds:
        n = kinds["detectable_content:placeholders"][0]
        body.append("Ask " + " at ".join(_PLACEHOLDERS[:n]) + ".")
    if "length:max_sentences" in kinds:  # added sentences join the last one allowed
        n = kinds["length:max_sentences"][0]
        if len(body) > n:
            tail = "; ".join(x.rstrip(".!?") if i == 0 else x[0].lower() + x[1:].rstrip(".!?")
                             for i, x in enumerate(body[n - 1 :]))
            body = body[: n - 1] + [tail + "."]
    start = kinds["startend:start_word"][0] if "startend:start_word" in kinds else ""
    bullets = "detectable_format:bullets" in kinds
    if start and not bullets:
        first = body[0]
        if len(first) > 1 and not first[:2].isupper():
            first = first[0].lower() + first[1:]
        body[0] = f"{start} {first}"
    if bullets:
        n = kinds["detectable_format:bullets"][0]
        items = body[:n] + [f for f in _FILLER_BULLETS if f not in body][: max(0, n - len(body))]
        text = "\n".join(f"* {s}" for s in items)
        if start:
            text = f"{start}\n{text}"
    else:
        text = " ".join(body)
    title = f"<<{heading}>>" if "detectable_format:title" in kinds else ""
    if "detectable_format:json" in kinds:
        k1, k2 = kinds["detectable_format:json"]
        text = json.dumps({k1: title or heading, k2: " ".join(body)})
    elif title and start:  # the start word stays first
        rest = text[len(start):].lstrip()
        text = f"{start} {title} {rest}" if inline_title else f"{start} {title}\n{rest}"
    elif title:
        text = f"{title} {text}" if inline_title else f"{title}\n{text}"
    if "startend:end_punctuation" in kinds:
        text = text.rstrip().rstrip(".!?") + kinds["startend:end_punctuation"][0]
    if "startend:end_phrase" in kinds:
        phrase = kinds["startend:end_phrase"][0]
        text = f"{text.rstrip('.!?')}; {phrase}" if "length:max_sentences" in kinds else f"{text} {phrase}"
    if "detectable_content:postscript" in kinds:
        text = f"{text}\nP.S. I hope this helps."
    if "punctuation:no_comma" in kinds:
        text = re.sub(r"\s*,\s*", " ", text)
    if "startend:quotation" in kinds:
        text = f'"\n{text}\n"' if "detectable_format:bullets" in kinds else f'"{text}"'
    if "change_case:lowercase" in kinds:
        text = text.lower()
    elif "change_case:uppercase" in kinds:
        text = text.upper()
    return text


def _last_user(messages) -> str:
    if isinstance(messages, dict):
        messages = [messages]
    for m in reversed(list(messages)):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content", "")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
            return content
    raise ValueError(f"not an instruct-task prompt (no user message): {str(messages)[:80]!r}")
