"""Generation backends. ``generate`` uses transformers' KV-cached ``generate``."""

from tether.rollout.generate import Rollout, generate

__all__ = ["Rollout", "generate"]
