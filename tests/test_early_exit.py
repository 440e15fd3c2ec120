"""Early-exit self-speculation on a tiny random Llama: lossless, the draft is exactly the target cut
after L layers, and the shared KV cache comes back untouched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from baselines.early_exit import EarlyExitProposer
from harness.engine.acceptance import Sampling, target_probs
from harness.bench import build_method
from harness.engine.loop import DecodeContext, Proposer, StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.engine.target import Target
from tests.conftest import compose_config, make_tiny_llama

PROMPT = list(range(5, 40))
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def four_layers():
    return make_tiny_llama(seed=2, layers=4)


def truncated(model, exit_layer: int) -> LlamaForCausalLM:
    """The same weights with only the first `exit_layer` decoder layers: what the draft must equal."""
    config = model.config.__class__(**model.config.to_dict())
    config.num_hidden_layers = exit_layer
    short = LlamaForCausalLM(config).eval()
    short.load_state_dict(model.state_dict(), strict=False)
    return short


def run(model, proposer, new_tokens=NEW_TOKENS, sampling=None, generator=None):
    return decode_turn(Target(model), proposer, PROMPT, sampling or Sampling(),
                       StopCriteria(frozenset(), max_new_tokens=new_tokens), generator)


@pytest.mark.parametrize("exit_layer,k,min_confidence,adaptive_k", [(1, 4, 0.0, False), (3, 4, 0.0, False),
                                                                    (2, 6, 0.0, True), (3, 5, 0.1, False)])
def test_greedy_is_token_identical_to_vanilla(four_layers, exit_layer, k, min_confidence, adaptive_k):
    reference = run(four_layers, Proposer()).token_ids
    result = run(four_layers, EarlyExitProposer(exit_layer, k, min_confidence, adaptive_k))
    assert result.token_ids == reference
    assert max(result.accepted_lengths) > 1, "some drafts must be accepted, or the commit path goes untested"


def test_draft_equals_the_truncated_model_and_the_cache_is_restored(four_layers):
    exit_layer, k = 2, 5
    proposer = EarlyExitProposer(exit_layer, k, adaptive_k=False)
    target = Target(four_layers)
    with torch.inference_mode():
        hidden, logits = target.prefill(PROMPT)
        ctx = DecodeContext(PROMPT + [int(logits.argmax())], len(PROMPT), target, hidden, logits, 100, Sampling())
        before = [(layer.keys.clone(), layer.values.clone()) for layer in target.cache.layers]
        proposer.reset(ctx)
        draft = proposer.propose(ctx)
        expected = truncated(four_layers, exit_layer).generate(
            torch.tensor([ctx.tokens]), max_new_tokens=k, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert draft.tokens == expected[0, len(ctx.tokens):].tolist()
        assert draft.parents == (-1, 0, 1, 2, 3) and draft.q_draft is None
        for layer, (keys, values) in zip(target.cache.layers, before):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_sampling_drafts_carry_the_truncated_models_warped_distribution(four_layers):
    exit_layer = 3
    proposer = EarlyExitProposer(exit_layer, k=3, adaptive_k=False)
    target = Target(four_layers)
    sampling = Sampling(temperature=0.8, top_p=0.9)
    with torch.inference_mode():
        hidden, logits = target.prefill(PROMPT)
        ctx = DecodeContext(PROMPT + [int(logits.argmax())], len(PROMPT), target, hidden, logits, 100, sampling,
                            torch.Generator().manual_seed(0))
        proposer.reset(ctx)
        draft = proposer.propose(ctx)
        reference = truncated(four_layers, exit_layer)(torch.tensor([ctx.tokens + draft.tokens[:-1]])).logits[0, -3:]
        torch.testing.assert_close(draft.q_draft, target_probs(reference, sampling), atol=1e-5, rtol=1e-4)
        assert target.past == len(PROMPT)


def test_sampling_runs_the_whole_turn(four_layers):
    result = run(four_layers, EarlyExitProposer(2, 4), 40, Sampling(temperature=0.9), torch.Generator().manual_seed(1))
    assert result.new_tokens == 40 and sum(result.accepted_lengths) == 40


def test_adaptive_k_and_the_confidence_stop_shorten_drafts(four_layers):
    shrunk = run(four_layers, EarlyExitProposer(1, 6, adaptive_k=True))
    assert shrunk.draft_sizes[1] == 6 and shrunk.draft_sizes[-2] == 1   # the last step drafts 0: 1 token left
    never_sure = run(four_layers, EarlyExitProposer(2, 4, min_confidence=1.01, adaptive_k=False))
    assert set(never_sure.draft_sizes) == {0} and never_sure.accepted_lengths == [1] * NEW_TOKENS


def test_bad_exit_layers_fail_with_one_line(four_layers):
    with pytest.raises(HarnessError, match="below the model's 4 layers"):
        EarlyExitProposer(4, 2).setup(SimpleNamespace(model=four_layers))
    with pytest.raises(HarnessError, match="exit_layer=0"):
        EarlyExitProposer(0, 2)
    proposer = build_method(compose_config("method=early_exit", "method.exit_layer=2").method)
    assert isinstance(proposer, EarlyExitProposer) and proposer.exit_layer == 2 and proposer.name == "early_exit"


def test_target_prefix_step_is_the_truncated_model_and_rollback_restores_the_cache(four_layers):
    target = Target(four_layers)
    assert target.num_layers == 4 and target.vocab_size == four_layers.lm_head.weight.shape[0] == 256
    layers = 2
    with torch.inference_mode():
        _, logits = target.prefill(PROMPT)
        past = target.past
        before = [(layer.keys.clone(), layer.values.clone()) for layer in target.cache.layers]
        tokens = [int(logits.argmax()), 7, 9]
        steps = [target.prefix_step(token, past + i, layers) for i, token in enumerate(tokens)]
        reference = truncated(four_layers, layers)(torch.tensor([PROMPT + tokens])).logits[0, -len(tokens):]
        torch.testing.assert_close(torch.stack(steps), reference, atol=1e-5, rtol=1e-4)
        # only the first `layers` layers grew, by one entry per step
        assert [layer.keys.shape[-2] for layer in target.cache.layers] == [past + 3] * 2 + [past] * 2
        target.rollback_prefix(past, layers)
        for layer, (keys, values) in zip(target.cache.layers, before):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert target.past == past


def test_a_prefix_forward_needs_a_llama_style_decoder():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).eval()
    with pytest.raises(HarnessError, match="not a Llama-style decoder.*method=sps or method=pld") as error:
        EarlyExitProposer(1, 2).setup(SimpleNamespace(model=gpt2))
    assert "\n" not in str(error.value)
    assert Target(gpt2).vocab_size == 32
