"""Built-in tasks: prompts split into train and held-out, a programmatic gold score, and
demonstrations for SFT. ``get_task(name)`` returns one."""

from __future__ import annotations

from tether.tasks.base import Task, get_task, list_tasks
from tether.tasks import arith, instruct, tiny  # noqa: F401,E402  (importing registers them)

__all__ = ["Task", "get_task", "list_tasks"]
