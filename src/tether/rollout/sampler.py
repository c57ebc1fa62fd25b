"""How a PPO/GRPO/RLOO policy samples its rollouts, given its current weights each time."""

from __future__ import annotations

from tether.data.tokenize import Encoder
from tether.rollout.generate import Rollout, SamplingCopy, active_autocast_dtype, generate

__all__ = ["PolicySampler"]


class PolicySampler:
    """Samples rollouts from a policy under training, with one of:

    - a **vLLM engine** (``backend="vllm"``), given the policy's weights before each rollout;
    - a **merged copy** (:class:`SamplingCopy`) in the autocast dtype when autocast runs in
      bf16/fp16, and for a LoRA policy in any case (no adapter products per decoding step, and
      a merged plain model can use the static KV cache: ~1.8x faster decoding on a CPU);
    - the **policy itself** otherwise, and for a QLoRA policy (merging adapters into 4-bit
      weights would round them away). Only then can the sampling steps' log-probs stand for the
      policy's (``logprobs=True``).
    """

    def __init__(self, policy, encoder: Encoder, backend: str = "transformers", *, vllm_memory: float = 0.3,
                 seed: int = 0):
        from tether.models import is_quantized

        self.policy, self.encoder = policy, encoder
        low = active_autocast_dtype(next(policy.parameters()).device)
        self.copy: SamplingCopy | None = None
        self.vllm = None
        if backend == "vllm":
            from tether.rollout.vllm import VLLMEngine

            self.vllm = VLLMEngine(policy, encoder, memory=vllm_memory, seed=seed,
                                   dtype=str(low).removeprefix("torch.") if low is not None else None)
        elif (low is not None or hasattr(policy, "merge_and_unload")) and not is_quantized(policy):
            self.copy = SamplingCopy(policy, low or next(policy.parameters()).dtype)

    @property
    def samples_itself(self) -> bool:
        """Whether the policy itself samples (its sampling log-probs are the policy's)."""
        return self.copy is None and self.vllm is None

    def sample(self, prompts: list, gen, *, seed: int, logprobs: bool = False) -> Rollout:
        """One response per prompt from the policy's current weights; ``logprobs``: keep the
        sampling steps' log-probs when the policy samples itself."""
        if self.vllm is not None:
            self.vllm.sync()
            return self.vllm.generate(prompts, gen, seed=seed)
        if self.copy is not None:
            self.copy.sync()
        return generate(self.copy.model if self.copy is not None else self.policy, self.encoder, prompts, gen,
                        seed=seed, logprobs=logprobs and self.samples_itself)

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
