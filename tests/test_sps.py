"""SpS (draft-model speculative decoding) on tiny random Llamas: lossless, draft cache in sync, adaptive k."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from baselines.sps import SpSProposer, check_same_vocabulary
from harness.engine.acceptance import Sampling
from harness.bench import build_method
from harness.engine.loop import DecodeContext, Proposer, StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.engine.target import Target
from tests.conftest import compose_config, make_tiny_llama

PROMPT = list(range(5, 40))
NEW_TOKENS = 48


def vanilla(model, prompt=PROMPT, new_tokens=NEW_TOKENS) -> list[int]:
    return decode_turn(Target(model), Proposer(), prompt, Sampling(), StopCriteria(frozenset(), max_new_tokens=new_tokens)).token_ids


def run(model, proposer, prompt=PROMPT, new_tokens=NEW_TOKENS):
    return decode_turn(Target(model), proposer, prompt, Sampling(), StopCriteria(frozenset(), max_new_tokens=new_tokens))


@pytest.fixture(scope="module")
def near_copy_draft(tiny_llama):
    """The target with noise on its lm_head: agrees with the target often, not always, so drafts are
    partly accepted and the draft cache has to be cropped after rejections."""
    draft = copy.deepcopy(tiny_llama)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        weight = draft.lm_head.weight
        weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * 0.6)
    return draft


def test_target_as_its_own_draft_accepts_every_token(tiny_llama):
    result = run(tiny_llama, SpSProposer(tiny_llama, k=4))
    assert result.token_ids == vanilla(tiny_llama)
    # prefill gives 1 token, then every step emits k + 1 (4 drafts + bonus) until the cap
    assert result.accepted_lengths[:-1] == [1] + [5] * ((NEW_TOKENS - 1) // 5)
    assert result.pos_accepted == result.pos_attempted


def test_a_partly_wrong_draft_is_lossless_and_keeps_its_cache_in_sync(tiny_llama, near_copy_draft):
    proposer = SpSProposer(near_copy_draft, k=4)
    result = run(tiny_llama, proposer)
    assert result.token_ids == vanilla(tiny_llama)
    steps = result.accepted_lengths[1:]
    assert min(steps) < 5 and max(steps) > 1, "the test needs both rejections and acceptances"
    committed = PROMPT + result.token_ids
    cached = proposer.cached_tokens
    assert cached == committed[: len(cached)] and proposer.cache.get_seq_length() == len(cached)
    # every cached key equals a fresh forward over the same tokens: crops and feeds kept it exact
    with torch.inference_mode():
        fresh = near_copy_draft(torch.tensor([cached]), use_cache=True).cache
    for ours, reference in zip(proposer.cache.layers, fresh.layers):
        torch.testing.assert_close(ours.keys, reference.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.values, reference.values, atol=1e-5, rtol=1e-4)


def test_a_different_random_model_as_draft_is_lossless(tiny_llama):
    draft = make_tiny_llama(seed=7, layers=1)
    assert run(tiny_llama, SpSProposer(draft, k=3)).token_ids == vanilla(tiny_llama)


def test_adaptive_k_grows_on_full_acceptance_and_shrinks_on_rejection(tiny_llama):
    grown = run(tiny_llama, SpSProposer(tiny_llama, k=2, adaptive_k=True, k_max=8), new_tokens=60)
    assert grown.draft_sizes[1:4] == [2, 4, 6] and max(grown.draft_sizes) == 8
    shrunk = run(tiny_llama, SpSProposer(make_tiny_llama(seed=7, layers=1), k=4, adaptive_k=True), new_tokens=30)
    assert shrunk.draft_sizes[1] == 4 and shrunk.draft_sizes[-2] == 1   # the last step drafts 0: 1 token left
    assert shrunk.token_ids == vanilla(tiny_llama, new_tokens=30)


def test_sampling_mode_sends_the_warped_draft_distribution(tiny_llama, near_copy_draft):
    proposer = SpSProposer(near_copy_draft, k=3)
    target = Target(tiny_llama)
    sampling = Sampling(temperature=0.7, top_p=0.8)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        hidden, logits = target.prefill(PROMPT)
        ctx = DecodeContext(PROMPT + [int(logits.argmax())], len(PROMPT), target, hidden, logits, 10, sampling, generator)
        proposer.reset(ctx)
        draft = proposer.propose(ctx)
        assert draft.q_draft.shape == (3, tiny_llama.config.vocab_size)
        torch.testing.assert_close(draft.q_draft.sum(-1), torch.ones(3))
        assert all(draft.q_draft[i, token] > 0 for i, token in enumerate(draft.tokens))
        reference = near_copy_draft(torch.tensor([ctx.tokens + draft.tokens[:-1]])).logits[0, -3:]
        from harness.engine.acceptance import target_probs

        torch.testing.assert_close(draft.q_draft, target_probs(reference, sampling), atol=1e-5, rtol=1e-4)


def test_vocabulary_mismatch_is_one_clear_error():
    same = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1})
    other = SimpleNamespace(get_vocab=lambda: {"a": 0, "c": 1})
    check_same_vocabulary(same, SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1}), "x")
    with pytest.raises(HarnessError, match="different tokenizer vocabulary"):
        check_same_vocabulary(same, other, "x")


def test_config_builds_the_proposer_and_a_bad_draft_name_fails_clearly(tiny_llama):
    proposer = build_method(compose_config("method=sps", "method.k=3", "method.draft_model=no-such-model").method)
    assert isinstance(proposer, SpSProposer) and proposer.length.k == 3 and proposer.name == "sps"
    loaded = SimpleNamespace(name="smollm2-135m", model=tiny_llama, tokenizer=None, device=torch.device("cpu"))
    with pytest.raises(HarnessError, match="unknown model 'no-such-model'"):
        proposer.setup(loaded)
