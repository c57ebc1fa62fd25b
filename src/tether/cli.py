"""The ``tether`` command.

    tether run [CONFIG.yaml] [--preset NAME] [--out DIR] [--section.key value ...]
    tether sft|prefs|rm|ppo|dpo|grpo|rloo|eval [same options]   one stage (and what it needs)
    tether models list | pull NAME
    tether data validate|stats FILE [--kind demos|rankings] [--json]
    tether judge FILE --out DIR [--judge hf|http ...]   an AI judge ranks K responses per prompt
    tether constitution --prompts FILE --out DIR [...]  critique → revise: demonstrations and pairs
    tether serve CHECKPOINT [--port 8000]          an OpenAI-compatible chat API on localhost
    tether label serve|import|export|add-labeler   the labeling web app for human rankings
    tether flywheel [CONFIG.yaml] [--flywheel.rounds 3] [--feedback simulated|judge|app]
    tether config [--preset NAME]                  every key, its value and what it does
    tether report DIR                              rebuild DIR/report.html
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]

STAGE_COMMANDS = ("sft", "prefs", "rm", "prm", "ppo", "dpo", "grpo", "rloo", "eval")


def stages_for(command: str, cfg) -> list[str]:
    """The stages ``tether COMMAND`` runs: COMMAND and those it needs, in order."""
    if command in ("sft", "prefs", "rm"):
        chain = ["data", "sft", "prefs", "rm"]
        return chain[: chain.index(command) + 1]
    if command == "prm":
        return ["data", "sft", "prm"]
    plan = cfg.stage_list()
    return plan if command == "eval" else plan[: plan.index(command) + 1]


def _split_overrides(extra: list[str]) -> tuple[str | None, list[str]]:
    """``['my.yaml', '--ppo.kl.target', '6', '--seed=1']`` → ``('my.yaml', ['ppo.kl.target=6', 'seed=1'])``."""
    from tether.config import ConfigError

    out, i, config = [], 0, None
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            if config is None and item.endswith((".yaml", ".yml")):
                config = item
                i += 1
                continue
            raise ConfigError(f"unexpected argument '{item}' (a config file ends in .yaml; overrides look like --section.key value)")
        item = item[2:]
        if "=" in item:
            out.append(item)
            i += 1
        else:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ConfigError(f"--{item} needs a value")
            out.append(f"{item}={extra[i + 1]}")
            i += 2
    return config, out


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="built-in preset to start from (default: 'default')")
    p.add_argument("--out", help="run directory (default: runs/<preset>)")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (one per GPU, or CPU processes): launches "
                        "torchrun; for several machines start `torchrun ... -m tether.cli run` yourself")


def _launch(nproc: int, argv: list[str]) -> int:
    """Start ``nproc`` copies of this command under torchrun (the same arguments, less
    ``--nproc``) and wait for them."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tether.cli", *rest]
    env = dict(os.environ)
    if not env.get("OMP_NUM_THREADS"):  # share the CPU cores out instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or nproc) // nproc))
    return subprocess.call(cmd, env=env)


def _load(args, extra):
    from tether.config import load_config

    config, overrides = _split_overrides(extra)
    if args.out:
        overrides.append(f"out={args.out}")
    return load_config(config, preset=args.preset, overrides=overrides)


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"tether run · {summary.get('task')} · {summary.get('model')}")
    table.add_column("policy")
    table.add_column("held-out gold (± s.e.)", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("KL to ref", justify="right")
    table.add_column("length", justify="right")
    table.add_column("Δ vs SFT ± s.e. (z)", justify="right")
    for name, res in summary.get("eval", {}).items():
        kl = res.get("kl_to_ref")
        vs = res.get("vs_sft") or res.get("vs_base")
        against = "sft" if res.get("vs_sft") else "base"
        table.add_row(
            name,
            f"{res['gold_mean']:.3f} ± {res['gold_stderr']:.3f}",
            f"[{res['gold_ci95'][0]:.3f}, {res['gold_ci95'][1]:.3f}]",
            "—" if kl is None else f"{kl:.2f} (vs {res.get('reference')})",
            f"{res['length_mean']:.1f}",
            "—" if not vs else f"{vs['mean']:+.3f} ± {vs['stderr']:.3f} ({vs['z']:.1f})" + ("ᵇ" if against == "base" else ""),
        )
    console.print(table)
    paired = [(n, r) for n, r in summary.get("eval", {}).items() if r.get("vs_sft") or r.get("vs_base")]
    if paired:
        n = (paired[0][1].get("vs_sft") or paired[0][1].get("vs_base"))["n"]
        console.print(f"Δ: paired difference to SFT on the same {n} held-out prompts (ᵇ SFT's to the base model), "
                      "its paired standard error and z = Δ / s.e.; bootstrap intervals and the unpaired s.e. are "
                      "in summary.json")
    rm = summary.get("reward_model")
    if rm:
        acc = rm.get("heldout_accuracy")
        lab = rm.get("labeler_heldout_accuracy")
        console.print(
            f"reward model held-out pairwise accuracy vs gold: {acc:.3f} on {rm.get('heldout_pairs')} pairs"
            + (f" (a simulated labeler: {lab:.3f})" if lab is not None else "")
            if acc is not None else "reward model: no held-out pairs"
        )
        curve = rm.get("learning_curve")
        if curve:
            console.print("reward model learning curve (held-out accuracy by rankings): "
                          + ", ".join(f"{c['rankings']}: {c['heldout_accuracy']:.3f}" for c in curve
                                      if c.get("heldout_accuracy") is not None))
        shift = rm.get("on_policy_accuracy")
        if shift:
            a, b = shift["sft_samples"], shift["ppo_samples"]
            console.print(f"reward model on the policy's own rollouts: {a['accuracy']:.3f} ± {a['stderr']:.3f} on SFT's "
                          f"samples ({a['pairs']} pairs), {b['accuracy']:.3f} ± {b['stderr']:.3f} on PPO's "
                          f"({b['pairs']} pairs, steps {b['steps'][0]}–{b['steps'][-1]})")
    prefs = summary.get("preferences")
    if prefs and prefs.get("labeler_agreement") is not None:
        agreement = prefs.get("agreement") or {}
        alpha = agreement.get("krippendorff_alpha")
        console.print(
            f"labeler agreement: {prefs['labeler_agreement']:.3f} on {prefs['labeler_agreement_pairs']} "
            f"overlapping pairs ({prefs['labels']} rankings of K={prefs['k']})"
            + (f"; Krippendorff's α {alpha:.3f}" if alpha is not None else "")
        )
    acc = (prefs or {}).get("judge_accuracy") or {}
    if acc.get("pairs"):
        bias = prefs.get("judge_position_bias") or {}
        console.print(f"AI judge {prefs['judge']}: accuracy vs gold {acc['swapped']:.3f} on {acc['pairs']} pairs "
                      f"(asked in one order only: {acc['first_order']:.3f}); first-slot rate "
                      f"{bias.get('first_slot_rate', float('nan')):.3f}, consistent under swapping "
                      f"{bias.get('consistency', float('nan')):.3f}")
    stages = summary.get("stages", {})
    console.print("wall time: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in stages.items() if v.get("seconds") is not None))
    for name, m in (summary.get("monitor") or {}).items():
        if m.get("hacking_detected"):
            console.print(f"[bold red]⚠ {name}: over-optimisation alarm at step {m.get('first_alarm_step')} "
                          f"({', '.join(a['kind'] for a in m.get('alarms') or [])}); best held-out "
                          f"{m.get('heldout')} at step {m.get('best_step')}[/bold red]")
        else:
            console.print(f"{name}: no over-optimisation alarm")
    console.print(f"run directory: {summary['run_dir']}  (summary.json)")
    if summary.get("report"):
        console.print(f"report: {summary['report']}")


def cmd_run(args, extra, command: str | None = None) -> int:
    from tether.config import POLICIES
    from tether.pipeline import Pipeline

    if getattr(args, "nproc", 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _load(args, [*extra, f"--policy={command}"] if command in POLICIES else extra)  # config errors here, once
        return _launch(args.nproc, _ARGV or sys.argv[1:])
    if command in POLICIES:
        extra = [*extra, f"--policy={command}"]
    cfg = _load(args, extra)
    stages = stages_for(command, cfg) if command else None
    start = time.time()
    pipe = Pipeline(cfg)
    summary = pipe.run(stages)
    from tether import distributed

    if not distributed.is_main():
        distributed.shutdown()
        return 0
    distributed.shutdown()
    _print_summary(summary)
    print(f"done in {time.time() - start:.0f}s")
    return 0


def cmd_flywheel(args, extra) -> int:
    from rich.console import Console
    from rich.table import Table

    from tether.flywheel import run_flywheel

    cfg = _load(args, extra)
    start = time.time()
    result = run_flywheel(cfg)
    table = Table(title=f"tether flywheel · {cfg.task.name} · feedback: {cfg.feedback}")
    for col in ("round", "labels so far", "RM held-out accuracy", "policy gold (± s.e.)", "KL to SFT"):
        table.add_column(col, justify="right")
    for r in result["rounds"]:
        acc = r["rm_heldout_accuracy"]
        table.add_row(str(r["round"]), str(r["labels_total"]), "—" if acc is None else f"{acc:.3f}",
                      f"{r['gold_mean']:.3f} ± {r['gold_stderr']:.3f}",
                      "—" if r["kl_to_sft"] is None else f"{r['kl_to_sft']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"start: base {result['start'].get('base'):.3f}, SFT {result['start'].get('sft'):.3f}")
    console.print(f"run directory: {result['run_dir']}  (flywheel.json)" +
                  (f"\nreport: {result['report']}" if result.get("report") else ""))
    print(f"done in {time.time() - start:.0f}s")
    return 0


def cmd_models(args, extra) -> int:
    from tether import zoo

    if extra:
        raise SystemExit(f"unexpected arguments: {extra}")
    if args.action == "list":
        cached = {name: (path, size) for name, path, size in zoo.cached_models()}
        print(f"cache: {zoo.tether_home() / 'models'}")
        for entry in zoo.list_zoo():
            state = f"cached, {cached[entry.name][1] / 1e6:.1f} MB" if entry.name in cached else "not pulled"
            print(f"  {entry.name:28s} {state:22s} {entry.description}")
        return 0
    if not args.name:
        raise SystemExit("tether models pull NAME")
    path = zoo.pull(args.name, force=args.force)
    print(path)
    return 0


def cmd_data(args, extra) -> int:
    from tether.data.schemas import load_demonstrations, load_rankings
    from tether.feedback.stats import detect_kind, file_stats

    if extra:
        raise SystemExit(f"unexpected arguments: {extra}")
    kind = detect_kind(args.file) if args.kind == "auto" else args.kind
    if kind == "steps":
        from tether.data.schemas import load_step_examples

        items = load_step_examples(args.file)
        labels = [v for ex in items for v in ex.labels]
        right = sum(v > 0.5 for v in labels)
        print(f"{args.file}: {len(items)} valid step-labelled solutions, {len(labels)} steps "
              f"({right / max(len(labels), 1):.1%} labelled right)")
        return 0
    if args.action == "stats":
        stats = file_stats(args.file, kind)
        if args.json:
            import json

            print(json.dumps(stats, indent=2, ensure_ascii=False, default=str))
        else:
            _print_stats(stats)
        return 0
    if kind == "demos":
        items = load_demonstrations(args.file)
        print(f"{args.file}: {len(items)} valid demonstrations")
    else:
        items = load_rankings(args.file)
        pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in items)
        print(f"{args.file}: {len(items)} valid rankings ({pairs} pairs)")
    return 0


def _print_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title=escape(f"{stats['file']} ({stats['kind']})"), show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    for key, value in stats.items():
        if key in ("file", "kind", "agreement", "rankings_per_rater") or isinstance(value, dict) and "chars_mean" in value:
            continue
        table.add_row(key.replace("_", " "), fmt(value) if not isinstance(value, dict) else
                      ", ".join(f"{k}: {v}" for k, v in value.items()))
    for key, value in stats.items():
        if isinstance(value, dict) and "chars_mean" in value:
            table.add_row(key.replace("_", " "), f"{value['words_mean']:.1f} words mean, {value['words_median']:g} median, "
                                                 f"{value['words_max']} max ({value['empty']} empty)")
    agreement = stats.get("agreement")
    if agreement:
        for key in ("items_multi", "pairs_compared", "percent_agreement", "cohen_kappa_mean", "krippendorff_alpha"):
            value = agreement.get(key)
            table.add_row(key.replace("_", " "), "—" if value is None else fmt(value))
    console.print(table)
    raters = (agreement or {}).get("raters") or {}
    if raters:
        t = Table(title="labelers: agreement with the consensus of the others")
        t.add_column("rater")
        t.add_column("rankings", justify="right")
        t.add_column("pairs scored", justify="right")
        t.add_column("agreement", justify="right")
        for rater, q in sorted(raters.items(), key=lambda kv: -(kv[1]["agreement_with_consensus"] or 0.0)):
            a = q["agreement_with_consensus"]
            t.add_row(escape(str(rater)), str(stats.get("rankings_per_rater", {}).get(rater, "")), str(q["items"]),
                      "—" if a is None else f"{a:.3f}")
        console.print(t)


def _judge_config(args):
    from tether.config import JudgeConfig

    return JudgeConfig(kind=args.judge, model=args.model or "", base_url=args.base_url or "", api_model=args.api_model or "",
                       api_key_env=args.api_key_env, rubric=args.rubric or list(JudgeConfig().rubric),
                       constitution=args.constitution or "", logprobs=not args.no_logprobs, timeout=args.timeout,
                       max_retries=args.retries, concurrency=args.concurrency, cache=args.cache or "",
                       batch_size=args.batch_size, labels=list(args.labels))


def _read_groups(path) -> list[dict]:
    """``{prompt, responses[, gold]}`` records for ``tether judge``."""
    import math

    from tether.data.io import DataError
    from tether.data.schemas import MAX_RESPONSES, _assistant_turn, _prompt, iter_records

    groups = []
    for where, line, rec in iter_records(path):
        prompt = _prompt(rec, where, line)
        responses = rec.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(where, line, "must be a list of at least 2 responses", field="responses")
        if len(responses) > MAX_RESPONSES:
            raise DataError(where, line, f"holds {len(responses)} responses, more than the {MAX_RESPONSES} allowed",
                            field="responses")
        texts = [_assistant_turn(r, where, line, f"responses[{i}]", True)[0] for i, r in enumerate(responses)]
        gold = rec.get("gold")
        if gold is not None and (not isinstance(gold, list) or len(gold) != len(texts)
                                 or any(isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)
                                        for g in gold)):
            raise DataError(where, line, f"must be a list of {len(texts)} finite numbers (one per response)",
                            field="gold")
        groups.append({"prompt": prompt, "responses": texts, "gold": gold})
    if not groups:
        raise DataError(path, None, "no records")
    return groups


def cmd_judge(args, extra) -> int:
    import json
    from pathlib import Path

    from tether.data.io import write_json, write_jsonl
    from tether.data.schemas import Ranking, ranking_record, rankings_to_pairs
    from tether.engine import progress_bar
    from tether.feedback.judge import Verdict, accuracy_against_gold, make_judge, position_bias

    if extra:
        raise SystemExit(f"unexpected arguments: {extra}")
    from tether.config import ConfigError

    groups = _read_groups(args.file)
    cfg = _judge_config(args)
    if cfg.kind == "hf" and not cfg.model:
        raise ConfigError("--model is needed with --judge hf (a zoo name, folder or hub id)")
    try:
        judge = make_judge(cfg, cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    n_calls = sum(len(g["responses"]) * (len(g["responses"]) - 1) for g in groups)
    with progress_bar(n_calls, f"judge {judge.name}", unit="call") as bar:
        ranked = judge.rank([(g["prompt"], g["responses"]) for g in groups], progress=bar.update)
    out = Path(args.out)
    rankings, verdicts, scored, with_gold = [], [], [], []
    for gi, (g, res) in enumerate(zip(groups, ranked)):
        rankings.append(Ranking(g["prompt"], g["responses"], res["order"], judge.name, {"item": gi}))
        for i, j, pij, pab, pba, valid in res["pairs"]:
            v = {"item": gi, "i": i, "j": j, "p": pij, "p_ab": pab, "p_ba": pba, "valid": valid}
            if g["gold"] is not None:
                v.update(gold_i=g["gold"][i], gold_j=g["gold"][j])
                with_gold.append((g["gold"][i], g["gold"][j], pab, pba))
            verdicts.append(v)
            scored.append(Verdict(pab, pba, valid))
    write_jsonl(out / "rankings.jsonl", [ranking_record(r) for r in rankings])
    write_jsonl(out / "pairs.jsonl", rankings_to_pairs(rankings))
    write_jsonl(out / "verdicts.jsonl", verdicts)
    summary = {"judge": judge.name, "groups": len(groups), "comparisons": len(verdicts),
               "unreadable": sum(not v["valid"] for v in verdicts), "position_bias": position_bias(scored),
               "accuracy": accuracy_against_gold(with_gold) if with_gold else None}
    if getattr(judge, "client", None) is not None:
        summary["requests"] = dict(judge.client.stats)
        judge.client.close()
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'rankings.jsonl'}, {out / 'pairs.jsonl'}, {out / 'verdicts.jsonl'}")
    return 0


def cmd_constitution(args, extra) -> int:
    from pathlib import Path

    from tether.data.io import DataError, write_json, write_jsonl
    from tether.data.schemas import _prompt, iter_records
    from tether.engine import progress_bar
    from tether.feedback.constitution import HTTPChat, LocalChat, critique_revise
    from tether.feedback.judge import load_constitution

    if extra:
        raise SystemExit(f"unexpected arguments: {extra}")
    prompts = [_prompt(rec, where, line) for where, line, rec in iter_records(args.prompts)]
    if args.limit:
        prompts = prompts[: args.limit]
    if not prompts:
        raise DataError(args.prompts, None, "no prompts")
    from tether.config import ConfigError

    principles = load_constitution(args.constitution)
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    if args.base_url and not args.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    if args.base_url:
        chat = HTTPChat(args.base_url, args.api_model or args.model or "default", api_key_env=args.api_key_env,
                        timeout=args.timeout, max_retries=args.retries, concurrency=args.concurrency,
                        cache=args.cache or None)
    elif args.model:
        chat = LocalChat(args.model, batch_size=args.batch_size)
    else:
        raise SystemExit("tether constitution: give --model (a local model) or --base-url (an OpenAI-compatible API)")
    with progress_bar(len(prompts) * (1 + 2 * args.rounds), "critique → revise", unit="reply") as bar:
        result = critique_revise(chat, prompts, principles, rounds=args.rounds, seed=args.seed,
                                 max_tokens=args.max_tokens, temperature=args.temperature, progress=bar.update)
    out = Path(args.out)
    write_jsonl(out / "demos.jsonl", result.demos)
    write_jsonl(out / "pairs.jsonl", result.pairs)
    write_jsonl(out / "trace.jsonl", result.trace)
    write_json(out / "summary.json", {"model": chat.name, "prompts": len(prompts), "rounds": args.rounds,
                                      "principles": [p.name for p in principles], "demos": len(result.demos),
                                      "pairs": len(result.pairs)})
    print(f"{len(result.demos)} demonstrations → {out / 'demos.jsonl'}; {len(result.pairs)} pairs (revision ≻ "
          f"original) → {out / 'pairs.jsonl'}; every round → {out / 'trace.jsonl'}")
    return 0


def cmd_label(args, extra) -> int:
    """``tether label serve|import|export|add-labeler``: the labeling app and its database."""
    from pathlib import Path

    from tether.config import ConfigError
    from tether.labeling.store import LabelStore, StoreError

    if extra:
        raise SystemExit(f"unexpected arguments: {extra}")
    try:
        if args.action == "add-labeler":
            if not args.name:
                raise ConfigError("tether label add-labeler NAME [--admin]")
            token = LabelStore(args.db).add_labeler(args.name, admin=args.admin)
            print(f"{'admin' if args.admin else 'labeler'} {args.name}: token {token}")
            print(f"their link: http://{args.host}:{args.port}/login?token={token}  (shown once; only its hash is stored)")
            return 0
        if args.action == "import":
            store = LabelStore(args.db, overlap=args.overlap)
            if args.checkpoint:
                groups = _sample_groups(args)
                source = f"samples of {args.checkpoint}"
            elif args.file:
                groups = _read_groups(args.file)
                source = str(args.file)
            else:
                raise ConfigError("tether label import FILE, or --checkpoint CKPT --prompts FILE [--k 4]")
            n = len(store.add_items(groups, source=source))
            print(f"{args.db}: {n} items added ({len(store.labelers())} labelers, each item to {store.overlap})")
            return 0
        if args.action == "export":
            from tether.data.io import write_jsonl
            from tether.labeling.app import admin_stats, export_records

            out = Path(args.out or ".")
            store = LabelStore(args.db)
            write_jsonl(out / "rankings.jsonl", export_records(store, "rankings"))
            write_jsonl(out / "pairs.jsonl", export_records(store, "pairs"))
            stats = admin_stats(store)
            a = stats["agreement"]
            print(f"wrote {out / 'rankings.jsonl'} and {out / 'pairs.jsonl'}: {stats['progress']['labels']} labels of "
                  f"{stats['progress']['items']} items; percent agreement {a.get('percent_agreement')}, "
                  f"Krippendorff's alpha {a.get('krippendorff_alpha')}")
            return 0
        if args.action == "serve":
            import uvicorn

            from tether.labeling.app import create_app

            app = create_app(args.db, overlap=args.overlap)
            store = app.state.store
            print(f"labeling app on http://{args.host}:{args.port}/ ({args.db}: {store.progress()['items']} items, "
                  f"{len(store.labelers())} labelers, each item to {store.overlap})")
            if not store.labelers():
                print("no labelers yet: tether label add-labeler NAME [--admin] --db " + str(args.db))
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
            return 0
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    raise SystemExit(f"unknown action {args.action}")


def _sample_groups(args) -> list[dict]:
    """K samples per prompt from a checkpoint, for ``tether label import --checkpoint``."""
    from tether.config import GenerationConfig, ModelConfig
    from tether.data.schemas import _prompt, iter_records
    from tether.data.tokenize import Encoder
    from tether.engine import progress_bar
    from tether.models import load_policy, load_tokenizer
    from tether.rollout import generate
    from tether.serve import resolve_checkpoint

    if not args.prompts:
        raise SystemExit("tether label import --checkpoint CKPT needs --prompts FILE (JSONL of {prompt})")
    prompts = [_prompt(rec, where, line) for where, line, rec in iter_records(args.prompts)]
    path = resolve_checkpoint(args.checkpoint)
    model_cfg = ModelConfig(name=path, max_length=args.max_length, max_prompt_length=args.max_length // 2)
    policy = load_policy(path, model_cfg, trainable=False)
    encoder = Encoder(load_tokenizer(path), model_cfg.max_length, model_cfg.max_prompt_length)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    with progress_bar(len(prompts) * args.k, f"K={args.k} samples", unit="sample") as bar:
        rollout = generate(policy, encoder, [q for q in prompts for _ in range(args.k)], gen, seed=args.seed,
                           progress=bar.update)
    return [{"prompt": q, "responses": rollout.texts[i * args.k : (i + 1) * args.k]} for i, q in enumerate(prompts)]


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", help="an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (`tether serve`)")
    p.add_argument("--api-model", help="the model name sent to the API (default: --model, else 'default')")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request attempt")
    p.add_argument("--retries", type=int, default=4, help="retries after timeouts, 429/5xx and malformed replies")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    p.add_argument("--cache", help="SQLite cache of replies (default: $TETHER_HOME/chat_cache.sqlite)")
    p.add_argument("--batch-size", type=int, default=8, help="local model: prompts per forward pass")


def cmd_config(args, extra) -> int:
    import yaml

    from tether.config import config_to_dict, describe

    cfg = _load(args, extra)
    if args.keys:
        for key, default, help_text in describe():
            print(f"{key:36s} {default:24s} {help_text}")
    else:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def add_serve_parser(subparsers):  # here, not in tether.serve: building the parser imports no torch
    """Add ``tether serve CHECKPOINT [--host] [--port] [--model-name] ...`` to ``subparsers``."""
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible chat API (streaming, logprobs)",
        usage="tether serve CHECKPOINT [--host 127.0.0.1] [--port 8000] [--model-name NAME]",
        description="Serve CHECKPOINT (a model folder, a run's stage folder such as runs/default/ppo, "
                    "or a zoo name) at http://HOST:PORT/v1/chat/completions.",
    )
    p.add_argument("checkpoint", help="model folder, run stage folder (uses its checkpoint/), or zoo name")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--model-name", default=None, help="model id the API reports (default: the folder's name)")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="cap on max_tokens per request, and its default (default: 1024)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description="RLHF: SFT → reward model → PPO (or DPO, GRPO, RLOO), "
                                                                "with a gold score to check it.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the whole pipeline (skips finished stages)",
                       usage="tether run [CONFIG.yaml] [--preset NAME] [--out DIR] [--policy ppo|dpo|grpo|rloo] "
                             "[--reward rm|gold|...] [--section.key VALUE ...]")
    _add_run_args(p)
    for stage in STAGE_COMMANDS:
        sp = sub.add_parser(stage, help=f"run the '{stage}' stage (and the stages it needs)",
                            usage=f"tether {stage} [CONFIG.yaml] [--preset NAME] [--out DIR] [--section.key VALUE ...]")
        _add_run_args(sp)
    p = sub.add_parser("flywheel", help="rounds of: label the policy's new samples → retrain the reward model → "
                                        "improve the policy", usage="tether flywheel [CONFIG.yaml] [--preset NAME] "
                                        "[--out DIR] [--flywheel.rounds 3] [--feedback simulated|judge|app] [...]")
    _add_run_args(p)
    p = sub.add_parser("models", help="list or pull built-in models")
    p.add_argument("action", choices=["list", "pull"])
    p.add_argument("name", nargs="?")
    p.add_argument("--force", action="store_true", help="pull again even if cached")
    p = sub.add_parser("data", help="validate a file of demonstrations or rankings/pairs, or show its statistics",
                       usage="tether data validate|stats FILE [--kind auto|demos|rankings] [--json]")
    p.add_argument("action", choices=["validate", "stats"])
    p.add_argument("file", help="JSONL, a Hugging Face dataset folder or parquet file, or hf:NAME[:SPLIT]")
    p.add_argument("--kind", choices=["auto", "demos", "rankings", "steps"], default="auto")
    p.add_argument("--json", action="store_true", help="stats as JSON")
    p = sub.add_parser("judge", help="an AI judge ranks K responses per prompt (RLAIF): rankings, pairs, verdicts",
                       usage="tether judge FILE --out DIR [--judge hf --model M | --judge http --base-url URL] "
                             "[--rubric C ...] [--constitution FILE]")
    p.add_argument("file", help="JSONL of {prompt, responses: [...], gold: [...] (optional)}")
    p.add_argument("--out", required=True, help="folder for rankings.jsonl, pairs.jsonl, verdicts.jsonl, summary.json")
    p.add_argument("--judge", choices=["hf", "http"], default="hf", help="local model or OpenAI-compatible API")
    p.add_argument("--model", help="hf: the judge model (zoo name, folder, hub id); http: the model name")
    p.add_argument("--rubric", nargs="+", help="criteria (helpfulness honesty harmlessness conciseness, or sentences)")
    p.add_argument("--constitution", help="YAML list of principles the judge also weighs ('builtin' for Tether's)")
    p.add_argument("--labels", nargs=2, default=["A", "B"], metavar=("FIRST", "SECOND"),
                   help="names of the two responses in the prompt (single tokens of the judge's tokenizer)")
    p.add_argument("--no-logprobs", action="store_true", help="http: read the answer's letter, not top_logprobs")
    _add_client_args(p)
    p = sub.add_parser("constitution", help="Constitutional AI: critique → revise against principles; writes "
                                            "demonstrations and revision ≻ original pairs",
                       usage="tether constitution --prompts FILE --out DIR (--model M | --base-url URL) "
                             "[--constitution FILE] [--rounds N]")
    p.add_argument("--prompts", required=True, help="JSONL of {prompt} records (e.g. a run's data/prompts_train.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="a local model (zoo name, folder, hub id), or the API's model name")
    p.add_argument("--constitution", help="YAML list of principles (default: Tether's built-in constitution)")
    p.add_argument("--rounds", type=int, default=1, help="critique → revise rounds per prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    _add_client_args(p)
    add_serve_parser(sub)
    p = sub.add_parser("label", help="the labeling web app: serve it, import items, add labelers, export rankings",
                       usage="tether label serve|import|export|add-labeler [NAME|FILE] --db labels.sqlite [...]")
    p.add_argument("action", choices=["serve", "import", "export", "add-labeler"])
    p.add_argument("name", nargs="?", help="add-labeler: the labeler's name; import: a JSONL of {prompt, responses}",
                   metavar="NAME|FILE")
    p.add_argument("--db", default="labels.sqlite", help="a SQLite file (WAL mode) or a postgresql:// URL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--overlap", type=int, help="labelers per item (stored in the database; default 1)")
    p.add_argument("--admin", action="store_true", help="add-labeler: may open the admin page and export")
    p.add_argument("--out", help="export: folder for rankings.jsonl and pairs.jsonl")
    p.add_argument("--checkpoint", help="import: sample the K responses from this checkpoint (or zoo name)")
    p.add_argument("--prompts", help="import --checkpoint: JSONL of {prompt}")
    p.add_argument("--k", type=int, default=4, help="import --checkpoint: responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("report", help="rebuild a run's self-contained report.html (plots, monitor verdicts, samples)")
    p.add_argument("dir", help="run directory")
    p.add_argument("--out", help="where to write it (default: DIR/report.html)")
    p = sub.add_parser("config", help="print the resolved config (or every key with --keys)",
                       usage="tether config [CONFIG.yaml] [--preset NAME] [--keys] [--section.key VALUE ...]")
    _add_run_args(p)
    p.add_argument("--keys", action="store_true", help="list every key with its default and help")
    return parser


_ARGV: list[str] | None = None  # main()'s arguments, for --nproc's relaunch


def main(argv: list[str] | None = None) -> int:
    from tether.config import ConfigError
    from tether.data.io import DataError
    from tether.data.schemas import ChatFormatError
    from tether.errors import CheckpointError, NonFiniteError
    from tether.feedback.client import ChatError
    from tether.labeling.store import StoreError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # peft asks transformers a deprecated question on every LoRA wrap; not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    global _ARGV
    _ARGV = list(argv) if argv is not None else None
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args, extra)
        if args.command in STAGE_COMMANDS:
            return cmd_run(args, extra, command=args.command)
        if args.command == "models":
            return cmd_models(args, extra)
        if args.command == "data":
            return cmd_data(args, extra)
        if args.command == "judge":
            return cmd_judge(args, extra)
        if args.command == "constitution":
            return cmd_constitution(args, extra)
        if args.command == "flywheel":
            return cmd_flywheel(args, extra)
        if args.command == "label":
            if args.action == "import" and args.name:
                args.file = args.name
            else:
                args.file = None
            return cmd_label(args, extra)
        if args.command == "serve":
            from tether.serve import cmd_serve

            if extra:
                raise SystemExit(f"unexpected arguments: {extra}")
            return cmd_serve(args)
        if args.command == "config":
            return cmd_config(args, extra)
        if args.command == "report":
            from tether.report import build_report

            print(f"report: {build_report(args.dir, args.out)}")
            return 0
    except (ConfigError, DataError, ChatFormatError, StoreError, FileNotFoundError, ChatError) as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointError) as exc:  # the stage's last good checkpoint is kept
        print(f"tether: error: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
