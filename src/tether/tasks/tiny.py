"""The ``tiny`` task: write N words about one or two topics.

A synthetic task small enough for a randomly initialised 2-layer model, with a gold score
that rewards what a good answer does and penalises degeneration:

    prompt   "write five words about fruits and tools"
    response "apple saw fig drill axe"

    gold = 0.5 · on_topic + 0.2 · coverage + 0.3 · length_fit − 0.5 · stutter

- on_topic: share of response words that belong to a requested topic;
- coverage: share of requested topics mentioned at least once;
- length_fit: max(0, 1 − |len − N| / N);
- stutter: share of words equal to the word just before (a degeneration penalty).

An empty response scores −0.5. Gold lies in [−0.5, 1]. Demonstrations come from a noisy
demonstrator (on topic 55% of the time, length off by up to two), so SFT is decent but
far from perfect and there is room for preference learning to help.
"""

from __future__ import annotations

import random

from tether.tasks.base import Task, register

TOPICS: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "cow", "fox"),
    "colors": ("red", "blue", "green", "pink"),
    "fruits": ("apple", "pear", "plum", "fig"),
    "tools": ("saw", "drill", "axe", "hammer"),
    "weather": ("rain", "snow", "wind", "sun"),
    "music": ("drum", "harp", "horn", "flute"),
    "sports": ("golf", "polo", "judo", "ski"),
    "places": ("city", "farm", "lake", "hill"),
}
FILLERS = ("the", "a", "and", "so", "very", "it", "is", "of")
NUMBERS = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
WORD_TO_NUMBER = {v: k for k, v in NUMBERS.items()}
CONTENT_WORDS = tuple(w for words in TOPICS.values() for w in words)
RESPONSE_WORDS = CONTENT_WORDS + FILLERS
PROMPT_WORDS = ("write", "words", "about") + tuple(NUMBERS.values()) + tuple(TOPICS)

_SPLIT_SEED = 1234  # fixed: the held-out prompts are the same in every run


def parse_prompt(prompt: str) -> tuple[int, list[str]]:
    """``"write five words about fruits and tools"`` → ``(5, ["fruits", "tools"])``."""
    words = prompt.split()
    try:
        n = WORD_TO_NUMBER[words[1]]
        topics = [w for w in words[4:] if w != "and"]
    except (IndexError, KeyError):
        raise ValueError(f"not a tiny-task prompt: {prompt!r}") from None
    if not topics or any(t not in TOPICS for t in topics):
        raise ValueError(f"not a tiny-task prompt: {prompt!r}")
    return n, topics


def gold_score(prompt: str, response: str) -> float:
    n, topics = parse_prompt(prompt)
    words = response.split()
    if not words:
        return -0.5
    allowed = {w for t in topics for w in TOPICS[t]}
    on_topic = sum(w in allowed for w in words) / len(words)
    coverage = sum(any(w in TOPICS[t] for w in words) for t in topics) / len(topics)
    length_fit = max(0.0, 1.0 - abs(len(words) - n) / n)
    stutter = sum(a == b for a, b in zip(words, words[1:])) / len(words)
    return 0.5 * on_topic + 0.2 * coverage + 0.3 * length_fit - 0.5 * stutter


def all_prompts() -> list[str]:
    prompts = []
    for n, word in NUMBERS.items():
        for t1 in TOPICS:
            prompts.append(f"write {word} words about {t1}")
            for t2 in TOPICS:
                if t2 != t1:
                    prompts.append(f"write {word} words about {t1} and {t2}")
    return prompts


@register("tiny")
class TinyTask(Task):
    name = "tiny"
    vocabulary = PROMPT_WORDS + RESPONSE_WORDS

    def __init__(self, n_heldout: int = 128):
        prompts = all_prompts()
        random.Random(_SPLIT_SEED).shuffle(prompts)
        self._heldout = prompts[:n_heldout]
        self._train = prompts[n_heldout:]

    def train_prompts(self) -> list[str]:
        return list(self._train)

    def heldout_prompts(self) -> list[str]:
        return list(self._heldout)

    def gold(self, prompt: str, response: str) -> float:
        return gold_score(prompt, response)

    def demonstrations(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        demos = []
        for _ in range(n):
            prompt = rng.choice(self._train)
            length, topics = parse_prompt(prompt)
            size = max(1, length + rng.randint(-2, 2))
            words = []
            for _ in range(size):
                if rng.random() < 0.55:
                    words.append(rng.choice(TOPICS[rng.choice(topics)]))
                else:
                    words.append(rng.choice(RESPONSE_WORDS))
            demos.append({"prompt": prompt, "response": " ".join(words)})
        return demos
