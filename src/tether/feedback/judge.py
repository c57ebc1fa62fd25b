"""AI judges (RLAIF): a model compares two responses and says which is better.

One interface, two back ends:

- :class:`HFJudge` — a local Hugging Face causal LM. It reads P("A") vs P("B") from its
  next-token distribution after the judging prompt (no sampling, one forward pass).
- :class:`HTTPJudge` — any OpenAI-compatible ``/v1/chat/completions`` endpoint (``tether
  serve``, vLLM, a hosted API), through :class:`tether.feedback.client.ChatClient`
  (timeouts, retries, concurrency, on-disk cache). With ``logprobs`` it reads the same
  probabilities from the first token's ``top_logprobs``; a server without them is read
  from the answer's first letter (P = 1 or 0).

Every comparison is asked in **both orders** (A = x, B = y, then A = y, B = x) and the two
answers are averaged: ``P(x ≻ y) = ½[P_A(x, y) + 1 − P_A(y, x)]``. A judge that favours
whichever response comes first cancels out; :func:`position_bias` measures how much it did.

The judging prompt is shaped by a **rubric** (helpfulness, honesty, harmlessness,
conciseness, or your own criteria) and, optionally, a **constitution** (a YAML list of
principles; see ``tether/feedback/constitution.yaml``). A judge ranks K responses by each
one's summed win probability against the others (:meth:`Judge.rank`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from itertools import combinations
from pathlib import Path

import yaml

from tether.data.io import DataError

__all__ = [
    "RUBRIC",
    "Principle",
    "load_constitution",
    "judge_messages",
    "Verdict",
    "Judge",
    "HFJudge",
    "HTTPJudge",
    "position_bias",
    "accuracy_against_gold",
    "make_judge",
]

#: built-in rubric criteria; any other string is used as a criterion as it is
RUBRIC = {
    "helpfulness": "Helpfulness: does it do what the user asked, completely and correctly, following every instruction?",
    "honesty": "Honesty: is everything it says true, with uncertainty stated rather than hidden?",
    "harmlessness": "Harmlessness: does it avoid helping anyone cause harm, and avoid demeaning or dangerous content?",
    "conciseness": "Conciseness: does it say what is needed without padding, repetition or flattery?",
}
DEFAULT_RUBRIC = ("helpfulness", "honesty", "harmlessness", "conciseness")


@dataclass
class Principle:
    name: str
    critique: str
    revision: str


def load_constitution(path: str | Path | None = None) -> list[Principle]:
    """Principles from a YAML list (strings, or mappings with ``name``, ``critique`` and
    ``revision``); the built-in constitution when ``path`` is None or 'builtin'."""
    if path is None or str(path) == "builtin":
        text = resources.files("tether.feedback").joinpath("constitution.yaml").read_text()
        where = "tether/feedback/constitution.yaml"
    else:
        if not Path(path).is_file():
            raise DataError(path, None, "constitution file not found")
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
            raise DataError(where, line, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise DataError(where, None, f"cannot be read: {exc.strerror or exc}") from None
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise DataError(where, None if mark is None else mark.line + 1, f"not valid YAML: {problem}") from None
    except (ValueError, RecursionError) as exc:  # an integer of more than 4300 digits; nesting too deep
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise DataError(where, None, f"not valid YAML: {reason}") from None
    if not isinstance(items, list) or not items:
        raise DataError(where, None, "must be a non-empty YAML list of principles")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item.strip():
            out.append(Principle(f"principle-{i}", f"Identify ways in which the response does not meet this principle: {item}",
                                 f"Rewrite the response so that it meets this principle: {item}"))
        elif isinstance(item, dict):
            for key in ("critique", "revision"):
                if not isinstance(item.get(key), str) or not item[key].strip():
                    raise DataError(where, None, "must be a non-empty string", field=f"[{i}].{key}")
            out.append(Principle(str(item.get("name", f"principle-{i}")), item["critique"], item["revision"]))
        else:
            raise DataError(where, None, "must be a string or a mapping with critique and revision", field=f"[{i}]")
    return out


def render_prompt(prompt) -> str:
    """A prompt (text, or chat messages) as plain text for a judge or a critic."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def judge_messages(prompt, a: str, b: str, rubric=DEFAULT_RUBRIC, principles: list[Principle] | None = None,
                   labels: tuple[str, str] = ("A", "B")) -> list[dict]:
    """The chat messages asking which of two responses is better (answer: its label)."""
    la, lb = labels
    criteria = "\n".join(f"- {RUBRIC.get(c, c)}" for c in rubric)
    extra = ""
    if principles:
        extra = "\nThe better response also keeps to these principles:\n" + "\n".join(
            f"- {p.revision}" for p in principles) + "\n"
    system = ("You are a careful, impartial judge of an AI assistant's responses. You compare two responses "
              "to the same request and say which one is better. The order in which they appear and their "
              "length must not affect your judgement.")
    user = (f"Judge the responses by:\n{criteria}\n{extra}\n"
            f"[Request]\n{render_prompt(prompt)}\n\n[Response {la}]\n{a}\n\n[Response {lb}]\n{b}\n\n"
            f"Which response is better? Answer with a single word: {la} or {lb}.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass
class Verdict:
    """A comparison of x and y asked in both orders."""

    p_ab: float  # P("A") with x shown as A (x first)
    p_ba: float  # P("A") with y shown as A (y first)
    valid: bool = True  # both answers could be read

    @property
    def p(self) -> float:
        """P(x ≻ y), position bias cancelled."""
        return 0.5 * (self.p_ab + 1.0 - self.p_ba)

    @property
    def first_order(self) -> float:
        """P(x ≻ y) from the first order alone (what a judge asked once would say)."""
        return self.p_ab


class Judge:
    """Compares responses. Subclasses implement :meth:`first_letter_probs`."""

    name = "judge"

    def __init__(self, rubric=DEFAULT_RUBRIC, principles: list[Principle] | None = None,
                 labels: tuple[str, str] = ("A", "B")):
        self.rubric = tuple(rubric)
        self.principles = principles
        if len(labels) != 2 or labels[0] == labels[1] or not all(isinstance(x, str) and x.strip() for x in labels):
            raise ValueError(f"labels must be two different non-empty strings, got {labels!r}")
        self.labels = (str(labels[0]).strip(), str(labels[1]).strip())

    def first_letter_probs(self, conversations: list[list[dict]], progress=None) -> list[tuple[float, bool]]:
        """(P("A") against "B", whether the answer could be read) for each conversation."""
        raise NotImplementedError

    def compare(self, items: list[tuple], progress=None) -> list[Verdict]:
        """A :class:`Verdict` for each ``(prompt, x, y)``, both orders asked."""
        convs = []
        for prompt, x, y in items:
            convs.append(judge_messages(prompt, x, y, self.rubric, self.principles, self.labels))
            convs.append(judge_messages(prompt, y, x, self.rubric, self.principles, self.labels))
        probs = self.first_letter_probs(convs, progress)
        return [Verdict(probs[2 * i][0], probs[2 * i + 1][0], probs[2 * i][1] and probs[2 * i + 1][1])
                for i in range(len(items))]

    def rank(self, groups: list[tuple], progress=None) -> list[dict]:
        """Rank the K responses of each ``(prompt, responses)`` group: every pair is compared
        (both orders) and responses are ordered by their summed P(win). Returns per group
        ``{"order": best first, "wins": [...], "pairs": [(i, j, P(i ≻ j), p_ab, p_ba, valid)]}``."""
        items, index = [], []
        for g, (prompt, responses) in enumerate(groups):
            for i, j in combinations(range(len(responses)), 2):
                items.append((prompt, responses[i], responses[j]))
                index.append((g, i, j))
        verdicts = self.compare(items, progress)
        out = [{"order": None, "wins": [0.0] * len(r), "pairs": []} for _, r in groups]
        for (g, i, j), v in zip(index, verdicts):
            out[g]["wins"][i] += v.p
            out[g]["wins"][j] += 1.0 - v.p
            out[g]["pairs"].append((i, j, v.p, v.p_ab, v.p_ba, v.valid))
        for o in out:
            o["order"] = sorted(range(len(o["wins"])), key=lambda k: (-o["wins"][k], k))
        return out


def _two_way(la: float, lb: float) -> float:
    """P(A) from the log-probabilities of A and B (either may be −inf)."""
    if la == -math.inf and lb == -math.inf:
        return 0.5
    m = max(la, lb)
    ea, eb = math.exp(la - m), math.exp(lb - m)
    return ea / (ea + eb)


class HFJudge(Judge):
    """A local causal LM judge: P("A") = softmax over the logits of the "A" and "B" tokens
    (each letter's spellings with and without a leading space, summed) after the chat
    template's generation prompt."""

    def __init__(self, model: str, *, rubric=DEFAULT_RUBRIC, principles=None, labels=("A", "B"), batch_size: int = 8,
                 max_length: int = 1024, model_obj=None, tokenizer=None):
        super().__init__(rubric, principles, labels)
        import torch

        from tether.models import load_tokenizer
        from tether.zoo import resolve_model

        self.name = f"hf:{Path(model).name if Path(model).exists() else model}"
        self.tokenizer = tokenizer or load_tokenizer(model)
        if model_obj is None:
            from transformers import AutoModelForCausalLM

            model_obj = AutoModelForCausalLM.from_pretrained(resolve_model(model))
        if model_obj.device.type == "cpu" and torch.cuda.is_available():
            model_obj = model_obj.to("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        self.model = model_obj.eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.letter_ids = {}
        unk = self.tokenizer.unk_token_id
        for letter in self.labels:
            ids = set()
            for form in (letter, " " + letter):
                toks = self.tokenizer(form, add_special_tokens=False)["input_ids"]
                if len(toks) == 1 and toks[0] != unk:
                    ids.add(toks[0])
            if not ids:
                raise ValueError(f"{model}: the tokenizer has no single token for the label {letter!r}; "
                                 f"choose labels it has (judge.labels)")
            self.letter_ids[letter] = torch.tensor(sorted(ids))
        if set(self.letter_ids[self.labels[0]].tolist()) & set(self.letter_ids[self.labels[1]].tolist()):
            raise ValueError(f"{model}: the labels {self.labels} share a token")

    def _encode(self, conv: list[dict]) -> list[int]:
        from tether.data.tokenize import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, conv)[-self.max_length:]  # keep the end: the question

    def first_letter_probs(self, conversations, progress=None):
        import torch

        from tether.data.tokenize import pad_left
        from tether.models import _accepts_logits_to_keep

        from tether.rollout.engine import engine_last_logits, engine_supports

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        encoded = [self._encode(c) for c in conversations]
        if engine_supports(self.model):  # the rubric every prompt shares runs once
            logp = torch.log_softmax(engine_last_logits(self.model, encoded, progress=progress), dim=-1)
            la = torch.logsumexp(logp[:, self.letter_ids[self.labels[0]]], dim=-1)
            lb = torch.logsumexp(logp[:, self.letter_ids[self.labels[1]]], dim=-1)
            return [(float(p), True) for p in torch.sigmoid(la - lb).tolist()]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        out: list = [None] * len(encoded)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for b in range(0, len(order), self.batch_size):
                rows = order[b : b + self.batch_size]
                ids, mask = pad_left([encoded[i] for i in rows], int(pad))
                ids, mask = ids.to(device), mask.to(device)
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(self.model) else {}
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                    **extra).logits[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                la = torch.logsumexp(logp[:, self.letter_ids[self.labels[0]].to(device)], dim=-1)
                lb = torch.logsumexp(logp[:, self.letter_ids[self.labels[1]].to(device)], dim=-1)
                p = torch.sigmoid(la - lb).tolist()
                for i, pi in zip(rows, p):
                    out[i] = (float(pi), True)
                if progress:
                    progress(len(rows))
        return out


class HTTPJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint (see :class:`ChatClient`
    for timeouts, retries, concurrency and the cache)."""

    def __init__(self, base_url: str, model: str, *, rubric=DEFAULT_RUBRIC, principles=None, labels=("A", "B"),
                 logprobs: bool = True, **client_options):
        super().__init__(rubric, principles, labels)
        from tether.feedback.client import ChatClient

        self.name = f"http:{model}"
        self.client = ChatClient(base_url, model, **client_options)
        self.logprobs = logprobs
        self.unreadable = 0

    def request(self, conv: list[dict]) -> dict:
        body = {"messages": conv, "max_tokens": 1, "temperature": 0.0}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=20)
        return body

    def read(self, response: dict) -> tuple[float, bool]:
        """P(first label) from a chat completion: the first token's top_logprobs when they
        list a label (a label missing from the list gets an upper bound: the smaller of the
        list's smallest probability and what the list leaves over), else the answer's first
        word; (0.5, False) when neither names a label."""
        a, b = self.labels
        choice = response["choices"][0]
        top = (((choice.get("logprobs") or {}).get("content") or [{}])[0] or {}).get("top_logprobs") or []
        la = lb = -math.inf
        for entry in top:
            token = str(entry.get("token", "")).strip()
            lp = entry.get("logprob")
            if not isinstance(lp, (int, float)):
                continue
            if token == a:
                la = float(lp) if la == -math.inf else float(math.log(math.exp(la) + math.exp(lp)))
            elif token == b:
                lb = float(lp) if lb == -math.inf else float(math.log(math.exp(lb) + math.exp(lp)))
        if la > -math.inf and lb > -math.inf:
            return _two_way(la, lb), True
        if la > -math.inf or lb > -math.inf:
            # one label is outside the top list: its probability is at most the list's
            # smallest and at most what the list leaves over (an upper bound)
            listed = [float(e["logprob"]) for e in top if isinstance(e.get("logprob"), (int, float))]
            rest = 1.0 - sum(math.exp(x) for x in listed)
            bound = min(min(listed), math.log(rest)) if rest > 0 else -math.inf
            return _two_way(la if la > -math.inf else bound, lb if lb > -math.inf else bound), True
        text = ((choice.get("message") or {}).get("content") or "").strip()
        word = text.split()[0].strip(".,:;!\"'()[]*") if text else ""
        if word in (a, b):
            return (1.0 if word == a else 0.0), True
        return 0.5, False

    def first_letter_probs(self, conversations, progress=None):
        responses = self.client.complete([self.request(c) for c in conversations], progress)
        out = [self.read(r) for r in responses]
        self.unreadable += sum(not ok for _, ok in out)
        return out


def position_bias(verdicts: list[Verdict]) -> dict:
    """How much the judge favoured the first slot: ``first_slot_rate`` (mean P("A") over
    both orders; 0.5 is unbiased), ``consistency`` (share of comparisons whose decision
    survives the swap), and ``swap_effect`` (mean |P_A(x, y) − (1 − P_A(y, x))|)."""
    if not verdicts:
        return {"first_slot_rate": None, "consistency": None, "swap_effect": None, "comparisons": 0}
    n = len(verdicts)
    first = sum(v.p_ab + v.p_ba for v in verdicts) / (2 * n)
    consistent = sum((v.p_ab > 0.5) == (v.p_ba < 0.5) and v.p_ab != 0.5 and v.p_ba != 0.5 for v in verdicts) / n
    effect = sum(abs(v.p_ab - (1.0 - v.p_ba)) for v in verdicts) / n
    return {"first_slot_rate": first, "consistency": consistent, "swap_effect": effect, "comparisons": n}


def accuracy_against_gold(pairs: list[tuple[float, float, float, float]]) -> dict:
    """Judge accuracy on pairs with distinct gold, from ``(gold_x, gold_y, p_ab, p_ba)``:
    ``swapped`` uses P(x ≻ y) averaged over both orders, ``first_order`` the first order
    alone, and ``swapped_when_consistent`` only the pairs where both orders agree (with the
    share of pairs that is). A probability of exactly 0.5 counts as half right."""
    def score(p: float, gx: float, gy: float) -> float:
        return 0.5 if p == 0.5 else float((p > 0.5) == (gx > gy))

    used = [(gx, gy, pab, pba) for gx, gy, pab, pba in pairs if gx != gy]
    if not used:
        return {"pairs": 0, "swapped": None, "first_order": None}
    swapped = sum(score(0.5 * (pab + 1 - pba), gx, gy) for gx, gy, pab, pba in used) / len(used)
    first = sum(score(pab, gx, gy) for gx, gy, pab, _ in used) / len(used)
    consistent = [(gx, gy, pab, pba) for gx, gy, pab, pba in used
                  if (pab > 0.5) == (pba < 0.5) and pab != 0.5 and pba != 0.5]
    return {"pairs": len(used), "swapped": swapped, "first_order": first,
            "consistent_share": len(consistent) / len(used),
            "swapped_when_consistent": (sum(score(0.5 * (pab + 1 - pba), gx, gy) for gx, gy, pab, pba in consistent)
                                        / len(consistent)) if consistent else None}


def make_judge(cfg, default_model: str) -> Judge:
    """The judge a :class:`tether.config.JudgeConfig` describes."""
    principles = None
    if cfg.constitution:
        principles = load_constitution(None if cfg.constitution == "builtin" else cfg.constitution)
    if cfg.kind == "http":
        if not cfg.base_url:
            raise ValueError("judge.base_url is needed for judge.kind: http (e.g. http://127.0.0.1:8000/v1)")
        return HTTPJudge(cfg.base_url, cfg.api_model or cfg.model or "default", rubric=cfg.rubric,
                         principles=principles, labels=tuple(cfg.labels), logprobs=cfg.logprobs, api_key_env=cfg.api_key_env,
                         timeout=cfg.timeout, max_retries=cfg.max_retries, concurrency=cfg.concurrency,
                         cache=cfg.cache or None)
    return HFJudge(cfg.model or default_model, rubric=cfg.rubric, principles=principles, labels=tuple(cfg.labels),
                   batch_size=cfg.batch_size)
