"""Sampling draws with the generator on the right device (issue 15 item 8).

No GPU here, so the GPU's rule is emulated: PyTorch fills a tensor with a generator only on the generator's
own device. `StrictTorch` replaces torch.rand / randint / multinomial with versions that enforce that rule
for a generator that says it lives on `cuda:0`, then run the real CPU op. The old code (`torch.rand(())`
with a CUDA generator, `torch.randint(..., generator=cuda_gen)` in hf_generate) breaks this rule."""
from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.engine import rng
from harness.engine.acceptance import Sampling, sample_accept, select_token, typical_accept

REPO = Path(__file__).resolve().parents[1]


class FakeCudaGenerator:
    """Looks like a CUDA generator to the code under test; draws with a seeded CPU generator."""

    device = torch.device("cuda", 0)

    def __init__(self, seed: int = 0):
        self.cpu = torch.Generator().manual_seed(seed)


@pytest.fixture
def strict_torch(monkeypatch):
    real_rand, real_randint, real_multinomial = torch.rand, torch.randint, torch.multinomial
    calls = []

    def generator_of(kwargs):
        gen = kwargs.pop("generator", None)
        return gen, (gen.cpu if isinstance(gen, FakeCudaGenerator) else gen)

    def check(gen, out_device):
        if isinstance(gen, FakeCudaGenerator) and torch.device(out_device) != gen.device:
            raise RuntimeError(f"Expected a '{out_device}' device type for generator but found 'cuda'")

    def rand(*size, **kwargs):
        gen, real = generator_of(kwargs)
        check(gen, kwargs.pop("device", "cpu"))
        calls.append("rand")
        return real_rand(*size, generator=real, **kwargs)

    def randint(*args, **kwargs):
        gen, real = generator_of(kwargs)
        check(gen, kwargs.pop("device", "cpu"))
        calls.append("randint")
        return real_randint(*args, generator=real, **kwargs)

    def multinomial(probs, n, *args, **kwargs):
        gen, real = generator_of(kwargs)
        check(gen, probs.device)
        calls.append("multinomial")
        return real_multinomial(probs, n, *args, generator=real, **kwargs)

    monkeypatch.setattr(torch, "rand", rand)
    monkeypatch.setattr(torch, "randint", randint)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    return calls


def test_the_emulated_rule_rejects_what_the_old_code_did(strict_torch):
    gen = FakeCudaGenerator()
    with pytest.raises(RuntimeError, match="device type for generator"):
        torch.rand((), generator=gen)                                   # acceptance.py before the fix
    with pytest.raises(RuntimeError, match="device type for generator"):
        torch.randint(0, 2**31 - 1, (1,), generator=gen)                # hf_generate.py before the fix
    with pytest.raises(RuntimeError, match="device type for generator"):
        torch.multinomial(torch.ones(4), 1, generator=gen)              # CPU probs, CUDA generator


def test_draws_follow_the_generator_device(strict_torch):
    gen = FakeCudaGenerator(3)
    assert 0.0 <= rng.uniform(gen) < 1.0
    assert 0 <= rng.seed_from(gen) < 2**31 - 1
    # probabilities on another device than the generator: inverse CDF with the generator's uniform
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75])
    draws = [rng.categorical(probs, gen) for _ in range(400)]
    assert set(draws) <= {1, 3}
    assert 0.65 < draws.count(3) / len(draws) < 0.85
    assert "multinomial" not in strict_torch and "rand" in strict_torch


def test_the_acceptance_rules_sample_with_a_gpu_generator(strict_torch):
    sampling = Sampling(temperature=0.8, top_p=0.9)
    gen = FakeCudaGenerator(1)
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    assert 0 <= select_token(logits[0], sampling, gen) < 32
    parents, draft = (-1, 0, 0), [5, 7, 9]
    q = torch.softmax(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    for q_draft in (None, q):
        out = sample_accept(parents, draft, logits, q_draft, sampling, gen)
        assert len(out.tokens) == out.accepted_draft + 1
    out = typical_accept(parents, draft, logits, None, sampling, gen)
    assert len(out.tokens) == out.accepted_draft + 1


def test_cpu_draws_unchanged_and_reproducible():
    """Same device: plain torch.multinomial / torch.rand with the generator, as before the change."""
    probs = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(2)), dim=-1)
    a = [rng.categorical(probs, torch.Generator().manual_seed(9)) for _ in range(3)]
    expect = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(9)))
    assert a == [expect] * 3
    assert rng.uniform(torch.Generator().manual_seed(4)) == float(torch.rand((), generator=torch.Generator().manual_seed(4)))


def test_hf_generate_seeds_from_a_gpu_generator(strict_torch, monkeypatch):
    from baselines import hf_generate
    seeds = []
    monkeypatch.setattr(torch, "manual_seed", lambda s: seeds.append(s))
    # only the seeding line of generate_turn is exercised: stop before the model is touched
    class Stop(Exception):
        pass

    def stop_here(device):
        raise Stop

    monkeypatch.setattr(hf_generate, "Clock", stop_here)
    method = object.__new__(hf_generate.HFGenerate)
    with pytest.raises(Stop):
        method.generate_turn(SimpleNamespace(device=torch.device("cpu"), devices=(torch.device("cpu"),)), [1, 2], Sampling(temperature=1.0),
                             None, FakeCudaGenerator(5))
    assert len(seeds) == 1 and "randint" in strict_torch


def test_no_random_draw_bypasses_rng():
    """Every torch.rand / randint / multinomial call with a generator lives in harness/engine/rng.py."""
    offenders = []
    for folder in ("harness", "baselines", "methods"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "rng.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        node.func.attr in {"rand", "randint", "multinomial", "bernoulli", "randn"} and \
                        any(k.arg == "generator" for k in node.keywords):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
