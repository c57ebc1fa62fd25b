"""One measurement: train one stage with Tether or TRL on the same model, data,
hyperparameters and seed, in this process, and print one JSON line.

    python bench/workers.py --impl tether|trl --task sft|rm|dpo|grpo --model FOLDER --run RUN_DIR \
        [--steps 12] [--batch 8] [--lr 1e-5] [--max-length 256] [--threads 2]

``RUN_DIR`` is a finished ``tether run`` folder (its ``data/demos.jsonl``,
``prefs/rankings.jsonl``, ``prefs/heldout.jsonl`` and training prompts are the data).
``bench/compare.py`` runs this file in fresh processes, alternating the two sides.

Timed: the training call alone (TRL's ``trainer.train()``, Tether's ``train_*``), after
the model and data are loaded; each side's own per-step preprocessing and reference
passes are inside it. Peak memory: the process's maximum resident set size. The quality
figure is computed by one shared function for both sides, on held-out data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


# --------------------------------------------------------------------------- shared


def matmul_peak(n: int = 2048, repeats: int = 8, device: str = "cpu") -> float:
    """FLOP/s of an n×n fp32 matrix product on this machine, now (the roofline for MFU);
    on a GPU 8192² (and whatever TF32 setting the process has)."""
    if device != "cpu":
        n, repeats = 8192, 20
    a, b, c = (torch.randn(n, n, device=device) for _ in range(3))
    for _ in range(2):
        torch.mm(a, b, out=c)  # into one preallocated output: the arithmetic, not the allocator
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=c)
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def matrix_params(model) -> tuple[int, int]:
    """(N_body, N_head): the weights that do matrix products per token in the transformer
    body, and in the LM head (vocabulary × hidden; 0 for a reward model, whose scalar head
    is negligible). The input embedding is a lookup (no FLOPs): it counts only where it is
    also the (tied) output projection."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    unique = {id(p): p for p in inner.parameters()}
    embed = inner.get_input_embeddings().weight
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    head_w = head.weight if head is not None else None
    skip = {id(embed)} | ({id(head_w)} if head_w is not None else set())
    body = sum(p.numel() for k, p in unique.items() if k not in skip and p.dim() >= 2)
    return body, (head_w.numel() if head_w is not None else 0)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def load_data(run: Path):
    from tether.data.io import read_jsonl
    from tether.data.schemas import load_demonstrations, load_rankings, rankings_to_pairs

    demos = load_demonstrations(run / "data" / "demos.jsonl")
    rankings = load_rankings(run / "prefs" / "rankings.jsonl", allow_empty_responses=True)
    pairs = [p for p in rankings_to_pairs(rankings) if not p.get("tie") and p["chosen"] and p["rejected"]]
    heldout = [rec for _, rec in read_jsonl(run / "prefs" / "heldout.jsonl")]
    prompts = [rec["prompt"] for _, rec in read_jsonl(run / "data" / "prompts_train.jsonl")]
    return demos, pairs, heldout, prompts


def token_count(tokenizer, prompt, response) -> tuple[int, int]:
    from tether.data.tokenize import chat_prompt_ids

    p = chat_prompt_ids(tokenizer, messages(prompt))
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    return len(p), len(r) + 1


def messages(prompt):
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


@torch.no_grad()
def heldout_nll(model, tokenizer, demos, max_length: int) -> tuple[float, float]:
    """Per-token NLL of held-out demonstrations' responses (SFT quality), and its standard
    error (from the spread of the per-example means)."""
    from tether.algorithms.sft import collate_sft, sft_micro_loss
    from tether.data.tokenize import Encoder

    enc = Encoder(tokenizer, max_length, max_length // 2)
    model.eval()
    sums, counts = [], []
    for d in demos:
        batch = {k: v.to(next(model.parameters()).device) for k, v in collate_sft(enc, [d]).items()}
        n = float(batch["loss_mask"][:, 1:].sum())
        sums.append(float(sft_micro_loss(model, batch, normalizer=n)) * n)
        counts.append(n)
    per_example = torch.tensor(sums) / torch.tensor(counts)
    return sum(sums) / sum(counts), float(per_example.std() / len(demos) ** 0.5)


@torch.no_grad()
def heldout_pair_accuracy(score, heldout) -> tuple[float, float]:
    """Share of held-out response pairs with distinct gold that ``score(prompt, responses)``
    orders as gold does (RM and DPO quality), and its binomial standard error."""
    from tether.algorithms.reward import pairwise_accuracy

    agree = total = 0
    for g in heldout:
        a, n = pairwise_accuracy(score(g["prompt"], g["responses"]), g["gold"])
        agree, total = agree + a, total + n
    acc = agree / max(total, 1)
    return acc, (acc * (1 - acc) / max(total, 1)) ** 0.5


SKIP_QUALITY = False


def quality(name: str, value_se) -> dict:
    """``value_se``: (value, standard error), or a zero-argument function giving them (not
    called under --no-quality, e.g. for random-weight models, where quality means nothing)."""
    if SKIP_QUALITY:
        return {name: float("nan"), "se": float("nan")}
    value, se = value_se() if callable(value_se) else value_se
    return {name: value, "se": se}


# --------------------------------------------------------------------------- tether


def tether_side(args, demos, pairs, heldout, prompts, tokenizer):
    from tether.config import DPOConfig, GRPOConfig, ModelConfig, OptimConfig, RMConfig, SFTConfig
    from tether.data.schemas import Demonstration, Ranking
    from tether.data.tokenize import Encoder
    from tether.models import frozen_copy, load_policy, load_scalar_model

    mcfg = ModelConfig(name=args.model, max_length=args.max_length, max_prompt_length=args.max_length // 2,
                       autocast="off")
    enc = Encoder(tokenizer, args.max_length, args.max_length // 2)
    optim = OptimConfig(lr=args.lr, batch_size=args.batch, micro_batch_size=args.micro or args.batch,
                        micro_batch_tokens=args.micro_tokens)
    out = {}
    if args.task == "sft":
        model = load_policy(args.model, mcfg).to(args.device)
        data = [Demonstration(d.prompt, d.response) for d in demos]
        t0 = time.perf_counter()
        from tether.algorithms.sft import train_sft

        train_sft(model, enc, data, SFTConfig(max_steps=args.steps, optim=optim), seed=0)
        out["seconds"] = time.perf_counter() - t0
        out["items"] = args.steps * args.batch
        out["quality"] = quality("heldout_nll", lambda: heldout_nll(model, tokenizer, args.held_demos, args.max_length))
        return out, model
    rankings = [Ranking(prompt=p["prompt"], responses=[p["chosen"], p["rejected"]], order=[0, 1]) for p in pairs]
    if args.task == "rm":
        from tether.algorithms.reward import score_responses, train_reward

        model = load_scalar_model(args.model, mcfg, pad_token_id=enc.pad_id, num_labels=1).to(args.device)
        t0 = time.perf_counter()
        train_reward(model, enc, rankings, RMConfig(max_steps=args.steps, optim=optim), seed=0)
        out["seconds"] = time.perf_counter() - t0
        out["items"] = args.steps * args.batch
        out["quality"] = quality("heldout_pair_accuracy", lambda: heldout_pair_accuracy(
            lambda p, rs: score_responses(model, enc, [p] * len(rs), rs).tolist(), heldout))
        return out, model
    if args.task == "dpo":
        from tether.algorithms.dpo import train_dpo

        policy = load_policy(args.model, mcfg).to(args.device)
        reference = frozen_copy(policy)
        t0 = time.perf_counter()
        train_dpo(policy, reference, enc, rankings, DPOConfig(max_steps=args.steps, beta=0.1, optim=optim), seed=0)
        out["seconds"] = time.perf_counter() - t0
        out["items"] = args.steps * args.batch
        out["quality"] = quality("heldout_pair_accuracy", lambda: dpo_accuracy(policy, reference, enc, heldout))
        return out, policy
    if args.task == "grpo":
        from tether.algorithms.grpo import train_grpo
        from tether.config import GenerationConfig
        from tether.tasks import get_task

        task = get_task(args.task_name)
        policy = load_policy(args.model, mcfg).to(args.device)
        gen = GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, batch_size=args.batch)
        cfg = GRPOConfig(steps=args.steps, rollout_batch_size=args.batch, samples_per_prompt=args.batch,
                         mini_batch_size=args.batch, micro_batch_size=args.micro or args.batch, beta=args.grpo_beta,
                         optim=OptimConfig(lr=args.lr, batch_size=args.batch, micro_batch_size=args.batch),
                         generation=gen)
        reference = frozen_copy(policy) if args.grpo_beta > 0 else None
        t0 = time.perf_counter()
        train_grpo(policy, reference, enc, prompts, lambda r: torch.tensor(task.gold_batch(r.prompts, r.texts)), cfg,
                   seed=0)
        out["seconds"] = time.perf_counter() - t0
        out["items"] = args.steps * args.batch
        out["quality"] = quality("heldout_gold", lambda: sampled_gold(policy, enc, task, args))
        return out, policy
    if args.task == "ppo":
        from tether.algorithms.ppo import train_ppo
        from tether.algorithms.reward import score_rollout
        from tether.config import GenerationConfig, KLConfig, PPOConfig
        from tether.tasks import get_task

        task = get_task(args.task_name)
        policy = load_policy(args.model, mcfg).to(args.device)
        reference = frozen_copy(policy)
        rm_path = str(Path(args.run) / "rm" / "checkpoint")
        reward_model = load_scalar_model(rm_path, mcfg, pad_token_id=enc.pad_id, num_labels=1).requires_grad_(False)
        reward_model.to(args.device)
        if args.ppo_critic == "head":  # Tether's lighter critic: a linear head on the policy's states
            from tether.algorithms.ppo import ValueHead

            value_model = ValueHead(policy.config.hidden_size).to(args.device)
        else:  # a second backbone, as TRL's PPO has it
            value_model = load_scalar_model(rm_path, mcfg, pad_token_id=enc.pad_id, num_labels=1).to(args.device)
        cfg = PPOConfig(steps=args.steps, rollout_batch_size=args.batch, mini_batch_size=args.batch,
                        micro_batch_size=args.micro or args.batch, epochs=args.ppo_epochs, missing_eos_penalty=0.0,
                        critic=args.ppo_critic, samples_per_prompt=1, kl=KLConfig(controller="fixed", init_coef=0.05),
                        generation=GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                                                    batch_size=args.batch), optim=optim)
        t0 = time.perf_counter()
        train_ppo(policy, value_model, reference, enc, prompts,
                  lambda rollout: score_rollout(reward_model, rollout, args.batch), cfg, seed=0)
        out["seconds"] = time.perf_counter() - t0
        out["items"] = args.steps * args.batch
        out["quality"] = quality("heldout_gold", lambda: sampled_gold(policy, enc, task, args))
        return out, policy
    raise SystemExit(f"unknown task {args.task}")


@torch.no_grad()
def dpo_accuracy(policy, reference, enc, heldout) -> float:
    """Held-out accuracy of the implicit reward log π − log π_ref against gold."""
    from tether.algorithms.dpo import ranking_logps
    from tether.algorithms.reward import collate_rankings
    from tether.data.schemas import Ranking

    policy.eval()

    def score(prompt, responses):
        batch = collate_rankings(enc, [Ranking(prompt=prompt, responses=responses, order=list(range(len(responses))))],
                                 True, split=True)
        batch = {k: v.to(next(policy.parameters()).device) for k, v in batch.items()}
        return (ranking_logps(policy, batch)[0] - ranking_logps(reference, batch)[0])[0].tolist()

    return heldout_pair_accuracy(score, heldout)


@torch.no_grad()
def sampled_gold(policy, enc, task, args, n: int = 64) -> tuple[float, float]:
    from tether.config import GenerationConfig
    from tether.rollout import generate

    policy.eval()
    prompts = task.heldout_prompts()[:n]
    rollout = generate(policy, enc, prompts, GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                                                              batch_size=n), seed=123)
    gold = torch.tensor(task.gold_batch(rollout.prompts, rollout.texts), dtype=torch.float64)
    return float(gold.mean()), float(gold.std() / len(gold) ** 0.5)


# --------------------------------------------------------------------------- TRL


def timed_train(trainer, args, out: dict) -> None:
    """TRL's ``trainer.train()``, timed; the items it trained on."""
    t0 = time.perf_counter()
    trainer.train()
    out["seconds"] = time.perf_counter() - t0
    out["items"] = args.steps * args.batch


def trl_side(args, demos, pairs, heldout, prompts, tokenizer):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tmp = tempfile.mkdtemp(prefix="trl-bench-")
    common = dict(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.micro or args.batch,
                  gradient_accumulation_steps=args.batch // (args.micro or args.batch), learning_rate=args.lr,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  logging_steps=10**6, save_strategy="no", report_to=[], seed=0, use_cpu=args.device == "cpu", bf16=False,
                  fp16=False, dataloader_num_workers=0, disable_tqdm=True,
                  gradient_checkpointing=args.trl_gc)  # TRL's default is on; equal settings: off on both
    out = {}
    if args.task == "sft":
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list([{"prompt": messages(d.prompt), "completion": [{"role": "assistant", "content": d.response}]}
                                for d in demos])
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        trainer = SFTTrainer(model=model, args=SFTConfig(max_length=args.max_length, **common), train_dataset=ds,
                             processing_class=tokenizer)
        timed_train(trainer, args, out)
        out["quality"] = quality("heldout_nll", lambda: heldout_nll(model, tokenizer, args.held_demos, args.max_length))
        return out, model
    ds = Dataset.from_list([{"prompt": messages(p["prompt"]), "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    if args.task == "rm":
        from trl import RewardConfig, RewardTrainer

        from tether.algorithms.reward import score_responses
        from tether.data.tokenize import Encoder

        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(max_length=args.max_length, **common), train_dataset=ds,
                                processing_class=tokenizer)
        timed_train(trainer, args, out)
        enc = Encoder(tokenizer, args.max_length, args.max_length // 2)
        out["quality"] = quality("heldout_pair_accuracy", lambda: heldout_pair_accuracy(
            lambda p, rs: score_responses(model, enc, [p] * len(rs), rs).tolist(), heldout))
        return out, model
    if args.task == "dpo":
        from trl import DPOConfig, DPOTrainer

        from tether.data.tokenize import Encoder
        from tether.models import frozen_copy

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        reference = frozen_copy(model)
        trainer = DPOTrainer(model=model, ref_model=reference, args=DPOConfig(max_length=args.max_length, beta=0.1,
                                                                              **common),
                             train_dataset=ds, processing_class=tokenizer)
        timed_train(trainer, args, out)
        enc = Encoder(tokenizer, args.max_length, args.max_length // 2)
        out["quality"] = quality("heldout_pair_accuracy", lambda: dpo_accuracy(model, reference, enc, heldout))
        return out, model
    if args.task == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        from tether.data.tokenize import Encoder
        from tether.tasks import get_task

        task = get_task(args.task_name)

        def reward(prompts, completions, **_):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            asked = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
            return task.gold_batch(asked, texts)

        ds = Dataset.from_list([{"prompt": messages(p)} for p in prompts])
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        cfg = GRPOConfig(num_generations=args.batch, max_completion_length=args.new_tokens, beta=args.grpo_beta,
                         temperature=1.0, **{**common, "per_device_train_batch_size": args.batch,
                                             "gradient_accumulation_steps": 1})
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tokenizer)
        timed_train(trainer, args, out)
        out["quality"] = quality("heldout_gold", lambda: sampled_gold(
            model, Encoder(tokenizer, args.max_length, args.max_length // 2), task, args))
        return out, model
    if args.task == "ppo":
        # TRL 1.16 has no PPO; its experimental PPO (removed in 1.14) runs from a TRL 1.10
        # put first on sys.path by --trl-path
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        from tether.data.tokenize import Encoder, chat_prompt_ids
        from tether.models import frozen_copy, load_scalar_model
        from tether.config import ModelConfig
        from tether.tasks import get_task

        task = get_task(args.task_name)
        tokenizer.padding_side = "left"
        ds = Dataset.from_list([{"input_ids": chat_prompt_ids(tokenizer, messages(p))} for p in prompts])
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        reference = frozen_copy(model)
        mcfg = ModelConfig(name=args.model, max_length=args.max_length, max_prompt_length=args.max_length // 2,
                           autocast="off")
        rm_path = str(Path(args.run) / "rm" / "checkpoint")
        reward_model = load_scalar_model(rm_path, mcfg, pad_token_id=tokenizer.pad_token_id, num_labels=1)
        value_model = load_scalar_model(rm_path, mcfg, pad_token_id=tokenizer.pad_token_id, num_labels=1)
        common.pop("max_steps")
        cfg = PPOConfig(total_episodes=args.steps * args.batch, num_mini_batches=1, num_ppo_epochs=args.ppo_epochs,
                        response_length=args.new_tokens, stop_token="eos", kl_coef=0.05, kl_estimator="k1",
                        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False,
                        temperature=1.0, missing_eos_penalty=None, local_rollout_forward_batch_size=args.batch,
                        num_sample_generations=0, **common)
        trainer = PPOTrainer(args=cfg, processing_class=tokenizer, model=model, ref_model=reference,
                             reward_model=reward_model, value_model=value_model, train_dataset=ds,
                             eval_dataset=ds.select(range(min(8, len(ds)))))
        timed_train(trainer, args, out)
        out["quality"] = quality("heldout_gold", lambda: sampled_gold(
            model, Encoder(tokenizer, args.max_length, args.max_length // 2), task, args))
        return out, model
    raise SystemExit(f"unknown task {args.task}")


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=["tether", "trl"], required=True)
    ap.add_argument("--task", choices=["sft", "rm", "dpo", "grpo", "ppo"], required=True)
    ap.add_argument("--model", required=True, help="an HF model folder (or a Tether zoo name)")
    ap.add_argument("--run", required=True, help="a finished `tether run` folder: its data are the bench's data")
    ap.add_argument("--task-name", default="instruct", help="the task whose gold scores GRPO (instruct or tiny)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=0, help="micro-batch (default: the batch)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32, help="GRPO: tokens sampled per response")
    ap.add_argument("--grpo-beta", type=float, default=0.0, help="GRPO: KL coefficient (TRL's default is 0)")
    ap.add_argument("--micro-tokens", type=int, default=-1,
                    help="Tether: optim.micro_batch_tokens (-1 auto, 0 off: whole micro-batches in data order)")
    ap.add_argument("--trl-gc", action="store_true",
                    help="TRL: gradient checkpointing on (its default); off by default here, as Tether has none")
    ap.add_argument("--ppo-epochs", type=int, default=2, help="PPO: epochs over each rollout batch")
    ap.add_argument("--ppo-critic", choices=["model", "head"], default="model",
                    help="Tether PPO's critic: a second backbone (as TRL) or a value head on the policy")
    ap.add_argument("--trl-path", default="",
                    help="put this folder first on sys.path (PPO: a `pip install --target` of trl==1.10.0)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where both sides train")
    ap.add_argument("--no-quality", action="store_true", help="skip the held-out quality (random-weight models)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.trl_path:
        sys.path.insert(0, args.trl_path)
    global SKIP_QUALITY
    SKIP_QUALITY = args.no_quality
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TETHER_QUIET", "1")
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from tether.models import load_tokenizer
    from tether.zoo import resolve_model

    args.model = resolve_model(args.model)
    tokenizer = load_tokenizer(args.model)
    demos, pairs, heldout, prompts = load_data(Path(args.run))
    # one pass over exactly the data the steps use (a bigger set would only add up-front
    # work, e.g. reference log-probs for pairs no step reaches); held-out demos from the end
    used = args.steps * args.batch
    held_demos = demos[-64:]
    demos, pairs = demos[:used], pairs[:used]
    if len(demos) < used and args.task == "sft" or len(pairs) < used and args.task in ("rm", "dpo"):
        raise SystemExit(f"{args.run} has too few examples for {args.steps} steps of {args.batch}")
    args.held_demos = held_demos
    side = tether_side if args.impl == "tether" else trl_side
    out, model = side(args, demos, pairs, heldout, prompts, tokenizer)
    # model FLOPs of the timed work (the same count for both sides): 6·N per token of every
    # training sequence in full (prompt + response, no padding), the LM head only where a loss
    # reads it (response positions); 2·N per token of forward-only work (DPO's reference, GRPO's
    # sampling). Work a side skips (a prompt shared by its responses) still counts as done.
    body, head = matrix_params(model)
    used = args.steps * args.batch
    if args.task == "sft":
        counts = [token_count(tokenizer, d.prompt, d.response) for d in demos[:used]]
        flops = sum(6 * body * (p + r) + 6 * head * r for p, r in counts)
    elif args.task in ("rm", "dpo"):
        mult = 6 if args.task == "rm" else 8  # DPO: + the reference's forward pass
        flops = 0
        for pair in pairs[:used]:
            for response in (pair["chosen"], pair["rejected"]):
                p, r = token_count(tokenizer, pair["prompt"], response)
                flops += mult * body * (p + r) + (mult * head * r if args.task == "dpo" else 0)
    elif args.task == "grpo":  # sampling (2·N) + one on-policy update (6·N) per sample, R = max new tokens
        r = args.new_tokens
        p = sum(token_count(tokenizer, prompt, "")[0] for prompt in prompts) / len(prompts)
        flops = used * (8 * body * (p + r) + 8 * head * r)
    else:  # PPO: policy sampling + reference (2·N each) + E epochs (6·N); value and reward
        # forward (2·N each) + E value epochs (6·N) on a backbone of the same size
        r, e = args.new_tokens, args.ppo_epochs
        p = sum(token_count(tokenizer, prompt, "")[0] for prompt in prompts) / len(prompts)
        critic = 0 if args.ppo_critic == "head" else 1  # the value head's FLOPs are negligible
        flops = used * ((4 + 6 * e) * ((1 + critic) * body * (p + r) + head * r) + (2 - 2 * critic) * body * (p + r))
    peak = matmul_peak(device=args.device)
    if args.device.startswith("cuda"):
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    out.update(impl=args.impl, task=args.task, model=args.model, steps=args.steps, batch=args.batch,
               per_s=out["items"] / out["seconds"], peak_rss_gb=round(peak_rss_gb(), 3), params_body=body, params_head=head,
               model_flops=flops, achieved_gflops=flops / out["seconds"] / 1e9, peak_gflops=peak / 1e9,
               mfu=flops / out["seconds"] / peak, threads=torch.get_num_threads())
    print("BENCH " + json.dumps(out), flush=True)
    return 0 if math.isfinite(out["per_s"]) else 1


if __name__ == "__main__":
    sys.exit(main())
