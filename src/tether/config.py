"""Configuration: nested dataclasses, YAML presets and dotted overrides.

Every field carries a one-line help text (``field(metadata={"help": ...})``) and each
section validates itself in ``__post_init__``. Unknown keys are errors that name the
closest valid key, so ``--ppo.kl.taget 6`` fails with "did you mean 'ppo.kl.target'?".

    cfg = load_config("my.yaml", preset="tiny", overrides=["ppo.kl.target=6", "seed=1"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import reprlib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

__all__ = [
    "ConfigError",
    "RunConfig",
    "load_config",
    "config_to_dict",
    "list_presets",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A configuration problem, with the offending key (and file) in the message."""


def _f(default: Any, help: str) -> Any:  # noqa: A002 - 'help' reads best here
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _sub(cls: type, help: str) -> Any:  # noqa: A002
    return field(default_factory=cls, metadata={"help": help})


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    name: str = _f("tiny", "Model: a zoo name (`tether models list`), a local folder, or a hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "Parameter dtype for training.")
    autocast: Literal["auto", "off", "bfloat16", "float16"] = _f(
        "auto", "Mixed precision for forward/backward passes: 'auto' = bfloat16 where the hardware has it "
        "(AVX512-BF16/AMX CPUs, bf16 GPUs); weights and optimiser state stay in model.dtype."
    )
    device: str = _f("auto", "Where models run: 'auto' (this process's GPU when CUDA is there, else the CPU), "
                             "'cpu', 'cuda', or a torch device such as 'cuda:1'.")
    max_length: int = _f(128, "Longest prompt + response in tokens; longer prompts are cut from the left.")
    max_prompt_length: int = _f(96, "Longest prompt in tokens (cut from the left, counted as a warning).")

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must not be empty")
        _check(self.max_length > 1, "max_length", f"must be > 1, got {self.max_length}")
        _check(
            0 < self.max_prompt_length < self.max_length,
            "max_prompt_length",
            f"must be in (0, model.max_length={self.max_length}), got {self.max_prompt_length}",
        )


@dataclass
class LoRAConfig:
    enabled: bool = _f(False, "Train LoRA adapters (peft) instead of all weights.")
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = _f(0.0, "Dropout on the LoRA path.")
    target_modules: str = _f("all-linear", "Modules to adapt: 'all-linear' or a comma-separated list of names.")
    quantize: Literal["none", "4bit", "8bit"] = _f(
        "none", "QLoRA: hold the frozen base weights in 4-bit NF4 (or 8-bit) through bitsandbytes "
                "(`pip install 'tether[qlora]'`; made for CUDA, its CPU kernels are slow); the adapters train in "
                "model.dtype, and saved checkpoints merge them into the base in full precision.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = _f(
        "bfloat16", "QLoRA: the dtype 4-bit weights are dequantised to for each product.")

    def __post_init__(self) -> None:
        _check(self.r > 0, "r", f"must be > 0, got {self.r}")
        _check(self.quantize == "none" or self.enabled, "quantize", "needs lora.enabled: true (QLoRA trains adapters)")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class TaskConfig:
    name: str = _f("tiny", "Built-in task with a gold score: 'instruct' (IFEval-style verifiable instructions) "
                   "or 'tiny' (synthetic topic words, for the tiny model).")
    n_heldout: int = _f(128, "Held-out prompts (never trained on) for evaluation and RM accuracy.")
    n_demos: int = _f(2000, "SFT demonstrations the task writes (instruct: training prompts tried best-of-n) when sft.demos is not given.")

    def __post_init__(self) -> None:
        _check(self.n_heldout > 0, "n_heldout", "must be > 0")
        _check(self.n_demos > 0, "n_demos", "must be > 0")


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    warmup_ratio: float = _f(0.0, "Share of the steps spent in linear warm-up.")
    scheduler: Literal["constant", "linear", "cosine"] = _f("constant", "Learning-rate schedule after warm-up.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    batch_size: int = _f(32, "Examples per optimiser step (the global batch).")
    micro_batch_size: int = _f(32, "Examples per forward pass; batch_size / micro_batch_size = accumulation steps.")
    micro_batch_tokens: int = _f(-1, "Padded tokens per forward pass: the examples of each optimiser step are "
                                 "sorted by length and cut into passes of at most micro_batch_size examples and "
                                 "this many tokens (rows × longest row), so short examples are not padded to long "
                                 "ones and activations stay small. Same gradient. -1 = auto (512 on a CPU, "
                                 "16384 on a GPU); 0 = micro_batch_size examples in data order.")
    max_nonfinite_steps: int = _f(5, "Stop the stage after this many optimiser steps in a row with a non-finite "
                                     "loss or gradient (each is skipped, weights untouched, and logged).")

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _check(self.batch_size > 0 and self.micro_batch_size > 0, "batch_size", "must be > 0")
        _check(
            self.batch_size % self.micro_batch_size == 0,
            "micro_batch_size",
            f"must divide batch_size ({self.batch_size}), got {self.micro_batch_size}",
        )
        _check(len(self.betas) == 2, "betas", "must be two numbers")
        _check(self.micro_batch_tokens >= -1, "micro_batch_tokens", f"must be -1 (auto), 0 (off) or a token count, "
               f"got {self.micro_batch_tokens}")
        _check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", f"must be >= 1, got {self.max_nonfinite_steps}")


@dataclass
class SFTConfig:
    demos: Optional[str] = _f(None, "JSONL of demonstrations (prompt, response); default: the task writes them.")
    epochs: float = _f(3.0, "Passes over the demonstrations.")
    max_steps: int = _f(0, "Stop after this many optimiser steps (0 = use epochs).")
    best_of_n: int = _f(4, "Tasks that write no demonstrations (instruct): base-model samples per training "
                        "prompt; the best one the task accepts becomes a demonstration (task.n_demos prompts).")
    repair: bool = _f(True, "When no best-of-n sample is accepted, let the task edit its best samples until "
                      "every instruction holds (tasks with a repair(), such as instruct); false = rejection "
                      "sampling only.")
    generation: "GenerationConfig" = field(default_factory=lambda: GenerationConfig(),
                                           metadata={"help": "Sampling of the best-of-n candidates."})
    optim: OptimConfig = _sub(OptimConfig, "Optimiser for SFT.")

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.max_steps >= 0, "max_steps", "must be >= 0")
        _check(self.best_of_n > 0, "best_of_n", "must be > 0")


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(16, "Longest response in tokens.")
    temperature: float = _f(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = _f(1.0, "Nucleus sampling mass.")
    top_k: int = _f(0, "Top-k sampling (0 = off).")
    batch_size: int = _f(64, "Prompts per generate() call with engine 'transformers' (the Tether engine sizes its "
                                 "batch from memory).")
    engine: str = _f("auto", "Sampler: 'tether' (continuous batching, each prompt prefilled once for its samples), "
                             "'transformers' (its generate), or 'auto' (tether where the model is Llama-shaped).")

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        _check(self.engine in ("auto", "tether", "transformers"), "engine", "must be auto, tether or transformers")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")


@dataclass
class PrefsConfig:
    path: Optional[str] = _f(None, "JSONL of rankings/pairs; default: sample from the SFT policy and label with simulated labelers.")
    n_prompts: int = _f(400, "Training prompts to collect rankings for.")
    k: int = _f(4, "Responses per prompt that a labeler ranks.")
    n_labelers: int = _f(6, "Simulated labelers (rater ids labeler-0 ...).")
    overlap: float = _f(0.25, "Share of prompts ranked by several labelers (for agreement statistics).")
    labelers_per_item: int = _f(3, "Labelers on each overlapping prompt.")
    target_agreement: float = _f(0.72, "Pairwise agreement of two simulated labelers; sets their Bradley-Terry noise.")
    heldout_prompts: int = _f(64, "Held-out prompts whose K samples give the RM's held-out pairs.")
    aggregate: Literal["none", "majority", "soft"] = _f(
        "none", "Items ranked by several labelers: none (each ranking trains as it is), majority (one hard pair "
                "per pair of responses, the majority's side) or soft (one pair whose label is the share of "
                "labelers preferring it; used by the RM loss and cDPO/IPO/SimPO).")
    app_db: str = _f("", "feedback: app: the labeling app's database (`tether label serve --db ...`); the K "
                         "samples become its items and the stage waits for their labels.")
    app_quota: int = _f(0, "feedback: app: labels to wait for (0 = every item × the app's overlap).")
    app_timeout: float = _f(0.0, "feedback: app: give up after this many seconds (0 = wait as long as it takes); "
                                 "a rerun goes on waiting for the same items.")
    generation: GenerationConfig = _sub(GenerationConfig, "Sampling of the K responses.")

    def __post_init__(self) -> None:
        _check(self.k >= 2, "k", f"must be >= 2, got {self.k}")
        _check(self.app_quota >= 0 and self.app_timeout >= 0, "app_quota", "app_quota and app_timeout must be >= 0")
        _check(self.n_prompts > 0, "n_prompts", "must be > 0")
        _check(self.n_labelers >= 1, "n_labelers", "must be >= 1")
        _check(0.0 <= self.overlap <= 1.0, "overlap", "must be in [0, 1]")
        _check(
            1 <= self.labelers_per_item <= self.n_labelers,
            "labelers_per_item",
            f"must be in [1, n_labelers={self.n_labelers}]",
        )
        _check(0.5 < self.target_agreement < 1.0, "target_agreement", "must be in (0.5, 1)")


@dataclass
class RMConfig:
    loss: Literal["bradley_terry", "plackett_luce"] = _f(
        "bradley_terry", "Ranking loss: BT over all K(K-1)/2 pairs (InstructGPT) or Plackett-Luce."
    )
    epochs: float = _f(2.0, "Passes over the rankings.")
    max_steps: int = _f(0, "Stop after this many optimiser steps (0 = use epochs).")
    share_prompt: bool = _f(True, "Run each ranking's prompt once for its K responses (its KV cache repeated): "
                                  "the same scores and gradients for about half the compute at K = 4.")
    ensemble: int = _f(1, "Reward heads on the shared backbone (> 1: an ensemble whose members differ in their "
                          "head's initialisation and, with `bootstrap`, in their bootstrap sample of the rankings).")
    bootstrap: bool = _f(True, "ensemble > 1: each head weighs each ranking by its count in its own bootstrap "
                               "resample (Poisson(1)).")
    uncertainty_penalty: float = _f(0.0, "λ: the 'rm' reward is mean − λ·std over the ensemble's heads "
                                         "(uncertainty-penalised reward; 0 = the mean).")
    margin_scale: float = _f(1.0, "A comparison's `strength` s becomes the Bradley-Terry margin "
                                  "margin_scale·s (Llama 2); 0 ignores strengths.")
    trunk: Literal["tuned", "frozen"] = _f(
        "tuned", "tuned: the backbone is trained with the head (LoRA when lora.enabled; InstructGPT). frozen: the SFT "
                 "backbone stays as it is and only the linear head(s) are fitted on its final state at each "
                 "response's last token (one forward pass over the rankings, then a second per fit: regularisation "
                 "chosen by cross-validation and the learning curve come almost free; "
                 "`epochs` and `optim` are not used).")
    head_l2: list[float] = _f([1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "trunk=frozen: L2 strengths tried on standardised "
                                                         "features; the one with the lowest cross-validated loss is kept.")
    head_steps: int = _f(300, "trunk=frozen: full-batch Adam steps (lr 0.01) of each head fit.")
    head_folds: int = _f(5, "trunk=frozen: folds of the rankings' cross-validation that chooses the L2 strength "
                            "(then the heads are fitted on all of them).")
    learning_curve: list[int] = _f([25, 50, 100, 200], "trunk=frozen: held-out accuracy of heads fitted "
                                                              "on the first n rankings, for each n below the total "
                                                              "(and all of them); [] = none.")
    optim: OptimConfig = _sub(OptimConfig, "Optimiser for the reward model (batch = rankings).")

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.margin_scale >= 0, "margin_scale", "must be >= 0")
        _check(self.ensemble >= 1, "ensemble", "must be >= 1")
        _check(self.uncertainty_penalty >= 0, "uncertainty_penalty", "must be >= 0")
        _check(bool(self.head_l2) and all(x >= 0 for x in self.head_l2), "head_l2", "must be a non-empty list of values >= 0")
        _check(self.head_steps >= 1, "head_steps", "must be >= 1")
        _check(self.head_folds >= 2, "head_folds", "must be >= 2")
        _check(all(n >= 2 for n in self.learning_curve), "learning_curve", "sizes must be >= 2")


@dataclass
class KLConfig:
    controller: Literal["adaptive", "fixed"] = _f("adaptive", "Adaptive (Ziegler et al. 2019) or fixed KL coefficient.")
    init_coef: float = _f(0.05, "Initial KL coefficient beta.")
    target: float = _f(6.0, "Target KL (nats per sequence) for the adaptive controller.")
    horizon: int = _f(10000, "Adaptive controller horizon (in samples).")

    def __post_init__(self) -> None:
        _check(self.init_coef >= 0, "init_coef", "must be >= 0")
        _check(self.target > 0, "target", "must be > 0")
        _check(self.horizon > 0, "horizon", "must be > 0")


@dataclass
class PPOConfig:
    steps: int = _f(40, "Rollout batches (each followed by PPO updates).")
    rollout_batch_size: int = _f(64, "Responses sampled per rollout batch.")
    mini_batch_size: int = _f(16, "Responses per optimiser step within a rollout batch.")
    micro_batch_size: int = _f(16, "Responses per forward pass (gradient accumulation inside a mini-batch).")
    epochs: int = _f(4, "PPO epochs over each rollout batch.")
    clip: float = _f(0.2, "Policy ratio clip epsilon.")
    value_clip: float = _f(0.2, "Value clip around the rollout-time values.")
    vf_coef: float = _f(0.1, "Weight of the value loss.")
    gamma: float = _f(1.0, "Discount.")
    lam: float = _f(0.95, "GAE lambda.")
    whiten_rewards: bool = _f(False, "Whiten the per-token rewards (scale only) before GAE.")
    missing_eos_penalty: float = _f(1.0, "Subtracted from the score of a response cut off before EOS (0 = off).")
    critic: Literal["model", "head"] = _f("model", "Value function: a separate model (a second backbone, InstructGPT) "
                                          "or a linear head on the policy's own last hidden states, detached "
                                          "(no second backbone: ~40% less compute per PPO step).")
    value_init: Literal["rm", "sft"] = _f("rm", "critic=model: initialise the value model from the reward model (InstructGPT) or the SFT policy.")
    value_lr: float = _f(0.0, "Learning rate of the value model (0 = same as optim.lr).")
    samples_per_prompt: int = _f(1, "Responses sampled per prompt in a rollout batch (rollout_batch_size / this "
                                    "many prompts per batch).")
    score_baseline: Literal["none", "loo"] = _f(
        "none", "Subtract from each response's score the mean score of the other samples of the same prompt "
                "(needs samples_per_prompt ≥ 2). A Bradley-Terry reward model is only defined up to a constant per "
                "prompt; this removes that constant, so PPO's advantages compare answers to the same prompt.")
    share_prompt: bool = _f(True, "With samples_per_prompt > 1, run each prompt once for all its samples (its KV "
                                  "cache repeated): the same results for less compute. Needs mini_batch_size and "
                                  "micro_batch_size to be multiples of samples_per_prompt.")
    kl: KLConfig = _sub(KLConfig, "KL penalty to the reference (SFT) policy.")
    rollout_backend: Literal["transformers", "vllm"] = _f(
        "transformers", "Rollout sampling engine: transformers' generate, or vLLM (the vllm extra; GPUs, or vLLM's "
                        "CPU build), whose weights are synced from the trainer after each update.")
    vllm_memory: float = _f(0.3, "rollout_backend vllm: its share of GPU memory (CPU build: of CPU memory) for weights "
                                 "and KV cache; the trainer keeps the rest.")
    generation: GenerationConfig = _sub(GenerationConfig, "Rollout sampling.")
    optim: OptimConfig = _sub(OptimConfig, "Policy optimiser (batch sizes are taken from this section).")

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", "must be > 0")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(
            self.rollout_batch_size % self.mini_batch_size == 0,
            "mini_batch_size",
            f"must divide rollout_batch_size ({self.rollout_batch_size})",
        )
        _check(
            self.mini_batch_size % self.micro_batch_size == 0,
            "micro_batch_size",
            f"must divide mini_batch_size ({self.mini_batch_size})",
        )
        _check(self.samples_per_prompt >= 1, "samples_per_prompt", "must be ≥ 1")
        _check(
            self.rollout_batch_size % self.samples_per_prompt == 0,
            "samples_per_prompt",
            f"must divide rollout_batch_size ({self.rollout_batch_size})",
        )
        _check(self.score_baseline == "none" or self.samples_per_prompt >= 2, "score_baseline",
               "'loo' needs samples_per_prompt ≥ 2")
        if self.share_prompt and self.samples_per_prompt > 1:
            _check(self.micro_batch_size % self.samples_per_prompt == 0, "micro_batch_size",
                   f"must be a multiple of samples_per_prompt ({self.samples_per_prompt}) with share_prompt "
                   "(or set share_prompt: false)")
        _check(0 < self.clip < 1, "clip", "must be in (0, 1)")
        _check(0 <= self.lam <= 1 and 0 <= self.gamma <= 1, "lam", "gamma and lam must be in [0, 1]")


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = _f(
        "sigmoid", "sigmoid = DPO (with label_smoothing > 0: conservative DPO), ipo, hinge (SLiC), simpo "
                   "(reference-free, length-normalised), orpo (SFT + odds ratio, reference-free).")
    beta: float = _f(0.1, "β: the strength of the implicit KL tether (DPO/IPO/hinge ~0.1); SimPO's reward "
                          "scale (~2).")
    label_smoothing: float = _f(0.0, "Probability that a label is flipped (cDPO; sigmoid and simpo).")
    simpo_gamma: float = _f(1.0, "SimPO's target reward margin γ.")
    orpo_lambda: float = _f(0.1, "ORPO's weight λ of the odds-ratio term.")
    epochs: float = _f(1.0, "Passes over the rankings (each gives K(K-1)/2 pairs).")
    max_steps: int = _f(0, "Stop after this many optimiser steps (0 = use epochs).")
    share_prompt: bool = _f(True, "Run each ranking's prompt once for its K responses.")
    cache_reference: bool = _f(True, "Keep the reference log-probs on disk under $TETHER_HOME/cache, keyed by "
                                     "data, reference model and tokenisation, and reuse them.")
    kl_prompts: int = _f(32, "Held-out prompts sampled after training to estimate KL(policy || reference) "
                             "(0 = skip).")
    generation: GenerationConfig = _sub(GenerationConfig, "Sampling for the KL estimate.")
    optim: OptimConfig = _sub(OptimConfig, "Optimiser (batch = rankings).")

    def __post_init__(self) -> None:
        _check(self.beta > 0, "beta", "must be > 0")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        _check(self.label_smoothing == 0 or self.loss in ("sigmoid", "simpo"), "label_smoothing",
               f"applies to the sigmoid and simpo losses, not {self.loss}")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.kl_prompts >= 0, "kl_prompts", "must be >= 0")


@dataclass
class GRPOConfig:
    steps: int = _f(20, "Rollout batches (each followed by policy updates).")
    rollout_batch_size: int = _f(64, "Responses sampled per rollout batch (samples_per_prompt per prompt).")
    samples_per_prompt: int = _f(8, "G: responses per prompt, compared with each other.")
    mini_batch_size: int = _f(64, "Responses per optimiser step (= rollout_batch_size with epochs 1: on-policy, "
                                  "the ratio is 1 and no extra forward pass is needed).")
    micro_batch_size: int = _f(16, "Responses per forward pass.")
    epochs: int = _f(1, "Passes over each rollout batch.")
    clip: float = _f(0.2, "Ratio clip ε.")
    advantage: Literal["grpo", "rloo"] = _f("grpo", "grpo: (r − group mean)/scale; rloo: r − mean of the other "
                                                    "G − 1 samples.")
    scale: Literal["group", "batch", "none"] = _f("group", "grpo: divide by the group's std (GRPO), the "
                                                           "batch's std, or nothing (Dr. GRPO).")
    eps: float = _f(1e-4, "Added to the std before dividing.")
    beta: float = _f(0.04, "Weight of the KL to the reference (0 = no reference at all).")
    kl_penalty: Literal["loss", "reward"] = _f(
        "loss", "loss: β·k3 per token in the loss (GRPO); reward: β·Σ(logπ − logπ_ref) taken from each "
                "sequence's reward before the baseline (RLOO, as in Ahmadian et al. 2024).")
    aggregation: Literal["token", "sequence"] = _f("token", "Loss mean over all tokens of the batch (DAPO) or "
                                                            "per sequence first (GRPO's paper).")
    missing_eos_penalty: float = _f(0.0, "Subtracted from the reward of a response cut off before EOS.")
    share_prompt: bool = _f(True, "Run each prompt once for its G samples (KV cache repeated).")
    rollout_backend: Literal["transformers", "vllm"] = _f(
        "transformers", "Rollout sampling engine: transformers' generate, or vLLM (the vllm extra; GPUs, or vLLM's "
                        "CPU build), whose weights are synced from the trainer after each update.")
    vllm_memory: float = _f(0.3, "rollout_backend vllm: its share of GPU memory (CPU build: of CPU memory) for weights "
                                 "and KV cache; the trainer keeps the rest.")
    generation: GenerationConfig = _sub(GenerationConfig, "Rollout sampling.")
    optim: OptimConfig = _sub(OptimConfig, "Policy optimiser.")

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", "must be > 0")
        _check(self.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 (a group needs a baseline)")
        _check(self.rollout_batch_size % self.samples_per_prompt == 0, "samples_per_prompt",
               f"must divide rollout_batch_size ({self.rollout_batch_size})")
        _check(self.rollout_batch_size % self.mini_batch_size == 0, "mini_batch_size",
               f"must divide rollout_batch_size ({self.rollout_batch_size})")
        _check(self.mini_batch_size % self.micro_batch_size == 0, "micro_batch_size",
               f"must divide mini_batch_size ({self.mini_batch_size})")
        if self.share_prompt:
            _check(self.micro_batch_size % self.samples_per_prompt == 0, "micro_batch_size",
                   f"must be a multiple of samples_per_prompt ({self.samples_per_prompt}) with share_prompt")
        _check(self.beta >= 0, "beta", "must be >= 0")
        _check(0 < self.clip < 1, "clip", "must be in (0, 1)")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(0 < self.vllm_memory < 1, "vllm_memory", f"must be in (0, 1), got {self.vllm_memory}")


@dataclass
class RLOOConfig(GRPOConfig):
    advantage: Literal["grpo", "rloo"] = _f("rloo", "grpo: (r − group mean)/scale; rloo: r − mean of the "
                                                    "other G − 1 samples.")
    kl_penalty: Literal["loss", "reward"] = _f(
        "reward", "loss: β·k3 per token in the loss (GRPO); reward: β·Σ(logπ − logπ_ref) taken from each "
                  "sequence's reward before the baseline (RLOO, as in Ahmadian et al. 2024).")
    samples_per_prompt: int = _f(4, "G: responses per prompt, compared with each other.")
    beta: float = _f(0.05, "Weight of the KL to the reference (0 = no reference at all).")


@dataclass
class PRMConfig:
    path: Optional[str] = _f(None, "JSONL of step-labelled solutions ({prompt, steps, labels}); default: the SFT "
                                   "policy's samples on training prompts, labelled by the task's step checker.")
    separator: Optional[str] = _f(None, "What joins the steps into a response (default: the task's, else a newline).")
    n_prompts: int = _f(1000, "Training prompts whose samples the PRM learns from.")
    samples_per_prompt: int = _f(4, "Samples per training prompt.")
    sample_temperature: Optional[float] = _f(None, "Temperature of the training samples (default: "
                                                   "generation.temperature); hotter samples hold more wrong steps "
                                                   "to learn from.")
    epochs: float = _f(2.0, "Passes over the step-labelled solutions.")
    max_steps: int = _f(0, "Optimiser steps (0 = from epochs).")
    aggregate: Literal["min", "prod"] = _f("min", "A solution's score from its steps' probabilities: the weakest "
                                                  "step or their product.")
    dense: bool = _f(True, "With reward 'prm': PPO/GRPO/RLOO get each step's probability at its last token "
                           "(process supervision; GRPO's process advantages) instead of one aggregated score.")
    outcome_baseline: bool = _f(True, "Also train an outcome reward model (one label per solution: is the final "
                                      "answer right) on the same samples, and compare best-of-N with it.")
    best_of: int = _f(8, "N of the best-of-N evaluation on held-out prompts (0 = none).")
    heldout_prompts: int = _f(200, "Held-out prompts of the best-of-N evaluation and the held-out step accuracy.")
    generation: GenerationConfig = _sub(GenerationConfig, "Sampling the solutions.")
    optim: OptimConfig = _sub(OptimConfig, "PRM (and ORM) optimiser.")

    def __post_init__(self) -> None:
        _check(self.n_prompts > 0, "n_prompts", "must be > 0")
        _check(self.samples_per_prompt > 0, "samples_per_prompt", "must be > 0")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.best_of >= 0, "best_of", "must be >= 0")
        _check(self.heldout_prompts > 1, "heldout_prompts", "must be > 1")


POLICIES = ("ppo", "dpo", "grpo", "rloo")
STAGES = ("data", "sft", "prefs", "rm", "prm", *POLICIES, "eval")


@dataclass
class EvalConfig:
    n_prompts: int = _f(128, "Held-out prompts to evaluate each policy on.")
    samples_per_prompt: int = _f(2, "Sampled responses per prompt (the standard error is over prompts).")
    policies: list = _f([], "Policies to evaluate (base, sft, ppo, dpo, grpo, rloo); empty = base, sft and "
                            "the run's policy.")
    kl: list = _f(["sft", "ppo", "dpo", "grpo", "rloo"], "Policies whose KL to their reference is measured (sft "
                  "vs base, the others vs sft); each costs two forward passes over its samples.")
    other_checkpoints: bool = _f(True, "Also evaluate a policy stage's other kept checkpoint (the monitor's best/, "
                                       "or last/ under monitor.select: best) as <policy>_best / <policy>_last.")
    generation: GenerationConfig = _sub(GenerationConfig, "Sampling for evaluation.")

    def __post_init__(self) -> None:
        _check(self.n_prompts > 1, "n_prompts", "must be > 1")
        _check(self.samples_per_prompt > 0, "samples_per_prompt", "must be > 0")
        bad = [p for p in self.policies if p not in ("base", "sft", *POLICIES)]
        _check(not bad, "policies", f"unknown policies {bad}; choose from base, sft, {', '.join(POLICIES)}")
        bad = [p for p in self.kl if p not in ("sft", *POLICIES)]
        _check(not bad, "kl", f"unknown policies {bad}; choose from sft, {', '.join(POLICIES)}")

REFUSAL_PHRASES = ["i can't", "i cannot", "i'm sorry", "i am sorry", "as an ai", "i'm unable", "i am unable",
                   "i won't be able"]
FLATTERY_PHRASES = ["great question", "excellent question", "what a wonderful", "you're absolutely right",
                    "you are absolutely right", "i'm so glad", "happy to help", "amazing question"]


@dataclass
class MonitorConfig:
    enabled: bool = _f(True, "Check the policy on validation prompts during ppo/grpo/rloo/dpo (proxy vs gold/judge, "
                             "KL, length, diversity, entropy, phrase rates) and watch for reward hacking.")
    n_prompts: int = _f(32, "Validation prompts: the last ones of the task's training prompts, never trained on by "
                            "the policy stages nor used by the final evaluation.")
    checks: int = _f(4, "Checks spread evenly over a stage (plus one before its first step).")
    every: int = _f(0, "Check every this many steps instead (0 = use `checks`).")
    judge: Optional[str] = _f(None, "A held-out judge scored on the validation samples: a reward spec such as "
                                    "'module:function' or 'gold' (never optimised).")
    heldout_rm: Optional[str] = _f(None, "A second reward model (checkpoint folder) scored on the validation "
                                         "samples as a held-out signal.")
    tolerance: float = _f(0.03, "Held-out drop below its best that can raise the proxy-up/held-out-down alarm.")
    z: float = _f(2.0, "... and the drop must exceed z paired standard errors (per-prompt differences).")
    patience: int = _f(2, "Checks in a row the proxy-up/held-out-down condition must hold.")
    max_length_ratio: float = _f(2.0, "Alarm when the mean response length exceeds this × its value at the start.")
    min_length_ratio: float = _f(0.33, "Alarm when the mean response length falls below this × its start.")
    min_diversity_ratio: float = _f(0.6, "Alarm when distinct-2 falls below this × its value at the start.")
    max_repeat_rate: float = _f(0.3, "Alarm when more than this share of the responses' 3-grams repeat.")
    max_disagreement_ratio: float = _f(3.0, "Alarm when the RM ensemble's std exceeds this × its start.")
    early_stop: bool = _f(False, "Stop the stage at the first alarm (see `stop_on`).")
    stop_on: Literal["hacking", "any"] = _f("hacking", "Which alarm stops: proxy-up/held-out-down only, or any drift.")
    keep_best: bool = _f(True, "Keep the weights of the best check by the held-out signal and save them as "
                               "<stage>/best/ beside the last checkpoint when they differ.")
    select: Literal["last", "best"] = _f("last", "Which weights become <stage>/checkpoint (evaluated and used "
                                                 "downstream); the other is kept as <stage>/best or <stage>/last.")
    refusal_phrases: list = _f(REFUSAL_PHRASES, "Phrases counted by monitor/refusal_rate (case-insensitive).")
    flattery_phrases: list = _f(FLATTERY_PHRASES, "Phrases counted by monitor/flattery_rate (case-insensitive).")
    generation: GenerationConfig = _sub(GenerationConfig, "Sampling on the validation prompts (fixed seed).")

    def __post_init__(self) -> None:
        _check(self.n_prompts > 1, "n_prompts", "must be > 1")
        _check(self.checks > 0, "checks", "must be > 0")
        _check(self.every >= 0, "every", "must be >= 0")
        _check(self.patience > 0, "patience", "must be > 0")
        _check(0 < self.min_length_ratio <= 1 <= self.max_length_ratio, "max_length_ratio",
               "need 0 < min_length_ratio <= 1 <= max_length_ratio")
        if self.judge:
            from tether.rewards import parse_reward_spec

            try:
                parse_reward_spec(self.judge)
            except ValueError as exc:
                raise ConfigError(f"monitor.judge: {exc}") from None


@dataclass
class JudgeConfig:
    kind: Literal["hf", "http"] = _f("hf", "hf: a local causal LM reads P('A') vs P('B') from its next token; "
                                           "http: an OpenAI-compatible /v1/chat/completions endpoint.")
    model: str = _f("", "hf: the judge model (zoo name, folder or hub id; empty = model.name). http: the "
                        "request's model name (empty: 'default').")
    base_url: str = _f("", "http: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1 (`tether serve`).")
    api_model: str = _f("", "http: the model name sent in requests, when it differs from `model`.")
    api_key_env: str = _f("OPENAI_API_KEY", "http: environment variable holding the API key (unset: none sent).")
    rubric: list = _f(["helpfulness", "honesty", "harmlessness", "conciseness"],
                      "Criteria in the judging prompt: built-in names or your own sentences.")
    constitution: str = _f("", "A YAML list of principles the judge also weighs ('builtin' for Tether's own; "
                               "empty = none).")
    labels: list = _f(["A", "B"], "The names of the two responses in the judging prompt; the answer is one of them "
                                  "(each must be a single token of the judge's tokenizer).")
    logprobs: bool = _f(True, "http: ask for top_logprobs and read P('A') from them (else the answer's letter).")
    timeout: float = _f(60.0, "http: seconds per request attempt.")
    max_retries: int = _f(4, "http: retries (exponential backoff) after timeouts, 429/5xx and malformed replies.")
    concurrency: int = _f(4, "http: requests in flight at most.")
    cache: str = _f("", "http: SQLite cache of replies (empty = $TETHER_HOME/chat_cache.sqlite); a rerun never "
                        "pays twice.")
    batch_size: int = _f(8, "hf: judging prompts per forward pass.")

    def __post_init__(self) -> None:
        _check(self.timeout > 0, "timeout", "must be > 0")
        _check(self.max_retries >= 0, "max_retries", "must be >= 0")
        _check(self.concurrency >= 1, "concurrency", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(bool(self.rubric), "rubric", "must name at least one criterion")
        _check(len(self.labels) == 2 and all(isinstance(x, str) and x.strip() for x in self.labels)
               and self.labels[0].strip() != self.labels[1].strip(), "labels",
               f"must be two different non-empty strings (quote words YAML reads as booleans), got {self.labels!r}")


@dataclass
class FlywheelConfig:
    rounds: int = _f(3, "Rounds of: sample from the current policy → label (feedback) → retrain the reward model "
                        "on every label so far → optimise the policy from where it is. prefs.n_prompts new "
                        "prompts per round.")

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "rounds", "must be >= 1")


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


@dataclass
class CheckpointConfig:
    every: int = _f(25, "Save a resumable checkpoint (weights, optimiser, scheduler, RNG states, data position, "
                        "KL controller, monitor) every this many optimiser steps of sft/rm/dpo, and rollouts of "
                        "ppo/grpo/rloo; 0 saves none (a cut-off stage then starts again).")
    every_minutes: float = _f(10.0, "Also save when this many minutes passed since the last save (0: by steps only).")
    keep: int = _f(2, "Checkpoints kept per stage (the newest); the one before the newest is the fallback when "
                      "the newest is found corrupt.")
    keep_after: bool = _f(False, "Keep a stage's checkpoints once it finishes (they are deleted by default).")
    resume: Literal["auto", "force", "never"] = _f(
        "auto", "auto: a cut-off stage resumes from its newest checkpoint when the stage's settings and the "
                "results it reads are unchanged (else its checkpoints are moved aside and it starts again); "
                "force: resume from the newest checkpoint even under changed settings (its weights, data "
                "position and optimiser moments; learning rate and schedule from the new config), e.g. after "
                "a stop on non-finite steps; never: always start a cut-off stage again.")

    def __post_init__(self) -> None:
        _check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        _check(self.every_minutes >= 0, "every_minutes", f"must be >= 0, got {self.every_minutes}")
        _check(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")


@dataclass
class RayConfig:
    enabled: bool = _f(False, "Run the grpo/rloo stage on Ray workers (the ray extra): a trainer and rollout "
                              "workers in a placement group, weights to the workers after each update.")
    address: Optional[str] = _f(None, "A running Ray cluster ('auto' or host:port); none starts a local one.")
    rollout_workers: int = _f(1, "Rollout workers (each samples and rewards a block of each rollout's prompts).")
    rollout_cpus: float = _f(1.0, "CPUs per rollout worker.")
    rollout_gpus: float = _f(0.0, "GPUs per rollout worker (fractions share a GPU).")
    trainer_cpus: float = _f(1.0, "CPUs for the trainer.")
    trainer_gpus: float = _f(0.0, "GPUs for the trainer.")
    strategy: Literal["PACK", "SPREAD"] = _f("PACK", "PACK: the bundles on as few nodes as possible; SPREAD: "
                                                     "across nodes.")

    def __post_init__(self) -> None:
        _check(self.rollout_workers >= 1, "rollout_workers", "must be >= 1")
        _check(self.rollout_cpus > 0 and self.trainer_cpus > 0, "rollout_cpus", "CPUs must be > 0")
        _check(self.rollout_gpus >= 0 and self.trainer_gpus >= 0, "rollout_gpus", "GPUs must be >= 0")


@dataclass
class RunConfig:
    seed: int = _f(0, "Seed for every random choice of the run.")
    out: str = _f("", "Run directory (default: runs/<preset>).")
    preset: str = _f("default", "Name of the preset this config started from (informational).")
    policy: Literal["ppo", "dpo", "grpo", "rloo"] = _f(
        "ppo", "How the SFT policy is aligned: ppo (reward model + PPO), dpo (directly on the preferences; see "
               "dpo.loss for IPO/SimPO/ORPO...), grpo or rloo (group-relative policy gradient on `reward`).")
    reward: str = _f("rm", "What ppo/grpo/rloo maximise: 'rm' (the reward model), 'gold' (the task's checker), "
                           "'module:function' (a Python callable (prompts, responses) -> scores), or a weighted "
                           "sum such as '0.5*gold + rm'.")
    feedback: Literal["simulated", "judge", "file", "app"] = _f(
        "simulated", "Where the preferences come from: simulated labelers (gold + Bradley-Terry noise), an AI "
                     "judge (RLAIF; see `judge`), a file (prefs.path; implied when prefs.path is set), or people "
                     "in the labeling app (prefs.app_db).")
    stages: list = _f([], "Stages to run, in order; empty = what `policy` and `reward` need, e.g. data, sft, "
                          "prefs, rm, ppo, eval.")
    threads: int = _f(0, "torch CPU threads (0 = torch's default).")
    trackers: list = _f(["tensorboard"], "Where metrics go besides each stage's metrics.jsonl: tensorboard "
                                          "(DIR/tensorboard/<stage>), wandb, mlflow, trackio (when installed).")
    report: bool = _f(True, "Write DIR/report.html at the end of the run.")
    model: ModelConfig = _sub(ModelConfig, "The policy's model.")
    lora: LoRAConfig = _sub(LoRAConfig, "LoRA adapters for every stage.")
    ray: RayConfig = _sub(RayConfig, "Ray placement of the grpo/rloo stage's trainer and rollout workers.")
    prm: PRMConfig = _sub(PRMConfig, "Process reward model: a score per reasoning step (tasks with step labels).")
    task: TaskConfig = _sub(TaskConfig, "Built-in task (prompts, gold score, demonstrations).")
    sft: SFTConfig = _sub(SFTConfig, "Supervised fine-tuning.")
    prefs: PrefsConfig = _sub(PrefsConfig, "Preference collection.")
    judge: JudgeConfig = _sub(JudgeConfig, "The AI judge of feedback: judge (RLAIF).")
    rm: RMConfig = _sub(RMConfig, "Reward model.")
    ppo: PPOConfig = _sub(PPOConfig, "PPO with a KL penalty to the SFT policy.")
    dpo: DPOConfig = _sub(DPOConfig, "DPO and its family, on the preference rankings.")
    grpo: GRPOConfig = _sub(GRPOConfig, "GRPO: G samples per prompt, group-relative advantages.")
    rloo: RLOOConfig = _sub(RLOOConfig, "RLOO: G samples per prompt, leave-one-out baseline.")
    eval: EvalConfig = _sub(EvalConfig, "Held-out evaluation of every policy.")
    monitor: MonitorConfig = _sub(MonitorConfig, "Reward-hacking monitors, over-optimisation alarms, best checkpoint.")
    flywheel: FlywheelConfig = _sub(FlywheelConfig, "`tether flywheel`: rounds of labelling the policy's samples.")
    checkpoint: CheckpointConfig = _sub(CheckpointConfig, "Crash-safe checkpoints inside each training stage: a "
                                                          "run started again with the same command resumes.")

    def __post_init__(self) -> None:
        if self.prefs.path and self.feedback == "simulated":
            self.feedback = "file"
        _check(self.feedback != "file" or bool(self.prefs.path), "feedback",
               "'file' needs prefs.path (a JSONL file or dataset of rankings/pairs)")
        _check(self.feedback != "app" or bool(self.prefs.app_db), "prefs.app_db",
               "feedback 'app' needs the labeling app's database (tether label serve --db FILE)")
        _check(self.feedback != "judge" or not self.prefs.path, "feedback",
               f"'judge' labels the SFT policy's samples, but prefs.path is set ({self.prefs.path}); use one")
        _check(self.feedback != "judge" or self.judge.kind != "http" or bool(self.judge.base_url), "judge.base_url",
               "judge.kind 'http' needs the endpoint's base URL, e.g. http://127.0.0.1:8000/v1 (`tether serve`)")
        _check(not self.judge.base_url or self.judge.base_url.startswith(("http://", "https://")), "judge.base_url",
               f"must start with http:// or https://, got {self.judge.base_url!r}")
        if self.prefs.aggregate == "soft":  # soft labels and ties need a loss that takes a target
            _check(self.rm.loss == "bradley_terry", "prefs.aggregate",
                   "'soft' gives soft labels and ties, which rm.loss 'plackett_luce' cannot use; use bradley_terry")
            _check(self.policy != "dpo" or self.dpo.loss in ("sigmoid", "ipo", "simpo"), "prefs.aggregate",
                   f"'soft' gives soft labels and ties, which dpo.loss '{self.dpo.loss}' cannot use; use sigmoid, "
                   "ipo or simpo, or prefs.aggregate: majority")
        bad = [t for t in self.trackers if t not in TRACKERS]
        _check(not bad, "trackers", f"unknown trackers {bad}; choose from {', '.join(TRACKERS)}")
        bad = [s for s in self.stages if s not in STAGES]
        _check(not bad, "stages", f"unknown stages {bad}; choose from {', '.join(STAGES)}")
        from tether.rewards import parse_reward_spec

        try:
            parse_reward_spec(self.reward)
        except ValueError as exc:
            raise ConfigError(f"reward: {exc}") from None

    def stage_list(self) -> list[str]:
        """The stages to run: ``stages`` if given, else those the policy and reward need."""
        if self.stages:
            return list(self.stages)
        from tether.rewards import parse_reward_spec

        names = {name for _, name in parse_reward_spec(self.reward)}
        if self.policy == "dpo":
            middle = ["prefs"]
        else:
            middle = ["prefs", "rm"] if "rm" in names else []
        if "prm" in names and self.policy != "dpo":
            middle.append("prm")
        return ["data", "sft", *middle, self.policy, "eval"]

    def eval_policies(self) -> list[str]:
        return list(self.eval.policies) or ["base", "sft", self.policy]


# ----------------------------------------------------------------------------- building
#
# What the builders refuse, each as a ConfigError naming the key (and file, and line for bad
# YAML): a file that cannot be read or is not UTF-8, invalid YAML, a top level that is not a
# mapping, values nested more than MAX_CONFIG_DEPTH levels deep or referring to themselves
# (a YAML alias inside its own anchor), a section given as anything but a mapping (an empty
# one is fine), a value of the wrong type, NaN for a number, an integer of more than 63 bits,
# text holding a NUL character or a lone surrogate, a list item of the wrong type (a list of
# numbers where the default holds numbers, else of text), an unknown preset.

MAX_CONFIG_DEPTH = 16
_INT_LIMIT = 2**63
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 6, 4, 2


def _short(value: Any) -> str:
    """A repr for error messages, cut short (never expands a huge or self-referring value)."""
    return _repr.repr(value)


def _clip(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[: limit // 2] + " … " + text[-limit // 2 :]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "off" in choices:  # YAML reads a bare `off` as false
            value = "off"
        if not isinstance(value, (str, int, float, bool)) or value not in choices:
            near = difflib.get_close_matches(value, [str(c) for c in choices], n=1) \
                if isinstance(value, str) and len(value) <= 100 else []
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            shown = f"'{value}'" if isinstance(value, str) and len(value) <= 100 else _short(value)
            raise ConfigError(f"{key}: {shown} is not one of {list(choices)}{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {_short(value)}")
    if isinstance(value, str) and tp in (int, float):
        try:
            value = float(value) if tp is float or any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {_short(value)}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
        if abs(value) >= _INT_LIMIT:
            raise ConfigError(f"{key}: {_short(value)} is out of range (more than 63 bits)")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        if value != value:
            raise ConfigError(f"{key}: expected a number, got NaN")
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            raise ConfigError(f"{key}: {_short(value)} is out of range") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {_short(value)}")
        return _text(str(value), key)
    if tp is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_short(value)}")
        numbers = bool(default) and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in default)
        return [_coerce(v, float if numbers else str, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _text(value: str, key: str) -> str:
    if "\x00" in value:
        raise ConfigError(f"{key}: must not hold a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{key}: holds a lone surrogate \\u{ord(value[exc.start]):04x}, which is not Unicode") from None
    return value


def _check_shape(data: Any, source: str) -> None:
    """Refuse values nested more than ``MAX_CONFIG_DEPTH`` levels deep or holding themselves."""
    where = f" (in {source})" if source else ""
    heights: dict[int, int] = {}  # id of a container checked already → its height
    on_path: set[int] = set()

    def height(x: Any, key: str, level: int) -> int:
        if not isinstance(x, (dict, list)):
            return 0
        i = id(x)
        if i in heights:
            if level + heights[i] > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{key or 'config'}: nested more than {MAX_CONFIG_DEPTH} levels deep{where}")
            return heights[i]
        if i in on_path:
            raise ConfigError(f"{key or 'config'}: refers to itself (a YAML alias inside its own anchor){where}")
        if level >= MAX_CONFIG_DEPTH:
            raise ConfigError(f"{key or 'config'}: nested more than {MAX_CONFIG_DEPTH} levels deep{where}")
        on_path.add(i)
        if isinstance(x, dict):
            subs = [(v, f"{key}.{k}" if key else str(k)) for k, v in x.items()]
        else:
            subs = [(v, f"{key}[{n}]") for n, v in enumerate(x)]
        h = 1 + max((height(v, k, level + 1) for v, k in subs), default=0)
        on_path.discard(i)
        heights[i] = h
        return h

    height(data, "", 0)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        hints = typing.get_type_hints(cls)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_valid_keys(hints[f.name], name + "."))
    return keys


def _unknown_key_error(key: str, source: str, line: int | None = None) -> ConfigError:
    where = (f" in {source}" + (f", line {line}" if line else "")) if source else ""
    if len(key) > 200:
        return ConfigError(f"unknown config key '{key[:60]}…' ({len(key)} characters){where}")
    near = difflib.get_close_matches(key, _valid_keys(RunConfig), n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


_OVERRIDDEN = -1  # in ``lines``: the key was set by an override, not by the file


def _line(lines: dict[str, int] | None, key: str) -> int | None:
    """The line of the file that set a dotted key (else its nearest section), if known."""
    while lines and key and key not in lines:
        key = key.rpartition(".")[0]
    return (lines or {}).get(key)


def _where(source: str, lines: dict[str, int] | None, key: str) -> str:
    """`` (in FILE, line N)`` for a dotted key (see :func:`_line`); ``''`` without a file or
    for a key an override set."""
    line = _line(lines, key)
    if not source or line == _OVERRIDDEN:
        return ""
    return f" (in {source}, line {line})" if line else f" (in {source})"


def _build(cls: type, data: dict, prefix: str, source: str, lines: dict[str, int] | None = None) -> Any:
    """``cls(**data)`` with every value checked; ``lines`` (dotted key → line of ``source``)
    puts the line into the errors."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "config"
        line = _line(lines, section)
        where = (f" in {source}" + (f", line {line}" if line and line > 0 else "")) \
            if source and line != _OVERRIDDEN else ""
        raise ConfigError(f"{section}{where}: expected a mapping, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            full = prefix + str(key)
            line = _line(lines, full)
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key
                (sub, value), = value.items()
                full += f".{sub}"
            raise _unknown_key_error(full, "" if line == _OVERRIDDEN else source, line if line and line > 0 else None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, {} if value is None else value, prefix + name + ".", source, lines)
        else:
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            try:
                kwargs[name] = _coerce(value, tp, prefix + name, default)
            except ConfigError as exc:
                raise ConfigError(_clip(str(exc)) + _where(source, lines, prefix + name)) from None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ names the field; put the section path in front of it
        key = prefix + str(exc).split(":", 1)[0]
        raise ConfigError(_clip(f"{prefix}{exc}") + _where(source, lines, key)) from None


def config_to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (for YAML / JSON)."""
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path | str, text: str | None = None, lines: dict[str, int] | None = None) -> dict:
    """The mapping a YAML file (or ``text``) holds; fills ``lines`` (dotted key → line) if given."""
    try:
        raw = text if text is not None else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:  # a folder, no permission, ...
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    loader = None
    try:
        loader = yaml.SafeLoader(raw)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, e.g. NUL
        line = raw[: exc.position].count("\n") + 1
        raise ConfigError(f"{path}: line {line}, column {exc.position - raw.rfind(chr(10), 0, exc.position)} "
                          f"invalid YAML: character #x{exc.character:04x} is not allowed") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path}: invalid YAML: {str(exc).split(';')[0]}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    _check_shape(data, str(path))
    if lines is not None:
        _key_lines(node, "", lines, set())
    return data


def _key_lines(node: Any, prefix: str, out: dict[str, int], seen: set[int]) -> None:
    """Dotted key → line of each mapping key under ``node`` (a shape checked already)."""
    if not isinstance(node, yaml.MappingNode) or id(node) in seen:
        return
    seen.add(id(node))
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            key = prefix + str(key_node.value)
            out.setdefault(key, key_node.start_mark.line + 1)
            _key_lines(value_node, key + ".", out, seen)


def list_presets() -> list[str]:
    """Names of the built-in presets (``tether/configs/*.yaml``)."""
    folder = resources.files("tether") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_dict(name: str) -> dict:
    folder = resources.files("tether") / "configs"
    if not isinstance(name, str) or name not in list_presets():  # a name, never a path
        near = difflib.get_close_matches(name, list_presets(), n=1) if isinstance(name, str) and len(name) < 100 else []
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        shown = name if isinstance(name, str) and len(name) < 100 else _short(name)
        raise ConfigError(f"unknown preset '{shown}'{hint}; presets: {', '.join(list_presets())}")
    entry = folder / f"{name}.yaml"
    return _read_yaml(f"preset {name}", entry.read_text(encoding="utf-8"))


def parse_override(item: str) -> tuple[str, Any]:
    """``'ppo.kl.target=6'`` → ``('ppo.kl.target', 6)``; values are read as YAML (``[a, b]`` is
    a list); a value that is not valid YAML is kept as the text it is."""
    if not isinstance(item, str):
        raise ConfigError(f"an override must be text like section.key=value, got {_short(item)}")
    if "=" not in item:
        raise ConfigError(f"override {_short(item)} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {_short(item)} has no key; it must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an integer of more than 4300 digits
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict (checked later against the dataclasses)."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'section.key=value' texts, got the text {_short(overrides)}")
    out = copy.deepcopy(data)
    for item in overrides:
        key, value = parse_override(item)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig`: dataclass defaults ← preset ← YAML file ← overrides.

    The preset is ``preset``, else the file's own ``preset:`` key, else ``default``.
    """
    lines: dict[str, int] = {}
    file_data = _read_yaml(path, lines=lines) if path else {}
    name = preset or file_data.get("preset") or "default"
    data = _deep_merge(_preset_dict(name), file_data)
    data["preset"] = name
    data = apply_overrides(data, overrides or [])
    for item in overrides or []:  # an error in what an override set names no line of the file
        key = parse_override(item)[0]
        lines = {k: v for k, v in lines.items() if not k.startswith(key + ".")}
        lines[key] = _OVERRIDDEN
    source = str(path) if path else ""
    return _build(RunConfig, data, "", source, lines)


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a config from :func:`config_to_dict` output (e.g. a run's config.yaml)."""
    _check_shape(data, "")
    return _build(RunConfig, data, "", "")


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for ``tether config --help``-style listings."""
    rows = []
    hints = typing.get_type_hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
        else:
            rows.append((prefix + f.name, repr(getattr(default_obj, f.name)), f.metadata.get("help", "")))
    return rows
