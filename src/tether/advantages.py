"""Pure advantage, KL and reward-shaping functions, and the KL controllers.

Shapes: B = batch, T = response length. A per-token ``mask`` is 1 on response tokens;
each row's episode ends at its last masked token.
"""

from __future__ import annotations

import math

import torch

from tether.ops import last_true_index

__all__ = [
    "process_advantages",
    "gae",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_rewards",
    "group_baseline",
    "rloo_advantages",
    "grpo_advantages",
    "AdaptiveKLController",
    "FixedKLController",
]


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

    Args:
        rewards: [B, T] per-token rewards r_t.
        values: [B, T] value estimates V(s_t).
        mask: [B, T] 1 on response tokens; the episode ends after a row's last masked token,
            whose successor state has value 0.
        gamma, lam: discount γ and GAE λ.

    Returns: ``(advantages, returns)``, both [B, T] and 0 outside the mask, with
    ``δ_t = r_t + γ V(s_{t+1}) − V(s_t)``, ``A_t = Σ_l (γλ)^l δ_{t+l}`` and ``R_t = A_t + V(s_t)``.
    """
    mask = mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(length)):
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * next_mask * running) * mask[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * mask
    return advantages, returns


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(π‖π_ref) per token: ``logπ − logπ_ref`` (unbiased, can be < 0)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 estimator per token: ``½ (logπ − logπ_ref)²`` (biased, low variance, ≥ 0)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator per token (Schulman 2020): ``(r − 1) − log r`` with r = π_ref/π.

    Unbiased for KL(π‖π_ref) when tokens are sampled from π, and always ≥ 0.
    """
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-token rewards of RLHF's PPO (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2).

    Args:
        scores: [B] sequence-level scores (reward model, gold, ...).
        logprobs: [B, T] log π(a_t) of the sampled tokens.
        ref_logprobs: [B, T] log π_ref(a_t) of the same tokens.
        mask: [B, T] 1 on response tokens (each row needs at least one).
        beta: KL coefficient β.

    Returns: [B, T] rewards ``−β·(logπ − logπ_ref)`` on every response token, with the
    sequence score added at each row's last response token; 0 outside the mask.
    """
    mask_f = mask.to(logprobs.dtype)
    rewards = -beta * (logprobs - ref_logprobs) * mask_f
    last = last_true_index(mask)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def group_baseline(scores: torch.Tensor, mode: str = "loo") -> torch.Tensor:
    """Per-prompt baselines for sequence scores laid out [B, G] (G samples of each prompt).

    ``mode="loo"``: for each sample, the mean score of the other G − 1 samples of its
    prompt (Kool et al. 2019; needs G ≥ 2), an unbiased baseline since it does not depend
    on the sample itself. ``mode="mean"``: the group mean, including the sample.
    """
    if scores.dim() != 2:
        raise ValueError(f"group_baseline expects scores [B, G], got shape {tuple(scores.shape)}")
    g = scores.size(1)
    if mode == "mean":
        return scores.mean(dim=1, keepdim=True).expand_as(scores)
    if mode == "loo":
        if g < 2:
            raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt")
        return (scores.sum(dim=1, keepdim=True) - scores) / (g - 1)
    raise ValueError(f"unknown baseline mode {mode!r}; choose 'loo' or 'mean'")


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024) for rewards [B, G]:
    ``r_i − mean_{j≠i} r_j`` within each prompt's group of G ≥ 2 samples."""
    return rewards - group_baseline(rewards, "loo")


def grpo_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, §4.1.2) for rewards [B, G].

    Each reward minus its group's mean, then divided by
    ``scale="group"``: the group's sample standard deviation + ε (GRPO);
    ``scale="batch"``: the standard deviation of all B·G rewards + ε;
    ``scale="none"``: nothing (Dr. GRPO, Liu et al. 2025, which drops the division as
    a bias towards low-spread groups).
    A group whose rewards are all equal gets zero advantage, never NaN.
    """
    if rewards.dim() != 2:
        raise ValueError(f"grpo_advantages expects rewards [B, G], got shape {tuple(rewards.shape)}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown scale {scale!r}; choose 'group', 'batch' or 'none'")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    flat = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    centred = centred.masked_fill(flat, 0.0)  # exactly 0, not the mean's rounding error
    if scale == "none":
        return centred
    if scale == "group":
        if rewards.size(1) < 2:
            raise ValueError("scale='group' needs at least 2 samples per prompt")
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    return centred / (std + eps)


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2).

    ``e = clip(KL/target − 1, −0.2, 0.2)``; ``β ← β · (1 + e · n_steps / horizon)``, where
    ``n_steps`` is the number of samples in the rollout batch that measured ``KL``.
    """

    def __init__(self, init_coef: float, target: float, horizon: int = 10000):
        if target <= 0:
            raise ValueError(f"AdaptiveKLController target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """β after a rollout batch that measured ``current_kl``; a non-finite KL (a rollout
        whose log-probs overflowed) leaves β as it is rather than making it NaN for good."""
        if not math.isfinite(float(current_kl)):
            return self.value
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved controller (the saved target and horizon win on resume)."""
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


class FixedKLController:
    """A constant KL coefficient with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:  # noqa: ARG002 - same interface
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def process_advantages(step_rewards: torch.Tensor, step_mask: torch.Tensor, group: int,
                       eps: float = 1e-4) -> torch.Tensor:
    """Token advantages from per-step rewards (process supervision, Shao et al. 2024 §4.1.3).

    Every step reward is normalised by the mean and standard deviation of all the step
    rewards of its group (the G samples of one prompt); a token's advantage is the sum of
    the normalised rewards of the steps that end at or after it.

    Args:
        step_rewards: [B, T] each step's reward at the position of its last token, 0 elsewhere.
        step_mask: [B, T] True where a step ends.
        group: G, the adjacent rows that share a prompt (B divisible by G).

    Returns [B, T] advantages (0 after a row's last step).
    """
    B, T = step_rewards.shape
    if group < 1 or B % group:
        raise ValueError(f"{B} rows do not split into groups of {group}")
    r = step_rewards.reshape(B // group, group * T)
    m = step_mask.reshape(B // group, group * T).to(r.dtype)
    n = m.sum(dim=1, keepdim=True)
    mean = (r * m).sum(dim=1, keepdim=True) / n.clamp(min=1)
    var = (((r - mean) ** 2) * m).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    scale = var.sqrt() + eps
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # no spread: every r − mean is 0
    normalised = ((r - mean) / scale * m).reshape(B, T)
    return normalised.flip(1).cumsum(1).flip(1)
