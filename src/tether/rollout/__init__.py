"""Generation backends. ``generate`` uses transformers' KV-cached ``generate``."""

from tether.rollout.generate import (
    Rollout,
    SamplingCopy,
    active_autocast_dtype,
    generate,
    group_chunks,
    group_tensors,
    merge_rollouts,
    trimmed_batch,
)

__all__ = ["Rollout", "generate", "SamplingCopy", "active_autocast_dtype", "trimmed_batch", "group_tensors", "group_chunks", "merge_rollouts"]
