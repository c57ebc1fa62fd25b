"""Constitutional AI (Bai et al. 2022): critique → revise against written principles.

For each prompt a model answers; then, for ``rounds`` rounds, a principle is drawn from the
constitution, the model critiques its latest response against the principle's critique
request, and rewrites the response following its revision request. The outputs are

- SFT demonstrations ``{prompt, response: final revision}`` (the supervised stage of CAI);
- preference pairs ``{prompt, chosen: final revision, rejected: original}`` (the data an
  RL-from-AI-feedback stage can train on), skipped when either is empty or they are equal;
- the full trace of every round, for reading.

The model is a local causal LM (:class:`LocalChat`) or any OpenAI-compatible endpoint
(:class:`HTTPChat`, through :class:`tether.feedback.client.ChatClient`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tether.feedback.judge import Principle, render_prompt

__all__ = ["LocalChat", "HTTPChat", "critique_revise", "CAIResult"]


class LocalChat:
    """Batched sampling from a local causal LM with its chat template."""

    def __init__(self, model: str, *, batch_size: int = 8, max_prompt_tokens: int = 768):
        import torch
        from transformers import AutoModelForCausalLM

        from tether.models import load_tokenizer
        from tether.zoo import resolve_model

        self.tokenizer = load_tokenizer(model)
        self.model = AutoModelForCausalLM.from_pretrained(resolve_model(model)).eval()
        if torch.cuda.is_available():
            self.model = self.model.to("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        self.batch_size, self.max_prompt_tokens = batch_size, max_prompt_tokens
        self.name = f"hf:{model}"

    def generate(self, conversations: list[list[dict]], *, max_tokens: int, temperature: float, seed: int,
                 progress=None) -> list[str]:
        """One answer per conversation, through :func:`tether.rollout.generate` (Tether's engine
        for a Llama-shaped model: a system prompt the conversations share runs once)."""
        from tether.config import GenerationConfig
        from tether.data.tokenize import Encoder
        from tether.rollout import generate

        enc = Encoder(self.tokenizer, self.max_prompt_tokens + max_tokens, self.max_prompt_tokens)
        gen = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, batch_size=self.batch_size)
        return generate(self.model, enc, conversations, gen, seed=seed, progress=progress).texts


class HTTPChat:
    """Sampling from an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, base_url: str, model: str, **client_options):
        from tether.feedback.client import ChatClient

        self.client = ChatClient(base_url, model, **client_options)
        self.name = f"http:{model}"

    def generate(self, conversations, *, max_tokens: int, temperature: float, seed: int, progress=None) -> list[str]:
        bodies = [{"messages": c, "max_tokens": max_tokens, "temperature": temperature, "seed": seed + i}
                  for i, c in enumerate(conversations)]
        return [(r["choices"][0]["message"].get("content") or "").strip()
                for r in self.client.complete(bodies, progress)]


@dataclass
class CAIResult:
    demos: list[dict]
    pairs: list[dict]
    trace: list[dict]


def _conversation(prompt) -> list[dict]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def critique_revise(chat, prompts: list, principles: list[Principle], *, rounds: int = 1, seed: int = 0,
                    max_tokens: int = 128, temperature: float = 0.7, progress=None) -> CAIResult:
    """Run the critique → revise loop over ``prompts`` (batched across prompts each step)."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    if not principles:
        raise ValueError("the constitution has no principles")
    rng = random.Random(seed)
    convs = [_conversation(p) for p in prompts]
    original = chat.generate(convs, max_tokens=max_tokens, temperature=temperature, seed=seed, progress=progress)
    current = list(original)
    trace = [{"prompt": p, "original": o, "rounds": []} for p, o in zip(prompts, original)]
    for r in range(rounds):
        chosen = [rng.choice(principles) for _ in prompts]
        critique_convs = [c + [{"role": "assistant", "content": cur},
                               {"role": "user", "content": f"Critique request: {pr.critique}\n"
                                                           "Write only the critique."}]
                          for c, cur, pr in zip(convs, current, chosen)]
        critiques = chat.generate(critique_convs, max_tokens=max_tokens, temperature=temperature,
                                  seed=seed + 1000 * (r + 1), progress=progress)
        revise_convs = [c + [{"role": "assistant", "content": crit},
                             {"role": "user", "content": f"Revision request: {pr.revision}\n"
                                                         f"Original request: {render_prompt(p)}\n"
                                                         "Write only the revised response."}]
                        for c, crit, pr, p in zip(critique_convs, critiques, chosen, prompts)]
        revisions = chat.generate(revise_convs, max_tokens=max_tokens, temperature=temperature,
                                  seed=seed + 1000 * (r + 1) + 500, progress=progress)
        for t, pr, crit, rev in zip(trace, chosen, critiques, revisions):
            t["rounds"].append({"principle": pr.name, "critique": crit, "revision": rev})
        current = [rev if rev.strip() else cur for rev, cur in zip(revisions, current)]
    demos, pairs = [], []
    for p, o, final, t in zip(prompts, original, current, trace):
        t["final"] = final
        if final.strip():
            demos.append({"prompt": p, "response": final})
        if final.strip() and o.strip() and final.strip() != o.strip():
            pairs.append({"prompt": p, "chosen": final, "rejected": o, "rater": f"constitution:{chat.name}"})
    return CAIResult(demos, pairs, trace)
