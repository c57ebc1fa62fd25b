"""Prompt and response tokenisation, truncation and padding.

A prompt is rendered with the tokenizer's chat template (``add_generation_prompt=True``);
the response is tokenised on its own and followed by EOS. Concatenating the two is exactly
what the policy sees when it generates, so SFT, reward scoring and PPO agree on token ids.

A tokenizer without a chat template is not an error: the conversation is rendered as plain
``role: content`` lines followed by ``assistant: `` (the same everywhere: training,
sampling, judging, serving). Messages are checked first (:func:`tether.data.schemas.check_messages`):
a role other than system/user/assistant, content that is not a string, or an empty list is
a :class:`~tether.data.schemas.ChatFormatError` naming the message; so is a chat template
that rejects the conversation (e.g. one without a system role). Empty content is rendered
as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tether.data.schemas import ChatFormatError, check_messages

__all__ = ["ChatFormatError", "Encoder", "TruncationStats", "chat_prompt_ids", "pad_right", "pad_left"]


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ready for the assistant's reply, as tether renders it
    everywhere (training, sampling, judging, serving): the tokenizer's chat template with a
    generation prompt, else plain ``role: content`` lines followed by ``assistant: ``.

    Raises :class:`ChatFormatError` for messages that are not system/user/assistant turns
    with string content, and when the chat template rejects them."""
    messages = check_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except TemplateError as exc:  # e.g. raise_exception('System role not supported')
            raise ChatFormatError(f"the tokenizer's chat template rejected these messages: {exc}",
                                  "messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]


@dataclass
class TruncationStats:
    prompts_cut: int = 0
    responses_cut: int = 0
    seen: int = 0
    examples: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"prompts_cut": self.prompts_cut, "responses_cut": self.responses_cut, "seen": self.seen,
                "examples": list(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.prompts_cut, self.responses_cut = int(state["prompts_cut"]), int(state["responses_cut"])
        self.seen, self.examples = int(state["seen"]), list(state["examples"])

    def summary(self) -> str | None:
        if not (self.prompts_cut or self.responses_cut):
            return None
        return (
            f"truncated {self.prompts_cut} of {self.seen} prompts (from the left) and "
            f"{self.responses_cut} responses (from the right) to fit the context"
        )


class Encoder:
    """Turns prompts and responses into token ids under a length budget."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.stats = TruncationStats()
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            from tether.config import ConfigError

            raise ConfigError(f"the tokenizer of {_tokenizer_name(tokenizer)} has no eos_token; set one "
                              "(tokenizer.eos_token = ...) before training")

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def prompt_ids(self, prompt) -> list[int]:
        """A prompt (text, or chat messages) → ids, cut from the left to ``max_prompt_length``."""
        if not isinstance(prompt, (str, list)):
            raise ChatFormatError(f"must be a string or a list of chat messages, got {type(prompt).__name__}", "prompt")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = chat_prompt_ids(self.tokenizer, messages)
        self.stats.seen += 1
        if len(ids) > self.max_prompt_length:
            self.stats.prompts_cut += 1
            ids = ids[-self.max_prompt_length :]
        return ids

    def response_ids(self, response: str, budget: int) -> list[int]:
        if not isinstance(response, str):
            raise ChatFormatError(f"must be a string, got {type(response).__name__}", "response")
        try:
            response.encode("utf-8")
        except UnicodeEncodeError:
            raise ChatFormatError("holds a lone surrogate, which is not Unicode", "response") from None
        ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"]) + [self.eos_id]
        if len(ids) > budget:
            self.stats.responses_cut += 1
            ids = ids[:budget]
        return ids

    def example(self, prompt, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids incl. EOS) within ``max_length`` tokens."""
        p = self.prompt_ids(prompt)
        r = self.response_ids(response, self.max_length - len(p))
        return p, r

    def lengths(self, prompt, responses: list[str]) -> tuple[int, list[int]]:
        """Token counts (prompt, each response with its EOS) of :meth:`example`, without
        counting them in ``stats`` (for sizing forward passes before the real encoding)."""
        saved = self.stats.state_dict()
        try:
            p = self.prompt_ids(prompt)
            return len(p), [len(self.response_ids(r, self.max_length - len(p))) for r in responses]
        finally:
            self.stats.load_state_dict(saved)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def pad_right(seqs: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``(ids [B, W], mask [B, W])``."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(ids [B, W], mask [B, W])`` (prompts for generation)."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask
