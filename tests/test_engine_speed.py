"""Engine settings for speed and memory: fused AdamW, length-grouped forward passes."""

from __future__ import annotations

import pytest
import torch

from tether.config import OptimConfig
from tether.engine import Engine, length_groups, token_budget


def test_length_groups_sorts_and_cuts_by_rows_and_tokens():
    lengths = {0: 10, 1: 50, 2: 12, 3: 48, 4: 11, 5: 100}
    cost = lambda i: (1, lengths[i])  # noqa: E731
    # sorted: 0(10) 4(11) 2(12) 3(48) 1(50) 5(100); budget 100 padded tokens, at most 4 items
    assert length_groups([[0, 1, 2], [3, 4, 5]], cost, 4, 100) == [[0, 4, 2], [3, 1], [5]]
    # at most 2 items per pass
    assert length_groups([[0, 1, 2], [3, 4, 5]], cost, 2, 10_000) == [[0, 4], [2, 3], [1, 5]]
    # an item over the budget alone is still a pass
    assert length_groups([[5]], cost, 4, 20) == [[5]]
    # rows count: an item of 3 rows of 10 costs 30
    assert length_groups([[0, 1]], lambda i: (3, 10), 8, 59) == [[0], [1]]
    assert length_groups([[0, 1]], lambda i: (3, 10), 8, 60) == [[0, 1]]
    # an item drawn twice in one step (an epoch boundary on a small set) stays twice
    assert length_groups([[0, 0], [4]], cost, 4, 100) == [[0, 0, 4]]
    # 0 = off: the plan's micro-batches as they are
    assert length_groups([[5, 0], [1]], cost, 4, 0) == [[5, 0], [1]]


def test_token_budget_auto():
    assert token_budget(-1, "cpu") == 512
    assert token_budget(-1, "cuda") == 16384
    assert token_budget(0, "cpu") == 0 and token_budget(300, "cuda") == 300


def test_micro_batch_tokens_validated():
    from tether.config import ConfigError

    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        OptimConfig(micro_batch_tokens=-5)


def test_encoder_lengths_match_example_and_leave_stats_alone(tiny_tokenizer):
    from tether.data.tokenize import Encoder

    enc = Encoder(tiny_tokenizer, 16, 8)
    before = enc.stats.state_dict()
    p, rs = enc.lengths("the cat sat on the mat and more words here", ["a b c", "a b c d e f g h i j k l m n"])
    assert enc.stats.state_dict() == before
    for r, n in zip(["a b c", "a b c d e f g h i j k l m n"], rs):
        ids_p, ids_r = enc.example("the cat sat on the mat and more words here", r)
        assert (len(ids_p), len(ids_r)) == (p, n)
    assert enc.stats.responses_cut == 1  # example() still counts


def test_ranking_cost_counts_the_tokens_of_the_layout_each_pass_gets(tiny_tokenizer):
    """Shared prompts (one K for all): the prompt once plus K widths of the longest response;
    mixed K or share_prompt off: K whole rows."""
    from tether.algorithms.reward import ranking_cost, collate_rankings
    from tether.data.schemas import Ranking
    from tether.data.tokenize import Encoder

    enc = Encoder(tiny_tokenizer, 64, 32)
    same = [Ranking("one two three four", ["a b", "a b c d e"], [0, 1]), Ranking("five six", ["x", "y z"], [1, 0])]
    p, (r0, r1) = enc.lengths(same[0].prompt, list(same[0].responses))
    assert ranking_cost(enc, same)(0) == (1, p + 2 * max(r0, r1))
    assert ranking_cost(enc, same, share_prompt=False)(0) == (2, p + max(r0, r1))
    # the shared cost bounds what the collated pass really runs: query columns + K response columns
    batch = collate_rankings(enc, same[:1], True)
    assert "group" in batch and batch["query_ids"].size(1) + 2 * batch["response_ids"].size(1) <= p + 2 * max(r0, r1)
    mixed = same + [Ranking("seven", ["p", "q", "r"], [0, 1, 2])]
    assert ranking_cost(enc, mixed)(0) == (2, p + max(r0, r1))


def test_engine_uses_fused_adamw_on_cpu_and_matches_the_loop():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32, dtype=torch.float64))
    w2 = torch.nn.Parameter(w.detach().clone())
    engine = Engine([w], OptimConfig(lr=1e-2, max_grad_norm=0.0), 10)
    assert engine.optimizer.param_groups[0]["fused"] is True
    loop = torch.optim.AdamW([w2], lr=1e-2, weight_decay=0.0, foreach=False)
    for _ in range(5):
        g = torch.randn(64, 32, dtype=torch.float64)
        w.grad, w2.grad = g.clone(), g.clone()
        engine.step(1.0)
        loop.step()
    assert torch.allclose(w, w2, atol=1e-12, rtol=0)
