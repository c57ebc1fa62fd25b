"""Errors a training run ends with, in a module without heavy imports (the CLI catches
them before torch is loaded)."""

from __future__ import annotations

__all__ = ["NonFiniteError", "CheckpointError"]


class NonFiniteError(RuntimeError):
    """Raised after too many optimiser steps in a row had a non-finite loss or gradient."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""
