"""Nothing lost: crash-safe checkpoints, exact resume after SIGKILL, numerical guards.

The end-to-end test kills ``tether run`` on the tiny preset with SIGKILL at random points
of every stage (training stages: after a random optimiser step or rollout, halfway through
writing a checkpoint, after training; data and prefs: at a random moment), starts the same
command again each time, and requires the final weights, metrics and monitor records to
equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tether.checkpoint import Checkpointer, LoopState, RNGState, latest_valid, verify
from tether.config import OptimConfig
from tether.engine import BatchPlan, Engine, MetricsLogger
from tether.errors import CheckpointError, NonFiniteError

# --------------------------------------------------------------------------- helpers


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # dropout draws from torch's global generator: a resume that lost the RNG state would differ
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.25), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train_steps(model, engine, plan, data, n, ckpt=None, state=None, start=0):
    x, y = data
    for step in range(start, start + n):
        for idx in plan.next():
            loss = ((model(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()
            loss.backward()
        engine.step(loss.detach())
        if ckpt is not None:
            ckpt.step(step + 1, state)


def _setup(tmp_path, every=2, keep=2, fp="a"):
    model = _model()
    engine = Engine(model.parameters(), OptimConfig(lr=1e-2, batch_size=8, micro_batch_size=4), 20)
    plan = BatchPlan(32, 8, 4, torch.Generator().manual_seed(3))
    loop = LoopState(seen=0)
    state = {"policy": model, "engine": engine, "data": plan, "rng": RNGState(), "loop": loop}
    ckpt = Checkpointer(tmp_path / "checkpoints", every=every, keep=keep, stage="unit", fingerprint=fp,
                        say=lambda msg: None)
    return model, engine, plan, state, ckpt


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g), torch.randn(32, generator=g)


def _weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- checkpoint files


def test_resume_in_a_fresh_process_state_equals_uninterrupted(tmp_path, data):
    model, engine, plan, state, ckpt = _setup(tmp_path / "a")
    _train_steps(model, engine, plan, data, 10)
    straight = _weights(model)

    model, engine, plan, state, ckpt = _setup(tmp_path / "b")
    _train_steps(model, engine, plan, data, 7, ckpt, state)  # saved at 2, 4, 6; "killed" after 7
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    model, engine, plan, state, ckpt = _setup(tmp_path / "b")  # everything rebuilt, as a new process would
    start = ckpt.resume(state)
    assert start == 6 and ckpt.resumed_from == 6
    _train_steps(model, engine, plan, data, 4, ckpt, state, start=start)
    assert _equal(_weights(model), straight)
    assert engine.step_count == 10


def test_manifest_lists_every_file_with_size_and_hash(tmp_path, data):
    model, engine, plan, state, ckpt = _setup(tmp_path)
    _train_steps(model, engine, plan, data, 2, ckpt, state)
    path = tmp_path / "checkpoints" / "step-00000002"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["fingerprint"] == "a"
    assert set(manifest["files"]) == {"model-policy.safetensors", "state.pt"}
    for name, meta in manifest["files"].items():
        assert meta["bytes"] == (path / name).stat().st_size and len(meta["sha256"]) == 64
    assert verify(path) == manifest


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_file", "delete_manifest", "garbage_manifest"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, data, damage, capsys):
    model, engine, plan, state, ckpt = _setup(tmp_path)
    _train_steps(model, engine, plan, data, 4, ckpt, state)
    at_two = tmp_path / "checkpoints" / "step-00000002"
    latest = tmp_path / "checkpoints" / "step-00000004"
    weights = latest / "model-policy.safetensors"
    if damage == "flip":
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        weights.write_bytes(bytes(raw))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "delete_file":
        (latest / "state.pt").unlink()
    elif damage == "delete_manifest":
        (latest / "manifest.json").unlink()
    else:
        (latest / "manifest.json").write_text("{not json")
    found = latest_valid(tmp_path / "checkpoints", "a", warn=lambda m: print("WARN", m))
    assert found is not None and found[0] == at_two
    out = capsys.readouterr().out
    assert "WARN" in out and "step-00000004" in out and "falling back" in out
    # the bad one is set aside, so neither tried again nor in the way of a new save of step 4
    assert not latest.exists()
    assert any(p.name.startswith(".corrupt-step-00000004") for p in (tmp_path / "checkpoints").iterdir())
    model, engine, plan, state, ckpt = _setup(tmp_path)
    assert ckpt.resume(state) == 2


def test_every_checkpoint_damaged_starts_over(tmp_path, data):
    model, engine, plan, state, ckpt = _setup(tmp_path, keep=1)
    _train_steps(model, engine, plan, data, 2, ckpt, state)
    (tmp_path / "checkpoints" / "step-00000002" / "state.pt").write_bytes(b"")
    model, engine, plan, state, ckpt = _setup(tmp_path)
    assert ckpt.resume(state) == 0 and ckpt.resumed_from is None


def test_an_interrupted_write_is_invisible_and_cleaned(tmp_path, data):
    model, engine, plan, state, ckpt = _setup(tmp_path)
    _train_steps(model, engine, plan, data, 2, ckpt, state)
    tmp = tmp_path / "checkpoints" / ".tmp-step-00000004-123"
    tmp.mkdir()
    (tmp / "model-policy.safetensors").write_bytes(b"half")
    assert latest_valid(tmp_path / "checkpoints")[0].name == "step-00000002"
    _train_steps(model, engine, plan, data, 2, ckpt, state, start=2)
    assert not tmp.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_other_fingerprint_is_not_resumed(tmp_path, data):
    model, engine, plan, state, ckpt = _setup(tmp_path, fp="config-1")
    _train_steps(model, engine, plan, data, 2, ckpt, state)
    model, engine, plan, state, ckpt = _setup(tmp_path, fp="config-2")
    assert ckpt.resume(state) == 0


def test_keep_prunes_old_checkpoints_and_finish_removes_them(tmp_path, data):
    model, engine, plan, state, ckpt = _setup(tmp_path, keep=3)
    _train_steps(model, engine, plan, data, 10, ckpt, state)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000006", "step-00000008", "step-00000010"]
    ckpt.finish()
    assert not (tmp_path / "checkpoints").exists()


def test_final_save_off_the_every_grid(tmp_path, data):
    model, engine, plan, state, ckpt = _setup(tmp_path, every=4)
    _train_steps(model, engine, plan, data, 3, ckpt, state)
    assert not (tmp_path / "checkpoints").exists()
    ckpt.step(3, state, final=True)
    assert latest_valid(tmp_path / "checkpoints")[0].name == "step-00000003"


def test_every_zero_saves_nothing(tmp_path, data):
    model, engine, plan, state, ckpt = _setup(tmp_path, every=0)
    _train_steps(model, engine, plan, data, 4, ckpt, state)
    ckpt.step(4, state, final=True)
    assert not (tmp_path / "checkpoints").exists() and ckpt.resume(state) == 0


def test_a_checkpoint_that_does_not_fit_the_model_is_set_aside(tmp_path, data, capsys):
    """Weights that do not fit the model (names or shapes) are found before anything is
    loaded; such a checkpoint is set aside with a warning and the stage starts over."""
    model, engine, plan, state, ckpt = _setup(tmp_path)
    _train_steps(model, engine, plan, data, 2, ckpt, state)
    other = torch.nn.Linear(4, 1)
    before = _weights(other)
    assert ckpt.resume({**state, "policy": other}) == 0
    assert "does not fit the model" in capsys.readouterr().err
    assert _equal(_weights(other), before)


def test_non_finite_weights_are_never_saved(tmp_path, data):
    model, engine, plan, state, ckpt = _setup(tmp_path)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        ckpt.save(2, state)
    assert latest_valid(tmp_path / "checkpoints") is None


def test_rng_state_restores_every_generator():
    import numpy as np

    g = torch.Generator().manual_seed(5)
    rng = RNGState(data=g)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    saved = rng.state_dict()
    first = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    rng.load_state_dict(saved)
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and first[2] == again[2]
    assert torch.equal(first[3], again[3])


def test_batch_plan_resumes_the_same_batches():
    straight = BatchPlan(10, 4, 2, torch.Generator().manual_seed(0))
    expected = [straight.next() for _ in range(7)]
    plan = BatchPlan(10, 4, 2, torch.Generator().manual_seed(0))
    got = [plan.next() for _ in range(3)]
    saved = plan.state_dict()
    plan = BatchPlan(10, 4, 2, torch.Generator().manual_seed(99))
    plan.load_state_dict(saved)
    got += [plan.next() for _ in range(4)]
    assert got == expected
    with pytest.raises(ValueError, match="10 items"):
        BatchPlan(11, 4, 2, torch.Generator()).load_state_dict(saved)


def test_metrics_logger_cuts_rows_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path / "metrics.jsonl")
    log.log(0, {"a": 1.0})
    saved = log.state_dict()
    log.log(1, {"a": 2.0})
    log.close()
    log = MetricsLogger(tmp_path / "metrics.jsonl")
    log.load_state_dict(saved)
    log.log(1, {"a": 3.0})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["a"]) for r in rows] == [(0, 1.0), (1, 3.0)]


# --------------------------------------------------------------------------- numerical guards


def test_non_finite_loss_or_gradient_skips_the_step(data, capsys):
    model = _model()
    engine = Engine(model.parameters(), OptimConfig(lr=1e-2, max_nonfinite_steps=3), 10, name="unit")
    before = _weights(model)
    x, y = data
    ((model(x).squeeze(-1) - y) ** 2).mean().backward()
    info = engine.step(float("nan"))  # a finite gradient but a NaN loss
    assert info["skipped"] == 1 and engine.skipped_steps == 1 and engine.step_count == 0
    assert _equal(_weights(model), before) and not engine.optimizer.state
    assert all(p.grad is None for p in model.parameters())
    (model(x).sum() * float("inf")).backward()  # a non-finite gradient
    assert engine.step()["skipped"] == 1 and engine.bad_steps_in_row == 2
    assert "skipped, non-finite" in capsys.readouterr().err
    ((model(x).squeeze(-1) - y) ** 2).mean().backward()
    assert engine.step(1.0)["skipped"] == 0 and engine.bad_steps_in_row == 0  # a good step resets the count
    assert not _equal(_weights(model), before)


def test_k_non_finite_steps_in_a_row_stop_with_a_clear_message():
    model = _model()
    engine = Engine(model.parameters(), OptimConfig(max_nonfinite_steps=3), 10, name="sft")
    for _ in range(2):
        model(torch.ones(1, 4)).sum().backward()
        engine.step(float("inf"))
    model(torch.ones(1, 4)).sum().backward()
    with pytest.raises(NonFiniteError, match=r"sft: 3 optimiser steps in a row had a non-finite loss"):
        engine.step(float("nan"))


@pytest.mark.smoke
def test_nan_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, _tether_home):
    """SFT whose loss turns NaN from its 6th step on: steps are skipped (weights untouched),
    the stage stops after max_nonfinite_steps with a message naming the last good
    checkpoint (step 6: saved after one skipped step, the weights of step 5), which is intact
    and finite; the same command then resumes from it."""
    import tether.algorithms.sft as sft_mod
    from tether.config import load_config
    from tether.pipeline import Pipeline

    calls = {"n": 0}
    real = sft_mod.sft_micro_loss

    def poisoned(model, batch, normalizer=None):
        calls["n"] += 1
        loss = real(model, batch, normalizer)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(sft_mod, "sft_micro_loss", poisoned)
    cfg = load_config(preset="tiny", overrides=[f"out={tmp_path}", "stages=[data,sft]", "report=false",
                                                "sft.epochs=1", "checkpoint.every=2", "sft.optim.max_nonfinite_steps=3",
                                                "sft.optim.micro_batch_tokens=0"])  # one loss call per step
    with pytest.raises(NonFiniteError) as err:
        Pipeline(cfg).run()
    msg = str(err.value)
    assert "3 optimiser steps in a row" in msg and "step-00000006" in msg and "--checkpoint.resume force" in msg
    path, manifest = latest_valid(tmp_path / "sft" / "checkpoints")
    assert manifest["step"] == 6
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(path / "model-policy.safetensors")).values())
    assert not (tmp_path / "sft" / "stage.json").exists()
    # the cause fixed, and a lower learning rate: go on from the last good checkpoint
    monkeypatch.setattr(sft_mod, "sft_micro_loss", real)
    lower = load_config(preset="tiny", overrides=[f"out={tmp_path}", "stages=[data,sft]", "report=false",
                                                  "sft.epochs=1", "checkpoint.every=2", "sft.optim.lr=2.5e-4",
                                                  "sft.optim.micro_batch_tokens=0", "checkpoint.resume=force"])
    Pipeline(lower).run()
    result = json.loads((tmp_path / "sft" / "stage.json").read_text())
    assert result["resumed_from_step"] == 6 and result["skipped_steps"] == 1 and math.isfinite(result["final_loss"])
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["optim/lr"] for r in rows if r["step"] >= 6] == [2.5e-4] * len([r for r in rows if r["step"] >= 6])
    assert rows[0]["optim/lr"] == 1e-3


def test_kl_controller_ignores_a_non_finite_kl():
    from tether.advantages import AdaptiveKLController

    ctl = AdaptiveKLController(0.1, target=2.0, horizon=100)
    assert ctl.update(float("nan"), 64) == 0.1 and ctl.update(float("inf"), 64) == 0.1
    assert ctl.update(4.0, 100) == pytest.approx(0.1 * 1.2)


def test_numpy_values_in_the_state_are_stored_and_unstorable_ones_refused(tmp_path, data):
    import numpy as np

    model, engine, plan, state, ckpt = _setup(tmp_path)
    state["loop"]["gold"] = np.float64(0.25)  # a task's gold scores may be numpy numbers
    state["loop"]["per_prompt"] = [np.float32(1.5), np.int64(3)]
    _train_steps(model, engine, plan, data, 2, ckpt, state)
    model, engine, plan, state, ckpt = _setup(tmp_path)
    assert ckpt.resume(state) == 2
    assert state["loop"]["gold"] == 0.25 and state["loop"]["per_prompt"] == [1.5, 3]
    assert type(state["loop"]["gold"]) is float
    state["loop"]["odd"] = object()
    with pytest.raises(CheckpointError, match=r"cannot save step 4: the state of \['loop'\]"):
        ckpt.save(4, state)
    assert latest_valid(tmp_path / "checkpoints")[0].name == "step-00000002"


def test_a_checkpoint_whose_state_cannot_be_read_falls_back(tmp_path, data, capsys):
    """A state.pt that passes its manifest but cannot be loaded (written by other code, say)
    is set aside like a corrupt one; nothing is loaded from it."""
    import hashlib

    model, engine, plan, state, ckpt = _setup(tmp_path)
    _train_steps(model, engine, plan, data, 4, ckpt, state)
    latest = tmp_path / "checkpoints" / "step-00000004"
    torch.save({"loop": {"x": object()}}, latest / "state.pt")  # a pickle weights_only refuses
    manifest = json.loads((latest / "manifest.json").read_text())
    raw = (latest / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (latest / "manifest.json").write_text(json.dumps(manifest))
    model, engine, plan, state, ckpt = _setup(tmp_path)
    assert ckpt.resume(state) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert any(p.name.startswith(".corrupt-step-00000004") for p in (tmp_path / "checkpoints").iterdir())


# --------------------------------------------------------------------------- SIGKILL, end to end

STAGES = ["data", "sft", "prefs", "rm", "ppo", "dpo", "grpo"]
TRAINING = {"sft": 54, "rm": 15, "ppo": 8, "dpo": 10, "grpo": 8}  # steps (or rollouts) each stage runs
EVERY = 2


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "tether.cli", "run", "--preset", "tiny", "--out", str(out), "--report", "false",
            "--stages", f"[{','.join(STAGES)}]", "--sft.epochs", "1", "--rm.epochs", "1", "--ppo.steps", "8",
            "--grpo.steps", "8", "--grpo.rollout_batch_size", "32", "--grpo.mini_batch_size", "32",
            "--dpo.max_steps", "10",
            "--prefs.n_prompts", "400", "--checkpoint.every", str(EVERY), "--threads", "2"]


def _run(out: Path, fault: str | None = None, kill_after: tuple[Path, float] | None = None) -> int:
    """``tether run`` once; ``fault`` kills it at a set point (TETHER_FAULT), ``kill_after``
    (marker, seconds) that long after this run (re)writes the marker file."""
    env = {**os.environ, "TETHER_QUIET": "1"}
    env.pop("TETHER_FAULT", None)
    if fault:
        env["TETHER_FAULT"] = fault
    launched = time.time()
    proc = subprocess.Popen(_command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_after is not None:
        marker, delay = kill_after
        while proc.poll() is None and not (marker.is_file() and marker.stat().st_mtime >= launched):
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    log, _ = proc.communicate(timeout=600)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"tether run failed ({proc.returncode}):\n{log[-3000:]}")
    return proc.returncode


def _kill_plan(rng: random.Random) -> list[tuple[str, str | float]]:
    """Kills in stage order. Three SIGKILLs per training stage: after a random step,
    halfway through a checkpoint write, after a later random step (each one past where the
    previous run resumes); for ppo and dpo a fourth after training, before the stage's
    stage.json. The stages without optimiser steps (data, prefs) restart when cut off: three
    kills at random moments after they start (a kill that comes after the stage is over lands
    in the next one)."""
    plan: list[tuple[str, str | float]] = []
    for stage in STAGES:
        if stage not in TRAINING:
            plan += [(stage, rng.uniform(0.0, 0.3)) for _ in range(3)]
            continue
        steps = TRAINING[stage]
        a = rng.randint(1, max(1, steps // 3))
        resumed = a // EVERY * EVERY
        n = rng.randint(1, 2)
        plan += [(stage, f"{stage}:step:{a}"), (stage, f"{stage}:save:{n}")]
        resumed += EVERY * (n - 1)  # the n-th save of that run was cut off; the one before stands
        plan.append((stage, f"{stage}:step:{rng.randint(resumed + 1, steps)}"))
        if stage in ("ppo", "dpo"):  # after training, before stage.json: saving, held-out checks, monitor.json
            plan.append((stage, f"{stage}:end:1"))
    return plan


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in rows]


@pytest.mark.smoke
def test_sigkill_anywhere_then_the_same_command_gives_the_same_weights(tmp_path, _tether_home):
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    assert _run(straight) == 0
    crashed = tmp_path / "crashed"
    rng = random.Random(20261126)
    kills = 0
    for stage, point in _kill_plan(rng):
        if isinstance(point, float):  # a random moment; the stage may be over by then
            if (crashed / stage / "stage.json").exists():
                continue
            rc = _run(crashed, kill_after=(crashed / stage / "config.yaml", point))
            kills += rc == -signal.SIGKILL
            assert rc == -signal.SIGKILL or (crashed / stage / "stage.json").exists()
            continue
        rc = _run(crashed, point)
        assert rc == -signal.SIGKILL, f"{point} did not fire"
        kills += 1
        assert not (crashed / stage / "stage.json").exists()
    assert _run(crashed) == 0
    assert kills >= 3 * len(TRAINING)

    for stage, steps in TRAINING.items():
        a = load_file(str(straight / stage / "checkpoint" / "model.safetensors"))
        b = load_file(str(crashed / stage / "checkpoint" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{stage}: weights differ"
        assert _rows(straight / stage / "metrics.jsonl") == _rows(crashed / stage / "metrics.jsonl"), stage
        result = json.loads((crashed / stage / "stage.json").read_text())
        assert result["steps"] == steps and result.get("resumed_from_step", 0) > 0, stage
        assert not (crashed / stage / "checkpoints").exists()  # deleted once the stage finished
    for stage in ("ppo", "dpo", "grpo"):
        assert (straight / stage / "monitor.json").read_text().replace(str(straight), "RUN") == \
            (crashed / stage / "monitor.json").read_text().replace(str(crashed), "RUN")
    for stage in ("data", "prefs"):
        for name in ("demos.jsonl",) if stage == "data" else ("rankings.jsonl", "labels.jsonl"):
            assert (straight / stage / name).read_bytes() == (crashed / stage / name).read_bytes()
    assert not [p for p in crashed.rglob(".tmp*")]


@pytest.mark.smoke
def test_a_changed_config_does_not_resume_an_old_checkpoint(tmp_path, _tether_home):
    from tether.config import load_config
    from tether.pipeline import Pipeline

    base = [f"out={tmp_path}", "stages=[data,sft]", "report=false", "sft.epochs=1", "checkpoint.every=2"]
    assert _run_fault(base, "sft:step:5") == -signal.SIGKILL
    assert latest_valid(tmp_path / "sft" / "checkpoints")[1]["step"] == 4
    # settings the stage does not train with change nothing: the stage list, eval, threads
    p = Pipeline(load_config(preset="tiny", overrides=base + ["stages=[data,sft,prefs]", "eval.n_prompts=7",
                                                             "threads=1"]))
    assert p._resumable("sft") == 4
    p = Pipeline(load_config(preset="tiny", overrides=base + ["sft.optim.lr=5e-4"]))
    assert p._resumable("sft") is None
    stale = list((tmp_path / ".stale").iterdir())
    assert len(stale) == 1 and stale[0].name.startswith("sft-") and (stale[0] / "step-00000004").is_dir()
    p.run()
    assert "resumed_from_step" not in json.loads((tmp_path / "sft" / "stage.json").read_text())
    assert math.isfinite(json.loads((tmp_path / "sft" / "stage.json").read_text())["final_loss"])
    # checkpoints a kill left in a finished stage (between its stage.json and the clean-up) go
    (tmp_path / "sft" / "checkpoints" / "step-00000002").mkdir(parents=True)
    p.run()
    assert not (tmp_path / "sft" / "checkpoints").exists()


def _run_fault(overrides: list[str], fault: str) -> int:
    """``tether run --preset tiny`` with ``overrides`` (key=value) in a subprocess, killed by ``fault``."""
    args = [sys.executable, "-m", "tether.cli", "run", "--preset", "tiny"]
    for item in overrides:
        key, value = item.split("=", 1)
        args += [f"--{key}", value]
    env = {**os.environ, "TETHER_QUIET": "1", "TETHER_FAULT": fault}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode


class _Crash(BaseException):
    """A crash inside the process (the SIGKILL test above covers a real kill)."""


@pytest.mark.smoke
def test_lora_stages_resume_exactly(tmp_path, monkeypatch, _tether_home):
    """Under LoRA (the default preset's setting) only the adapters are saved; a crash in
    SFT, the reward model and PPO (policy with adapters disabled as the reference) resumes
    to the uninterrupted weights, sampling through the engine."""
    import tether.checkpoint as ck
    from safetensors.torch import load_file

    from tether.config import load_config
    from tether.pipeline import Pipeline

    def cfg(out):
        return load_config(preset="tiny", overrides=[
            f"out={out}", "stages=[data,sft,prefs,rm,ppo]", "report=false", "lora.enabled=true", "lora.dropout=0.1",
            "sft.epochs=1",
            "rm.epochs=1", "ppo.steps=4", "prefs.n_prompts=300", "checkpoint.every=2",
            # the Tether engine samples (the tiny preset pins transformers for its calibrated runs)
            *[f"{s}.generation.engine=tether" for s in ("sft", "prefs", "ppo", "monitor", "eval")]])

    Pipeline(cfg(tmp_path / "straight")).run()
    crashes = iter(["sft:step:5", "rm:step:3", "ppo:step:3"])
    target = {"now": next(crashes)}

    def fault(stage, event, count):
        if f"{stage}:{event}:{count}" == target["now"]:
            target["now"] = next(crashes, None)
            raise _Crash()

    monkeypatch.setattr(ck, "_fault", fault)
    seen = 0
    while True:
        try:
            Pipeline(cfg(tmp_path / "crashed")).run()
            break
        except _Crash:
            seen += 1
    assert seen == 3
    for stage in ("sft", "rm", "ppo"):
        a = load_file(str(tmp_path / "straight" / stage / "checkpoint" / "model.safetensors"))
        b = load_file(str(tmp_path / "crashed" / stage / "checkpoint" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), stage
        resumed = json.loads((tmp_path / "crashed" / stage / "stage.json").read_text())["resumed_from_step"]
        assert resumed == {"sft": 4, "rm": 2, "ppo": 2}[stage]


def test_sampling_does_not_depend_on_earlier_calls(tiny_path, tiny_tokenizer):
    """transformers sizes a static KV cache for the longest of all earlier generate calls;
    Tether sizes it for each call, so a resumed run (a fresh model) samples exactly as an
    uninterrupted one (bf16 rounding depends on the attention's length)."""
    from transformers.generation.utils import GenerationMixin

    from tether.config import GenerationConfig, ModelConfig
    from tether.data.tokenize import Encoder
    from tether.models import load_policy
    from tether.rollout import generate

    sizes = []
    real = GenerationMixin._prepare_static_cache

    def spy(self, *args, **kwargs):
        cache = real(self, *args, **kwargs)
        sizes.append(self._previous_max_cache_length)
        return cache

    enc = Encoder(tiny_tokenizer, 64, 48)
    gen = GenerationConfig(max_new_tokens=8, temperature=1.0, batch_size=4, engine="transformers")  # its static cache
    long_prompts, short = [" ".join(["the"] * 40)] * 4, ["so"] * 4
    GenerationMixin._prepare_static_cache = spy
    try:
        model = load_policy(tiny_path, ModelConfig(name=tiny_path, autocast="off"), trainable=False)
        generate(model, enc, long_prompts, gen, seed=1)
        after_long = generate(model, enc, short, gen, seed=2)
        fresh = load_policy(tiny_path, ModelConfig(name=tiny_path, autocast="off"), trainable=False)
        alone = generate(fresh, enc, short, gen, seed=2)
    finally:
        GenerationMixin._prepare_static_cache = real
    assert len(sizes) == 3 and sizes[0] > sizes[1] == sizes[2]  # the short call's cache is its own size
    assert torch.equal(after_long.response_ids, alone.response_ids)
