"""CUDA: checkpoints saved from GPU tensors resume on the GPU to the uninterrupted weights
(CUDA random generators included), and the non-finite guard works on device tensors.
Skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from tether.checkpoint import Checkpointer, LoopState, RNGState
from tether.config import OptimConfig
from tether.engine import BatchPlan, Engine

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _deterministic():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _setup(root, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Dropout(0.3), torch.nn.ReLU(),
                                torch.nn.Linear(64, 1)).cuda()
    engine = Engine(model.parameters(), OptimConfig(lr=1e-2, batch_size=16, micro_batch_size=8), 30)
    plan = BatchPlan(64, 16, 8, torch.Generator().manual_seed(1))
    state = {"policy": model, "engine": engine, "data": plan, "rng": RNGState(), "loop": LoopState()}
    return model, engine, plan, state, Checkpointer(root, every=3, stage="gpu", say=lambda m: None)


def _train(model, engine, plan, x, y, start, stop, ckpt=None, state=None):
    for step in range(start, stop):
        for idx in plan.next():
            loss = ((model(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()  # dropout draws from the CUDA generator
            loss.backward()
        engine.step(loss.detach())
        if ckpt is not None:
            ckpt.step(step + 1, state)


def test_resume_on_cuda_equals_uninterrupted(tmp_path):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 16, generator=g).cuda(), torch.randn(64, generator=g).cuda()
    model, engine, plan, state, _ = _setup(tmp_path / "a")
    torch.cuda.manual_seed(7)
    _train(model, engine, plan, x, y, 0, 12)
    straight = {n: p.detach().cpu() for n, p in model.named_parameters()}

    model, engine, plan, state, ckpt = _setup(tmp_path / "b")
    torch.cuda.manual_seed(7)
    _train(model, engine, plan, x, y, 0, 8, ckpt, state)  # saved at 3 and 6; cut off after 8
    torch.cuda.manual_seed(12345)  # a new process would start with another CUDA random state
    model, engine, plan, state, ckpt = _setup(tmp_path / "b", seed=99)
    start = ckpt.resume(state)
    assert start == 6
    assert all(p.is_cuda for p in model.parameters())
    assert all(v.is_cuda for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    _train(model, engine, plan, x, y, start, 12, ckpt, state)
    resumed = {n: p.detach().cpu() for n, p in model.named_parameters()}
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def test_non_finite_guard_on_cuda():
    model = torch.nn.Linear(4, 1).cuda()
    engine = Engine(model.parameters(), OptimConfig(max_nonfinite_steps=2), 10, name="gpu")
    before = model.weight.detach().clone()
    (model(torch.ones(2, 4, device="cuda")).sum() * torch.tensor(float("nan"), device="cuda")).backward()
    assert engine.step()["skipped"] == 1
    assert torch.equal(model.weight.detach(), before)


def test_tiny_sft_resumes_on_cuda(tmp_path, tiny_path, tiny_tokenizer):
    """SFT of the tiny model on the GPU: cut off after step 5, resumed from its step-4
    checkpoint, ends on the uninterrupted weights."""
    from tether.algorithms.sft import train_sft
    from tether.config import ModelConfig, SFTConfig
    from tether.data.schemas import Demonstration
    from tether.data.tokenize import Encoder
    from tether.models import load_policy

    demos = [Demonstration(prompt=f"count {i}", response=" ".join(["the"] * (1 + i % 5))) for i in range(64)]
    encoder = Encoder(tiny_tokenizer, 64, 32)
    cfg = SFTConfig(max_steps=8, optim=OptimConfig(lr=1e-3, batch_size=16, micro_batch_size=8))

    def model():
        return load_policy(tiny_path, ModelConfig(name=tiny_path)).cuda()

    straight = model()
    train_sft(straight, encoder, demos, cfg, seed=3)

    class Cut(BaseException):
        pass

    ckpt = Checkpointer(tmp_path / "ck", every=2, stage="sft", say=lambda m: None)
    original = ckpt.step

    def step(n, state, final=False):
        original(n, state, final=final)
        if n == 5:
            raise Cut()

    ckpt.step = step
    with pytest.raises(Cut):
        train_sft(model(), encoder, demos, cfg, seed=3, checkpointer=ckpt)
    resumed_model = model()
    ckpt = Checkpointer(tmp_path / "ck", every=2, stage="sft", say=lambda m: None)
    out = train_sft(resumed_model, encoder, demos, cfg, seed=3, checkpointer=ckpt)
    assert out["resumed_from_step"] == 4
    a, b = dict(straight.named_parameters()), dict(resumed_model.named_parameters())
    assert all(torch.equal(a[n].detach().cpu(), b[n].detach().cpu()) for n in a)
