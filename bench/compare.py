"""Tether against TRL, side by side: the same model, data, hyperparameters and seed, each
measurement in a fresh process, the two sides alternating, medians of ``--repeats`` runs.

    python bench/compare.py --model smollm2-135m-instruct --run runs/default \
        [--tasks sft,rm,dpo,grpo] [--repeats 3] [--steps 12] [--out bench/results/cpu.md]

Prints (and writes, with ``--out``) a table of throughput ratios (Tether / TRL), peak
memory, model FLOP utilisation against the fp32 matmul peak measured in the same runs, and
the held-out quality each side reaches on the same budget. ``pip install -e ".[bench]"``
installs TRL (never a runtime dependency of Tether).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNITS = {"sft": "examples/s", "rm": "pairs/s", "dpo": "pairs/s", "grpo": "samples/s"}


def run_one(impl: str, task: str, args) -> dict:
    cmd = [sys.executable, str(HERE / "workers.py"), "--impl", impl, "--task", task, "--model", args.model,
           "--run", args.run, "--steps", str(args.steps if task != "grpo" else args.grpo_steps),
           "--batch", str(args.batch), "--lr", str(args.lr), "--max-length", str(args.max_length),
           "--task-name", args.task_name, "--threads", str(args.threads)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{impl} {task} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(line[len("BENCH "):])
    out["wall"] = time.time() - t0
    return out


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def quality(rows: list[dict]) -> str:
    q = rows[0]["quality"]
    name = next(iter(q))
    values = [r["quality"][name] for r in rows]
    spread = f" ({min(values):.3f}–{max(values):.3f})" if len(values) > 1 and max(values) != min(values) else ""
    return f"{name} {statistics.median(values):.3f}{spread}"


def table(results: dict, args) -> str:
    lines = [f"model: {args.model}; data: {args.run}; batch {args.batch}; fp32, full fine-tuning; "
             f"medians of {args.repeats} runs per side, alternating; threads {args.threads or 'default'}", "",
             "| task | Tether | TRL | ratio | peak RSS GB (Tether / TRL) | MFU (Tether / TRL) | held-out, Tether | held-out, TRL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, sides in results.items():
        t, r = sides["tether"], sides["trl"]
        ratio = median(t, "per_s") / median(r, "per_s")
        lines.append(f"| {task} ({UNITS[task]}) | {median(t, 'per_s'):.2f} | {median(r, 'per_s'):.2f} | {ratio:.2f}× | "
                     f"{median(t, 'peak_rss_gb'):.2f} / {median(r, 'peak_rss_gb'):.2f} | "
                     f"{median(t, 'mfu'):.1%} / {median(r, 'mfu'):.1%} | {quality(t)} | {quality(r)} |")
    peaks = [x["peak_gflops"] for sides in results.values() for rows in sides.values() for x in rows]
    lines += ["", f"fp32 2048² matmul peak measured in the runs: median {statistics.median(peaks):.0f} GFLOP/s "
                  f"(range {min(peaks):.0f}–{max(peaks):.0f})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--run", required=True, help="a finished `tether run` folder whose data the bench trains on")
    ap.add_argument("--tasks", default="sft,rm,dpo,grpo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--grpo-steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--task-name", default="instruct")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help="also write the table (Markdown) and the raw runs (JSON beside it)")
    args = ap.parse_args(argv)
    results: dict = {}
    for task in args.tasks.split(","):
        results[task] = {"tether": [], "trl": []}
        for i in range(args.repeats):
            order = ("tether", "trl") if i % 2 == 0 else ("trl", "tether")
            for impl in order:
                row = run_one(impl, task, args)
                results[task][impl].append(row)
                print(f"{task} {impl} run {i + 1}: {row['per_s']:.2f} {UNITS[task]}, {row['peak_rss_gb']:.2f} GB, "
                      f"MFU {row['mfu']:.1%}, {row['quality']}", file=sys.stderr, flush=True)
    text = table(results, args)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
