"""Shared prompts: running each prompt once for its group of responses gives the same
log-probs, logits, hidden states, scalars and gradients as running every row in full."""

from __future__ import annotations

import pytest
import torch

from tether.config import LoRAConfig, ModelConfig
from tether.models import (
    grouped_logprobs,
    grouped_token_scalars,
    load_policy,
    load_scalar_model,
    reference_context,
    sequence_logprobs,
    token_scalars,
)

MODEL = ModelConfig(max_length=64, max_prompt_length=32)
LORA = LoRAConfig(enabled=True, r=4, alpha=8)


def _rows(n_prompts: int, group: int, seed: int = 0):
    """Left-padded queries repeated ``group`` times and right-padded responses of varied
    lengths (one of a single token)."""
    g = torch.Generator().manual_seed(seed)
    q_lens = [5 + 3 * i for i in range(n_prompts)]
    P = max(q_lens)
    B = n_prompts * group
    q_ids = torch.zeros(B, P, dtype=torch.long)
    q_mask = torch.zeros(B, P, dtype=torch.long)
    for i, n in enumerate(q_lens):
        ids = torch.randint(3, 60, (n,), generator=g)
        for j in range(group):
            q_ids[i * group + j, P - n :] = ids
            q_mask[i * group + j, P - n :] = 1
    W = 9
    r_ids = torch.randint(3, 60, (B, W), generator=g)
    r_mask = torch.zeros(B, W, dtype=torch.long)
    for b in range(B):
        n = 1 if b == 1 else int(torch.randint(2, W + 1, (1,), generator=g))
        r_mask[b, :n] = 1
    r_ids = r_ids * r_mask
    return q_ids, q_mask, r_ids, r_mask


def _lora_nonzero(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("group", [1, 2, 4])
def test_grouped_logprobs_equal_full_rows(tiny_path, group):
    torch.manual_seed(0)
    model = load_policy(tiny_path, MODEL, LORA)
    _lora_nonzero(model)
    q_ids, q_mask, r_ids, r_mask = _rows(3, group)
    ids, att = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
    start = q_ids.size(1)
    m = r_mask.float()

    full_lp, full_logits, full_h = sequence_logprobs(model, ids, att, start, return_logits=True, return_hidden=True)
    (full_lp * m).sum().backward()
    full_grads = _grads(model)
    model.zero_grad()
    lp, logits, h = grouped_logprobs(model, q_ids, q_mask, r_ids, r_mask, group, return_logits=True, return_hidden=True)
    (lp * m).sum().backward()
    grads = _grads(model)

    real = r_mask.bool()
    assert torch.allclose(lp[real], full_lp[real], atol=1e-5)
    assert torch.allclose(logits[real], full_logits[real], atol=1e-4)
    assert torch.allclose(h[real], full_h[real], atol=1e-4)
    assert set(grads) == set(full_grads) and grads
    for name in grads:
        assert torch.allclose(grads[name], full_grads[name], atol=1e-5, rtol=1e-4), name
    # the reference (adapters off) goes through the same path
    with torch.no_grad(), reference_context(model, None) as ref:
        ref_full = sequence_logprobs(ref, ids, att, start)
        ref_grouped = grouped_logprobs(ref, q_ids, q_mask, r_ids, r_mask, group)
    assert torch.allclose(ref_grouped[real], ref_full[real], atol=1e-5)
    assert not torch.allclose(ref_grouped[real], lp.detach()[real], atol=1e-3)  # the adapters matter


def test_grouped_token_scalars_equal_full_rows(tiny_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = load_scalar_model(tiny_path, MODEL, LORA, pad_token_id=tiny_tokenizer.pad_token_id or 0)
    _lora_nonzero(model)
    group = 3
    q_ids, q_mask, r_ids, r_mask = _rows(2, group, seed=1)
    ids, att = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
    start = q_ids.size(1)
    lengths = r_mask.sum(1)
    rows = torch.arange(ids.size(0))

    full = token_scalars(model, ids, att)
    full[rows, start + lengths - 1].sum().backward()
    full_grads = _grads(model)
    model.zero_grad()
    out = grouped_token_scalars(model, q_ids, q_mask, r_ids, r_mask, group)
    out[rows, lengths].sum().backward()
    grads = _grads(model)

    assert out.shape == (ids.size(0), 1 + r_ids.size(1))
    assert torch.allclose(out[rows, lengths], full[rows, start + lengths - 1], atol=1e-5)
    values_full = full[:, start - 1 : -1]
    assert torch.allclose(out[:, :-1][r_mask.bool()], values_full[r_mask.bool()], atol=1e-5)
    for name in full_grads:
        assert torch.allclose(grads[name], full_grads[name], atol=1e-5, rtol=1e-4), name


def test_rows_of_a_group_must_share_their_query(tiny_path):
    model = load_policy(tiny_path, MODEL, LORA)
    q_ids, q_mask, r_ids, r_mask = _rows(2, 2)
    q_ids[1, -1] = (q_ids[1, -1] + 1) % 60
    with pytest.raises(ValueError, match="share one query"):
        grouped_logprobs(model, q_ids, q_mask, r_ids, r_mask, 2)
    with pytest.raises(ValueError, match="groups of 3"):
        grouped_logprobs(model, q_ids, q_mask, r_ids, r_mask, 3)


def test_reward_model_rankings_share_their_prompt(tiny_path, tiny_tokenizer):
    """collate_rankings keeps the prompt apart when every ranking has the same K: the same
    scores and gradients as whole sequences; mixed K falls back to whole sequences."""
    from tether.algorithms.reward import collate_rankings, ranking_scores
    from tether.data.schemas import Ranking
    from tether.data.tokenize import Encoder
    from tether.losses import ranking_pairwise_loss

    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    torch.manual_seed(0)
    model = load_scalar_model(tiny_path, MODEL, LORA, pad_token_id=enc.pad_id)
    _lora_nonzero(model)
    words = ["alpha", "beta gamma", "delta", "epsilon zeta eta", "theta"]
    rankings = [Ranking(f"prompt number {i} " + "x " * i, [words[(i + j) % 5] * (1 + j) for j in range(3)],
                        [2, 0, 1]) for i in range(3)]

    def run(batch):
        model.zero_grad()
        scores = ranking_scores(model, batch)
        ranking_pairwise_loss(scores, batch["slot_mask"]).backward()
        return scores.detach(), _grads(model)

    shared = collate_rankings(enc, rankings)
    full = collate_rankings(enc, rankings, share_prompt=False)
    assert "group" in shared and "group" not in full
    s_scores, s_grads = run(shared)
    f_scores, f_grads = run(full)
    assert torch.allclose(s_scores, f_scores, atol=1e-5)
    for name in f_grads:
        assert torch.allclose(s_grads[name], f_grads[name], atol=1e-5, rtol=1e-4), name

    mixed = rankings + [Ranking("a shorter list", ["one", "two"], [1, 0])]
    batch = collate_rankings(enc, mixed)
    assert "group" not in batch and batch["slot_mask"].sum() == 11
    assert torch.allclose(ranking_scores(model, batch)[:3].detach(), s_scores, atol=1e-5)


def test_score_groups_equals_scoring_each_response(tiny_path, tiny_tokenizer):
    """The held-out scoring that runs each prompt once for its group gives score_responses'
    rewards, in the order given (duplicate and empty responses included; mixed group sizes)."""
    from tether.algorithms.reward import score_groups, score_responses
    from tether.data.tokenize import Encoder

    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    torch.manual_seed(0)
    model = load_scalar_model(tiny_path, MODEL, LORA, pad_token_id=enc.pad_id, num_labels=2)
    _lora_nonzero(model)
    groups = [(f"prompt number {i} " + "x " * i, ["alpha", "beta gamma", "alpha", "delta " * (i + 1)])
              for i in range(5)]
    flat_p = [p for p, rs in groups for _ in rs]
    flat_r = [r for _, rs in groups for r in rs]
    want = score_responses(model, enc, flat_p, flat_r)
    got = score_groups(model, enc, groups, batch_size=2)
    assert got.shape == want.shape == (20, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    mixed = groups[:2] + [("a shorter list", ["one", ""])]
    want = score_responses(model, enc, [p for p, rs in mixed for _ in rs], [r for _, rs in mixed for r in rs])
    torch.testing.assert_close(score_groups(model, enc, mixed), want, atol=1e-5, rtol=1e-5)
