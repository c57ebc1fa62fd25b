"""Rewards for policy optimisation: the reward model, the task's gold checker, any Python
callable, or a weighted sum of several.

A spec is a string: ``"rm"``, ``"gold"``, ``"mypkg.rewards:brevity"`` (a function
``(prompts, responses) -> list[float]``), or a sum of weighted terms such as
``"0.5*gold + rm"`` or ``"rm - 0.1*mypkg.rewards:length"``.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

import torch

__all__ = ["parse_reward_spec", "load_callable", "combine_rewards"]

_TERM = re.compile(r"^(?:(?P<w>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[A-Za-z_][\w.]*(?::[A-Za-z_]\w*)?)$")


def parse_reward_spec(spec: str) -> list[tuple[float, str]]:
    """``"0.5*gold + rm - 2*pkg.mod:fn"`` → ``[(0.5, "gold"), (1.0, "rm"), (-2.0, "pkg.mod:fn")]``.

    A name is ``rm``, ``gold`` or ``module:function``; raises ValueError naming the bad term.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty reward; use 'rm', 'gold', 'module:function' or a sum like '0.5*gold + rm'")
    terms = []
    text = spec.replace(" ", "")
    parts = re.split(r"(?<![0-9][eE])([+-])", text)  # keep the signs; not the one of an exponent
    pairs = [("", parts[0])] + [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
    for sign, body in pairs:
        if not body and sign == "" and len(parts) > 1:
            continue  # a leading sign: "-0.1*gold + rm"
        m = _TERM.match(body)
        if m is None:
            raise ValueError(f"cannot read the term {sign}{body!r} of reward {spec!r}; write e.g. '0.5*gold + rm'")
        name = m["name"]
        if name not in ("rm", "gold", "prm") and ":" not in name:
            raise ValueError(f"unknown reward {name!r} in {spec!r}: use 'rm', 'prm', 'gold' or 'module:function'")
        weight = float(m["w"]) if m["w"] else 1.0
        terms.append((-weight if sign == "-" else weight, name))
    if not terms:
        raise ValueError(f"cannot read reward {spec!r}")
    return terms


def load_callable(target: str) -> Callable:
    """Import ``module:function``."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward {target!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {target!r}: {module_name} has no function {attr!r}")
    return fn


def combine_rewards(terms: list[tuple[float, Callable]]) -> Callable:
    """One reward function ``(rollout, group) -> [B]`` from weighted ones. Each term is
    called as ``fn(rollout, group)``; the result is the weighted sum, float32 on the CPU."""

    def reward(rollout, group: int = 1) -> torch.Tensor:
        total = torch.zeros(len(rollout))
        for weight, fn in terms:
            total += weight * torch.as_tensor(fn(rollout, group), dtype=torch.float32).cpu()
        return total

    return reward
