"""Sampling through the speculative loop follows the target's own distribution (issue 3, item 5).

On a tiny random Llama with an 8-token vocabulary (random logits of std ~1, so several tokens are
likely at every step) we draw thousands of short generations and compare the empirical distribution
with the exact one computed from the model's logits, by a chi-square goodness-of-fit test.

The first generated token comes from the prefill's own sample (no draft is involved), so the
statistic is the pair (token 2, token 3): the two tokens a speculative step produces, covering
acceptance at draft depth 1 and 2, the residual after a rejection and the bonus token. Its exact
distribution is the marginal over token 1: P(b, c) = sum_a p(a) p(b | a) p(c | a, b).

The generator is seeded, so every run draws the same samples: the test is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import harness.engine.acceptance as acceptance_module
from baselines.sps import SpSProposer
from harness.engine.acceptance import Acceptance, Sampling, target_probs
from harness.engine.loop import Draft, Proposer, StopCriteria, decode_turn
from harness.engine.target import Target
from harness.engine.tree import children_of
from tests.conftest import make_tiny_llama

VOCAB = 8
PROMPT = [1, 5, 2, 7, 3]
ALPHA = 1e-3
# Sample counts keep the file near 30 s of CPU (a draw is one 4-token generation, ~10-15 ms on a tiny
# model); the power test shows they are enough to catch a real bias, not only a gross one.


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards are all overhead; extra intra-op threads only contend with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_target():
    return make_tiny_llama(seed=0, vocab=VOCAB, layers=1, hidden=32)


@pytest.fixture(scope="module")
def small_draft():
    return make_tiny_llama(seed=1, vocab=VOCAB, layers=1, hidden=32)


@torch.inference_mode()
def exact_pair_distribution(model, sampling: Sampling) -> np.ndarray:
    """[V, V] exact P(token2 = b, token3 = c), token1 marginalised out."""
    p_first = target_probs(model(torch.tensor([PROMPT])).logits[0, -1], sampling).double()
    pairs = torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
    logits = model(pairs).logits.view(VOCAB, VOCAB, len(PROMPT) + 2, VOCAB)
    p_second = target_probs(logits[:, 0, -2], sampling).double()          # [a, b] = p(b | a)
    p_third = target_probs(logits[:, :, -1], sampling).double()           # [a, b, c] = p(c | a, b)
    joint = p_first[:, None, None] * p_second[:, :, None] * p_third
    return joint.sum(0).numpy()


def draw_pairs(model, proposer: Proposer, sampling: Sampling, samples: int, seed: int = 0) -> np.ndarray:
    """[V, V] counts of (token2, token3) over `samples` generations of 4 tokens through decode_turn."""
    target = Target(model)
    generator = torch.Generator().manual_seed(seed)
    stop = StopCriteria(frozenset(), max_new_tokens=4)
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    for _ in range(samples):
        tokens = decode_turn(target, proposer, PROMPT, sampling, stop, generator).token_ids
        counts[tokens[1], tokens[2]] += 1
    return counts


def goodness_of_fit(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value. Impossible cells must stay empty; cells expecting < 5 draws are pooled so
    the chi-square approximation holds."""
    counts, probs = counts.ravel(), probs.ravel()
    assert counts[probs == 0].sum() == 0, "drew a pair the target gives probability 0"
    keep = probs > 0
    counts, expected = counts[keep], probs[keep] / probs[keep].sum() * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(chisquare(counts, expected).pvalue)


class FixedTree(Proposer):
    """Deterministic drafts (q_draft = None) with several siblings: the target's top-3 tokens after the
    pending one, two children under the first and one under the second."""

    def propose(self, ctx):
        first, second, third = ctx.logits.topk(3).indices.tolist()
        tokens = [first, second, third, (first + 1) % VOCAB, (first + 5) % VOCAB, (second + 3) % VOCAB]
        return Draft(tokens, (-1, -1, -1, 0, 0, 1))


def accept_everything(parents, draft_tokens, logits, q_draft, sampling, generator) -> Acceptance:
    """A wrong rule for the power check: take the first branch whole, then a target sample."""
    children = children_of(parents)
    path, node = [0], 0
    while children[node]:
        node = children[node][0]
        path.append(node)
    bonus = int(torch.multinomial(target_probs(logits[node], sampling), 1, generator=generator))
    return Acceptance(path, [draft_tokens[i - 1] for i in path[1:]] + [bonus], len(path) - 1)


def test_vanilla_sampling_matches_the_exact_distribution(small_target):
    sampling = Sampling(temperature=1.0)
    counts = draw_pairs(small_target, Proposer(), sampling, samples=600)
    assert goodness_of_fit(counts, exact_pair_distribution(small_target, sampling)) > ALPHA


def test_sps_chain_with_q_draft_matches_the_exact_distribution(small_target, small_draft):
    sampling = Sampling(temperature=0.8, top_p=0.9)   # the draft's q is warped the same way
    proposer = SpSProposer(small_draft, k=2)
    counts = draw_pairs(small_target, proposer, sampling, samples=1000)
    assert goodness_of_fit(counts, exact_pair_distribution(small_target, sampling)) > ALPHA


def test_deterministic_tree_matches_the_exact_distribution(small_target):
    sampling = Sampling(temperature=1.2, top_p=0.9)   # some drafted siblings have p_target = 0
    counts = draw_pairs(small_target, FixedTree(), sampling, samples=800)
    assert goodness_of_fit(counts, exact_pair_distribution(small_target, sampling)) > ALPHA


def test_the_test_has_power_against_wrong_acceptance_rules(small_target, small_draft, monkeypatch):
    """The same statistic rejects (p < ALPHA) a loop that accepts every draft, and a subtler bug:
    resampling from p_target instead of the residual max(p_target - q_draft, 0) after a rejection."""
    exact = exact_pair_distribution(small_target, Sampling(temperature=1.0))
    with monkeypatch.context() as patch:
        patch.setitem(acceptance_module.RULES, "lossless", (accept_everything, False))   # the rule the loop picks
        counts = draw_pairs(small_target, FixedTree(), Sampling(temperature=1.0), samples=200)
    assert goodness_of_fit(counts, exact) < ALPHA
    with monkeypatch.context() as patch:
        patch.setattr(acceptance_module, "_residual", lambda p, q, token: p)
        counts = draw_pairs(small_target, SpSProposer(small_draft, k=2), Sampling(temperature=1.0), samples=400)
    assert goodness_of_fit(counts, exact) < ALPHA
