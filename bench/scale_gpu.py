"""Scale-out checks on one GPU: DPO with full fine-tuning, LoRA and QLoRA (4-bit NF4 base)
side by side, and GRPO's throughput with the transformers rollout backend (and vLLM's,
where it is installed), on one model and one set of rankings.

    python bench/scale_gpu.py --model DIR --rankings FILE --out results.json

``--model``: a causal-LM folder (e.g. ``bench/random_model.py``'s random SmolLM2 where the
real weights cannot travel: throughput and memory depend on the architecture and token
counts, not on the weights). ``--rankings``: a run's ``prefs/rankings.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEVICE, AUTOCAST = "cuda", "bfloat16"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


def _dpo(model_dir: str, rankings, variant: str, steps: int, batch: int) -> dict:
    from tether.algorithms.dpo import train_dpo
    from tether.config import DPOConfig, LoRAConfig, ModelConfig, OptimConfig
    from tether.data.tokenize import Encoder
    from tether.models import autocast_context, frozen_copy, is_quantized, load_policy, load_tokenizer

    mcfg = ModelConfig(name=model_dir, max_length=256, max_prompt_length=128, autocast=AUTOCAST, device=DEVICE)
    lora = {"full": None,
            "lora": LoRAConfig(enabled=True, r=16, alpha=32),
            "qlora-4bit": LoRAConfig(enabled=True, r=16, alpha=32, quantize="4bit", compute_dtype="bfloat16")}[variant]
    _reset()
    policy = load_policy(model_dir, mcfg, lora)
    reference = frozen_copy(policy) if lora is None else None
    encoder = Encoder(load_tokenizer(model_dir), mcfg.max_length, mcfg.max_prompt_length)
    cfg = DPOConfig(max_steps=steps, optim=OptimConfig(lr=1e-5, batch_size=batch, micro_batch_size=batch))
    with autocast_context(AUTOCAST, DEVICE):
        warm = DPOConfig(max_steps=2, optim=cfg.optim)
        train_dpo(policy, reference, encoder, rankings[: 4 * batch], warm, seed=0)  # kernels, allocator
        _sync()
        t0 = time.time()
        out = train_dpo(policy, reference, encoder, rankings, cfg, seed=1)
        _sync()
        seconds = time.time() - t0
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    result = {"variant": variant, "steps": steps, "batch": batch, "pairs_per_s": None,
              "loop_seconds": out["seconds"], "seconds_with_reference_pass": seconds,
              "rankings_per_s": steps * batch / out["seconds"], "final_loss": out["final_loss"],
              "peak_gpu_gb": _peak(), "trainable_params": trainable,
              "quantized": is_quantized(policy)}
    k = len(rankings[0].responses)
    result["pairs_per_s"] = result["rankings_per_s"] * k * (k - 1) / 2
    del policy, reference
    return result


def _grpo(model_dir: str, backend: str, steps: int, rollout: int, group: int, new_tokens: int) -> dict:
    from tether.algorithms.grpo import train_grpo
    from tether.config import GenerationConfig, GRPOConfig, ModelConfig, OptimConfig
    from tether.data.tokenize import Encoder
    from tether.models import autocast_context, frozen_copy, load_policy, load_tokenizer
    from tether.tasks import get_task

    task = get_task("instruct")
    mcfg = ModelConfig(name=model_dir, max_length=256, max_prompt_length=128, autocast=AUTOCAST, device=DEVICE)
    _reset()
    policy = load_policy(model_dir, mcfg)
    encoder = Encoder(load_tokenizer(model_dir), mcfg.max_length, mcfg.max_prompt_length)
    cfg = GRPOConfig(steps=steps, rollout_batch_size=rollout, samples_per_prompt=group, mini_batch_size=rollout,
                     micro_batch_size=rollout, beta=0.04,
                     generation=GenerationConfig(max_new_tokens=new_tokens, batch_size=rollout),
                     optim=OptimConfig(lr=1e-6), rollout_backend=backend)

    def reward(rollout_):
        return torch.tensor(task.gold_batch(rollout_.prompts, rollout_.texts))

    rows = []

    class Log:
        def log(self, step, row):
            rows.append(row)

    with autocast_context(AUTOCAST, DEVICE):
        warm = GRPOConfig(**{**cfg.__dict__, "steps": 1})
        train_grpo(policy, frozen_copy(policy), encoder, task.train_prompts(), reward, warm, seed=0)
        _sync()
        out = train_grpo(policy, frozen_copy(policy), encoder, task.train_prompts(), reward, cfg, seed=1,
                         logger=Log())
    gen = sum(r["time/generate"] for r in rows)
    train = sum(r["time/train"] for r in rows)
    samples = steps * rollout
    return {"backend": backend, "steps": steps, "rollout_batch": rollout, "group": group,
            "max_new_tokens": new_tokens, "samples_per_s": samples / out["seconds"],
            "generate_samples_per_s": samples / gen, "generated_tokens_per_s":
                sum(r["response/length"] for r in rows) * rollout / gen,
            "seconds": out["seconds"], "generate_seconds": gen, "train_seconds": train,
            "mean_length": sum(r["response/length"] for r in rows) / len(rows),
            "peak_gpu_gb": _peak()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rankings", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dpo-steps", type=int, default=12)
    ap.add_argument("--dpo-batch", type=int, default=8)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--rollout", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--only", default="dpo,grpo")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    args = ap.parse_args(argv)
    global DEVICE, AUTOCAST
    DEVICE, AUTOCAST = args.device, ("bfloat16" if args.device == "cuda" else "off")
    from tether.data.schemas import load_rankings

    rankings = load_rankings(args.rankings, allow_empty_responses=True)
    results = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
               "dpo": [], "grpo": []}
    try:
        import transformers

        results["transformers"] = transformers.__version__
        import bitsandbytes

        results["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as exc:
        results["missing"] = str(exc)

    def save():
        Path(args.out).write_text(json.dumps(results, indent=1))

    only = set(args.only.split(","))
    if "dpo" in only:
        for variant in ("full", "lora", "qlora-4bit"):
            try:
                results["dpo"].append(_dpo(args.model, rankings, variant, args.dpo_steps, args.dpo_batch))
            except Exception as exc:  # one variant failing keeps the others' figures
                results["dpo"].append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(results["dpo"][-1]), flush=True)
            save()
    if "grpo" in only:
        for backend in ("transformers", "vllm"):
            try:
                results["grpo"].append(_grpo(args.model, backend, args.grpo_steps, args.rollout, args.group,
                                             args.new_tokens))
            except Exception as exc:
                results["grpo"].append({"backend": backend, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(results["grpo"][-1]), flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
