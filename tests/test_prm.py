"""Process reward models: the arith task's step checker, the step loss, step positions,
the data format's errors, aggregation and best-of-N, gradient accumulation, and the PRM
stage end to end on the tiny arith model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tether.algorithms.prm import aggregate_steps, best_of_n, collate_steps, step_positions, train_prm
from tether.config import ModelConfig, OptimConfig, PRMConfig
from tether.data.io import DataError
from tether.data.schemas import StepExample, load_step_examples
from tether.losses import step_bce_loss
from tether.tasks.arith import ArithTask, final_answer, solve, split_steps, step_labels

MODEL = ModelConfig(max_length=64, max_prompt_length=24, autocast="off")


# ----------------------------------------------------------------------------- the task


def test_arith_solution_and_step_labels_by_hand():
    prompt = "compute 7 add 5 times 3 minus 4"
    assert solve(prompt) == ["7 add 5 is 2", "2 times 3 is 6", "6 minus 4 is 2", "answer 2"]
    assert step_labels(prompt, solve(prompt)) == [1, 1, 1, 1]
    # a wrong product; the next step starts from the stated (wrong) result and is right from there
    steps = ["7 add 5 is 2", "2 times 3 is 5", "5 minus 4 is 1", "answer 1"]
    assert step_labels(prompt, steps) == [1, 0, 1, 1]
    # a step that does not start from the previous result; an operand the prompt does not have
    assert step_labels(prompt, ["7 add 5 is 2", "3 times 3 is 9", "9 minus 4 is 5", "answer 5"]) == [1, 0, 1, 1]
    assert step_labels(prompt, ["7 add 6 is 3", "3 times 3 is 9"]) == [0, 1]
    # answering early, a wrong answer, a step after the answer, garbage
    assert step_labels(prompt, ["7 add 5 is 2", "answer 2"]) == [1, 0]
    assert step_labels(prompt, solve(prompt)[:3] + ["answer 3"]) == [1, 1, 1, 0]
    assert step_labels(prompt, solve(prompt) + ["answer 2"]) == [1, 1, 1, 1, 0]
    assert step_labels(prompt, ["seven plus five"]) == [0]
    task = ArithTask(n_heldout=10, n_train=50)
    assert task.gold(prompt, " ; ".join(solve(prompt))) == 1.0
    assert task.gold(prompt, "7 add 5 is 9 ; answer 2") == 1.0  # gold reads the final answer only
    assert task.gold(prompt, " ; ".join(steps)) == 0.0
    assert final_answer("no answer") is None
    assert split_steps(" a ;  ; b ") == ["a", "b"]
    assert not set(task.train_prompts()) & set(task.heldout_prompts())


# ----------------------------------------------------------------------------- the loss


def test_step_bce_loss_against_hand_values_and_a_loop():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 9.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.3, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])

    def bce(z, y):
        return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))

    terms = [bce(2.0, 1.0), bce(-1.0, 0.0), bce(0.5, 1.0), bce(0.0, 0.3), bce(3.0, 1.0)]
    assert float(step_bce_loss(logits, labels, mask)) == pytest.approx(sum(terms) / 5, abs=1e-12)
    assert float(step_bce_loss(logits, labels, mask, normalizer=10)) == pytest.approx(sum(terms) / 10, abs=1e-12)
    # by hand: log(1 + e^-2) for the first term
    assert terms[0] == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-12)


def test_aggregation_and_best_of_n():
    p = torch.tensor([0.9, 0.2, 0.8])
    assert aggregate_steps(p, "min") == pytest.approx(0.2)
    assert aggregate_steps(p, "prod") == pytest.approx(0.9 * 0.2 * 0.8)
    assert aggregate_steps(p, "last") == pytest.approx(0.8)
    assert aggregate_steps(torch.tensor([]), "min") == 0.0
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.5, 0.2], [0.0, 0.1, 0.7]])
    gold = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = best_of_n(scores, gold)
    assert out["per_prompt"] == [1.0, 0.0, 0.0]  # argmax; a tie goes to the first
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["stderr"] == pytest.approx(float(torch.tensor([1.0, 0.0, 0.0]).std()) / math.sqrt(3))


# ----------------------------------------------------------------------------- data


def test_step_file_errors_name_line_and_field(tmp_path):
    path = tmp_path / "steps.jsonl"
    good = {"prompt": "p", "steps": ["a", "b"], "labels": [1, 0]}
    cases = [
        ({"prompt": "p", "labels": [1]}, "field 'steps': missing"),
        ({"prompt": "p", "steps": ["a", ""], "labels": [1, 0]}, "field 'steps[1]'"),
        ({"prompt": "p", "steps": ["a", "b"], "labels": [1]}, "field 'labels': must be a list with one label per step (2)"),
        ({"prompt": "p", "steps": ["a"], "labels": [1.5]}, "field 'labels[0]'"),
        ({"steps": ["a"], "labels": [1]}, "field 'prompt': missing"),
    ]
    for record, message in cases:
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError) as err:
            load_step_examples(path)
        assert f"{path}:2:" in str(err.value) and message in str(err.value)
    path.write_text(json.dumps({**good, "labels": [True, 0.25], "separator": " | "}) + "\n")
    (ex,) = load_step_examples(path)
    assert ex.labels == [1.0, 0.25] and ex.separator_join() == "a | b"


@pytest.fixture(scope="module")
def arith_model(_tether_home):
    from tether.zoo import pull

    return str(pull("tiny-arith"))


def test_step_positions_point_at_each_steps_last_token(arith_model):
    from tether.data.tokenize import Encoder
    from tether.models import load_tokenizer

    tok = load_tokenizer(arith_model)
    enc = Encoder(tok, MODEL.max_length, MODEL.max_prompt_length)
    prompt = "compute 7 add 5 times 3"
    steps = ["7 add 5 is 2", "2 times 3 is 6", "answer 6"]
    ids, ends = step_positions(enc, prompt, steps, " ; ")
    assert [tok.convert_ids_to_tokens(ids[e]) for e in ends] == ["2", "6", "6"]
    assert ids[ends[-1] + 1] == enc.eos_id
    batch = collate_steps(enc, [StepExample(prompt, steps, [1, 1, 1], " ; "),
                                StepExample(prompt, steps[:1], [0], " ; ")], " ; ")
    assert batch["step_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["step_pos"][0].tolist() == ends


def test_prm_gradient_accumulation_equals_one_batch(arith_model):
    import copy

    from tether.data.tokenize import Encoder
    from tether.models import load_scalar_model, load_tokenizer

    enc = Encoder(load_tokenizer(arith_model), MODEL.max_length, MODEL.max_prompt_length)
    task = ArithTask(n_heldout=10, n_train=64)
    examples = []
    for i, p in enumerate(task.train_prompts()[:16]):
        steps = solve(p)
        if i % 2:  # a wrong result in the first step
            words = steps[0].split()
            words[-1] = str((int(words[-1]) + 3) % 10)
            steps[0] = " ".join(words)
        examples.append(StepExample(p, steps, [float(v) for v in step_labels(p, steps)], " ; "))
    base = load_scalar_model(arith_model, MODEL, pad_token_id=enc.pad_id).double()
    big, acc = copy.deepcopy(base), copy.deepcopy(base)
    for model, micro in ((big, 8), (acc, 2)):
        cfg = PRMConfig(max_steps=3, separator=" ; ", optim=OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=micro))
        train_prm(model, enc, examples, cfg, seed=4)
    moved = max(float((p - q).abs().max()) for p, q in zip(base.parameters(), big.parameters()))
    diff = max(float((p - q).abs().max()) for p, q in zip(acc.parameters(), big.parameters()))
    assert moved > 1e-4 and diff < 1e-9


@pytest.mark.smoke
def test_prm_stage_trains_prm_and_orm_and_runs_best_of_n(tmp_path):
    from tether.config import load_config
    from tether.pipeline import Pipeline

    cfg = load_config(None, preset="arith", overrides=[
        "task.n_demos=300", "prm.n_prompts=200", "prm.samples_per_prompt=2", "prm.epochs=1",
        "prm.heldout_prompts=40", "prm.best_of=4"])
    Pipeline(cfg, tmp_path / "run").run(["data", "sft", "prm"])
    stage = json.loads((tmp_path / "run" / "prm" / "stage.json").read_text())
    assert stage["solutions"] > 0 and 0 <= stage["share_right"] <= 1
    h = stage["heldout"]
    assert h["prompts"] == 40 and h["n"] == 4 and 0 <= h["step_accuracy"] <= 1
    assert set(h["best_of_n"]) == {"prm_min", "prm_prod", "orm", "chance", "oracle"}
    assert h["best_of_n"]["oracle"]["accuracy"] >= h["best_of_n"]["prm_min"]["accuracy"] - 1e-12
    assert (tmp_path / "run" / "prm" / "checkpoint" / "config.json").is_file()
    assert (tmp_path / "run" / "prm" / "orm" / "config.json").is_file()
    (first, *_) = load_step_examples(tmp_path / "run" / "prm" / "steps.jsonl")
    assert first.separator == " ; "


# ----------------------------------------------------------------------------- dense rewards


def test_process_advantages_against_hand_values_and_a_loop():
    from tether.advantages import process_advantages

    # 2 groups of 2 rows, 4 positions; steps end where the mask is True
    r = torch.tensor([[0.0, 0.9, 0.0, 0.2], [0.5, 0.0, 0.0, 0.0],
                      [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    m = torch.tensor([[False, True, False, True], [True, False, False, False],
                      [False, True, False, False], [False, False, False, True]])
    out = process_advantages(r, m, group=2, eps=0.0)
    # group 1: steps 0.9, 0.2, 0.5: mean 0.5333, sample std 0.35119
    mean, std = (0.9 + 0.2 + 0.5) / 3, math.sqrt(((0.9 - 1.6 / 3) ** 2 + (0.2 - 1.6 / 3) ** 2 + (0.5 - 1.6 / 3) ** 2) / 2)
    n = [(0.9 - mean) / std, (0.2 - mean) / std, (0.5 - mean) / std]
    assert out[0].tolist() == pytest.approx([n[0] + n[1], n[0] + n[1], n[1], n[1]], abs=1e-12)
    assert out[1].tolist() == pytest.approx([n[2], 0.0, 0.0, 0.0], abs=1e-12)
    # group 2: two steps 1.0 and 1.0: no spread, every advantage 0
    assert out[2:].abs().max() == 0
    # a naive loop on random data
    torch.manual_seed(0)
    r = torch.rand(6, 5, dtype=torch.float64)
    m = torch.rand(6, 5) > 0.5
    out = process_advantages(r * m, m, group=3, eps=1e-4)
    for g in range(2):
        rows = range(3 * g, 3 * g + 3)
        vals = [float(r[i, t]) for i in rows for t in range(5) if m[i, t]]
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / max(len(vals) - 1, 1))
        for i in rows:
            for t in range(5):
                want = sum((float(r[i, u]) - mu) / (sd + 1e-4) for u in range(t, 5) if m[i, u])
                assert float(out[i, t]) == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_dense_prm_rewards_reach_the_update(arith_model, algo):
    """Step rewards at each step's last token: GRPO turns them into process advantages, PPO
    adds them to the per-token rewards; both train and log the mean step reward."""
    from tether.algorithms.prm import rollout_step_rewards
    from tether.config import GenerationConfig, GRPOConfig, PPOConfig
    from tether.data.tokenize import Encoder
    from tether.models import frozen_copy, load_policy, load_scalar_model, load_tokenizer

    enc = Encoder(load_tokenizer(arith_model), MODEL.max_length, MODEL.max_prompt_length)
    policy = load_policy(arith_model, MODEL)
    prm = load_scalar_model(arith_model, MODEL, pad_token_id=enc.pad_id)
    task = ArithTask(n_heldout=10, n_train=64)
    seen = []

    def step_fn(rollout):
        out = rollout_step_rewards(prm, enc, rollout, task.split_steps, " ; ")
        seen.append(out)
        return out

    rows = []

    class Log:
        def log(self, step, row):
            rows.append(row)

    gen = GenerationConfig(max_new_tokens=12)
    zero = lambda rollout: torch.zeros(len(rollout))  # noqa: E731  only the dense rewards
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    if algo == "grpo":
        from tether.algorithms.grpo import train_grpo

        cfg = GRPOConfig(steps=2, rollout_batch_size=8, samples_per_prompt=4, mini_batch_size=8, micro_batch_size=8,
                         generation=gen, optim=OptimConfig(lr=1e-3))
        train_grpo(policy, frozen_copy(policy), enc, task.train_prompts(), zero, cfg, seed=0, logger=Log(),
                   step_reward_fn=step_fn)
    else:
        from tether.algorithms.ppo import ValueHead, train_ppo

        cfg = PPOConfig(steps=2, rollout_batch_size=8, mini_batch_size=4, micro_batch_size=4, epochs=1,
                        generation=gen, optim=OptimConfig(lr=1e-3))
        train_ppo(policy, ValueHead(policy.config.hidden_size), frozen_copy(policy), enc, task.train_prompts(),
                  zero, cfg, seed=0, logger=Log(), step_reward_fn=step_fn)
    rewards, mask, probs = seen[0]
    assert rewards.shape == mask.shape and int(mask.sum()) == sum(len(p) for p in probs) > 0
    assert all("reward/step" in row for row in rows)
    assert rows[0]["reward/step"] == pytest.approx(float(rewards[mask].mean()), abs=1e-6)
    assert max(float((policy.state_dict()[k] - before[k]).abs().max()) for k in before) > 1e-5


def test_data_validate_reads_step_files(tmp_path, capsys):
    from tether.cli import main

    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps({"prompt": "p", "steps": ["a", "b"], "labels": [1, 0]}) + "\n")
    assert main(["data", "validate", str(path)]) == 0
    assert "1 valid step-labelled solutions, 2 steps (50.0% labelled right)" in capsys.readouterr().out
    path.write_text(json.dumps({"prompt": "p", "steps": ["a", "b"], "labels": [1]}) + "\n")
    assert main(["data", "validate", str(path)]) == 2
    assert f"{path}:1: field 'labels'" in capsys.readouterr().err
