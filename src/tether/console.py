"""Run output: one place prints progress and warnings to stderr (rich markup), so that
low layers (engine, checkpoint, monitor) can speak without importing the pipeline."""

from __future__ import annotations

__all__ = ["say", "warn"]


def say(msg: str) -> None:
    """Print ``msg`` (rich markup) to stderr; under data parallel only the first process speaks."""
    from tether import distributed

    if not distributed.is_main():
        return
    from rich.console import Console

    Console(stderr=True).print(msg)


def warn(msg: str) -> None:
    """:func:`say` a warning (yellow)."""
    say(f"[yellow]warning: {msg}[/yellow]")
