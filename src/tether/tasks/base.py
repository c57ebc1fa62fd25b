"""The task interface every built-in task implements."""

from __future__ import annotations

import difflib
from typing import Callable


class Task:
    """A task with a known gold score.

    Subclasses define ``name``, ``train_prompts``, ``heldout_prompts``, ``gold`` and
    ``demonstrations``. Prompts are plain user messages; responses are plain text.
    """

    name: str = "task"
    #: words/phrases the tiny tokenizer must know (only for tasks that ship a tiny model)
    vocabulary: tuple[str, ...] = ()

    def train_prompts(self) -> list[str]:
        raise NotImplementedError

    def heldout_prompts(self) -> list[str]:
        raise NotImplementedError

    def gold(self, prompt: str, response: str) -> float:
        """Gold score of ``response`` to ``prompt`` (higher is better)."""
        raise NotImplementedError

    def gold_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.gold(p, r) for p, r in zip(prompts, responses, strict=True)]

    #: "task": ``demonstrations()`` writes them; "best_of_n": the pipeline keeps base-model
    #: samples that ``accepts_demo`` accepts (rejection sampling)
    demo_source: str = "task"

    def accepts_demo(self, prompt, response: str) -> bool:
        """Whether a sampled ``response`` is good enough to be an SFT demonstration."""
        raise NotImplementedError

    def demonstrations(self, n: int, seed: int) -> list[dict]:
        """``n`` SFT demonstrations ``{"prompt", "response"}`` drawn from the train prompts."""
        raise NotImplementedError


_REGISTRY: dict[str, Callable[[], Task]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **options) -> Task:
    """The registered task ``name`` (the built-in ones register when ``tether.tasks`` is
    imported, which importing this module does first)."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown task '{name}'{hint}; tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)
