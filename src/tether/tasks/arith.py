"""``arith``: multi-step arithmetic modulo 10, checked step by step.

A prompt chains three to six operations on a digit::

    compute 7 add 5 times 3 minus 4

and a solution works it out one step per line of `` ; ``-separated steps, ending with the
answer::

    7 add 5 is 2 ; 2 times 3 is 6 ; 6 minus 4 is 2 ; answer 2

Every number stays a digit (each operation is taken modulo 10), so a step is one fact a
program checks: it starts from the previous step's result (the prompt's first digit for the
first step), applies the prompt's next operation, and states the right result. The answer
step must repeat the last result. That gives both the step labels a process reward model
trains on and the gold: 1 when the final answer is right, else 0.
"""

from __future__ import annotations

import random

from tether.tasks.base import Task, register

OPS = {"add": lambda x, c: (x + c) % 10, "times": lambda x, c: (x * c) % 10, "minus": lambda x, c: (x - c) % 10}
DIGITS = tuple(str(d) for d in range(10))
SEPARATOR = " ; "


def make_prompt(rng: random.Random) -> str:
    words = ["compute", str(rng.randrange(10))]
    for _ in range(rng.randint(3, 6)):
        words += [rng.choice(tuple(OPS)), str(rng.randrange(1, 10))]
    return " ".join(words)


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """(start digit, [(operation, operand), ...]) of a prompt."""
    words = prompt.split()
    if len(words) < 4 or words[0] != "compute" or len(words) % 2:
        raise ValueError(f"not an arith prompt: {prompt!r}")
    return int(words[1]), [(words[i], int(words[i + 1])) for i in range(2, len(words), 2)]


def solve(prompt: str) -> list[str]:
    """The correct steps (operations, then the answer)."""
    x, ops = parse_prompt(prompt)
    steps = []
    for op, c in ops:
        y = OPS[op](x, c)
        steps.append(f"{x} {op} {c} is {y}")
        x = y
    return steps + [f"answer {x}"]


def split_steps(response: str) -> list[str]:
    """A response's steps (empty ones dropped)."""
    return [s.strip() for s in response.split(";") if s.strip()]


def step_labels(prompt: str, steps: list[str]) -> list[int]:
    """1 for each step that is right where it stands, else 0.

    Operation step k is right when it reads ``X OP C is Y`` with X the previous step's stated
    result (the start digit for the first), OP and C the prompt's k-th operation and
    Y = OP(X, C) mod 10. The answer step is right when it repeats the last stated result
    and comes after every operation. A step after the answer, or an operation the prompt
    does not have, is wrong.
    """
    start, ops = parse_prompt(prompt)
    labels, previous, answered = [], start, False
    for k, step in enumerate(steps):
        words = step.split()
        ok = False
        if len(words) == 2 and words[0] == "answer" and not answered:
            ok = k == len(ops) and words[1] == str(previous)
            answered = True
        elif len(words) == 5 and words[3] == "is" and k < len(ops) and not answered:
            x, op, c, y = words[0], words[1], words[2], words[4]
            want_op, want_c = ops[k]
            ok = (x == str(previous) and op == want_op and c == str(want_c)
                  and y in DIGITS and int(y) == OPS[op](int(x), int(c)))
            if y in DIGITS:
                previous = int(y)
        labels.append(int(ok))
    return labels


def final_answer(response: str) -> int | None:
    steps = split_steps(response)
    if steps:
        words = steps[-1].split()
        if len(words) == 2 and words[0] == "answer" and words[1] in DIGITS:
            return int(words[1])
    return None


def correct_answer(prompt: str) -> int:
    return int(solve(prompt)[-1].split()[1])


@register("arith")
class ArithTask(Task):
    """Multi-step arithmetic modulo 10 with step-level checking (process supervision)."""

    name = "arith"
    vocabulary = ("compute", "is", "answer", ";", *OPS, *DIGITS)
    separator = SEPARATOR

    def __init__(self, n_heldout: int = 200, n_train: int = 3000, seed: int = 0):
        rng = random.Random(seed)
        seen, prompts = set(), []
        while len(prompts) < n_train + n_heldout:
            p = make_prompt(rng)
            if p not in seen:
                seen.add(p)
                prompts.append(p)
        self._train, self._heldout = prompts[:n_train], prompts[n_train:]

    def train_prompts(self) -> list[str]:
        return list(self._train)

    def heldout_prompts(self) -> list[str]:
        return list(self._heldout)

    def gold(self, prompt: str, response: str) -> float:
        """1 when the final answer is right (whatever the steps), else 0."""
        return float(final_answer(response) == correct_answer(prompt))

    def step_labels(self, prompt: str, steps: list[str]) -> list[int]:
        return step_labels(prompt, steps)

    def split_steps(self, response: str) -> list[str]:
        return split_steps(response)

    def demonstrations(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [{"prompt": p, "response": SEPARATOR.join(solve(p))}
                for p in (rng.choice(self._train) for _ in range(n))]
