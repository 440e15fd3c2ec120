"""Prompt lookup decoding: the n-gram index, parity with transformers' prompt lookup, losslessness."""

import random
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from baselines.hf_generate import HFGenerate
from baselines.pld import NgramIndex, PromptLookupProposer
from harness.engine.acceptance import Sampling
from harness.bench import build_method
from harness.engine.loop import Proposer, StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.engine.target import Target
from harness.engine.tree import trie
from tests.conftest import compose_config, make_tiny_llama

# the tiny random model falls into a loop after this prompt, and the loop's text repeats: drafts get accepted
REPETITIVE_PROMPT = [5, 6, 7, 8, 9, 10, 11, 12] * 4 + list(range(30, 50))


def indexed(tokens, **options):
    proposer = PromptLookupProposer(**options)
    proposer.index.extend(tokens)
    return proposer


def test_index_records_the_position_after_each_ngram_incrementally():
    index = NgramIndex(1, 2)
    index.extend([7, 8, 9, 7, 8])
    assert index.tables[2] == {(7, 8): [2], (8, 9): [3], (9, 7): [4]}
    assert index.tables[1] == {(7,): [1, 4], (8,): [2], (9,): [3]}
    # the text's last n-gram is (7, 8); its own occurrence at the end has no follower, so only position 2
    assert index.continuations(2) == [2] and index.continuations(1) == [2]
    index.sync([7, 8, 9, 7, 8, 5])
    assert index.tables[2][(7, 8)] == [2, 5] and index.tables[1][(8,)] == [2, 5]
    assert index.continuations(2) == [] and index.continuations(1) == []
    index.sync([7, 8, 9, 7, 8, 5])                    # nothing new: unchanged
    assert index.tokens == [7, 8, 9, 7, 8, 5]


def test_candidates_take_the_longest_ngram_and_the_leftmost_match():
    text = [1, 2, 3, 1, 2, 4, 1, 2, 5, 9, 1, 2]
    assert indexed(text).candidates(10) == [[3, 1, 2, 4, 1, 2, 5, 9, 1, 2]]
    assert indexed(text).candidates(2) == [[3, 1]]
    assert indexed(text, match="last").candidates(2) == [[5, 9]]
    # several matches: distinct continuations, longest n-gram first; n = 1 finds the same three again
    assert indexed(text, max_matches=5).candidates(2) == [[3, 1], [4, 1], [5, 9]]
    # a continuation that is a prefix of another adds no tree node: [4, 4] and [4] fold into [4, 4, 4]
    assert indexed([4, 4, 4, 4], max_matches=3).candidates(3) == [[4, 4, 4]]
    assert indexed([1, 2, 3]).candidates(10) == []                        # nothing repeats: vanilla step


def test_a_draft_ends_at_a_stop_token():
    proposer = indexed([1, 2, 3, 4, 5, 1, 2])
    proposer.setup(SimpleNamespace(template=SimpleNamespace(stop_token_ids=[4])))
    assert proposer.candidates(10) == [[3, 4]]


def test_trie_shares_prefixes():
    tokens, parents = trie([[1, 2, 3], [1, 2, 4], [1, 5], [6]])
    assert tokens == [1, 2, 3, 4, 5, 6] and parents == (-1, 0, 1, 1, 0, -1)
    assert trie([]) == ([], ())


def test_drafts_equal_transformers_prompt_lookup_on_random_texts():
    generator = PromptLookupCandidateGenerator(num_output_tokens=10, max_matching_ngram_size=2, max_length=10**6)
    rng = random.Random(0)
    for _ in range(200):
        text = [rng.randrange(6) for _ in range(rng.randrange(2, 60))]
        theirs, _ = generator.get_candidates(torch.tensor([text]))
        ours = indexed(text).candidates(10)
        assert (ours[0] if ours else []) == theirs[0, len(text):].tolist(), text


def specbench_candidate(text: list[int], max_ngram_size: int = 3, num_pred_tokens: int = 10) -> list[int]:
    """Spec-Bench model/pld/pld.py find_candidate_pred_tokens (the PLD repo's), rewritten on lists: n from
    max_ngram_size down to 1, occurrences left to right, the first with a full continuation wins."""
    length = len(text)
    for n in range(max_ngram_size, 0, -1):
        ngram = text[-n:]
        for idx in range(length - n + 1):
            if text[idx:idx + n] == ngram:
                start, end = idx + n, idx + n + num_pred_tokens
                if end <= length and start < length - n:
                    return text[start:end]
    return []


def test_the_full_continuation_rule_drafts_what_specbench_drafts_on_random_texts():
    rng = random.Random(1)
    drafted = 0
    for _ in range(300):
        text = [rng.randrange(4) for _ in range(rng.randrange(4, 70))]
        ours = indexed(text, max_ngram_size=3, require_full_continuation=True).candidates(10)
        assert (ours[0] if ours else []) == specbench_candidate(text), text
        assert not ours or len(ours[0]) == 10                  # never a shorter continuation
        drafted += bool(ours)
    assert drafted > 100
    # the rule: (1, 2) last occurred 3 tokens before the end; transformers drafts those 3, the rule looks further
    # back (the leftmost (1, 2) with 10 tokens after it), then to smaller n, then gives up
    text = [1, 2] + list(range(10, 20)) + [1, 2, 7, 8, 9, 1, 2]
    assert indexed(text, max_ngram_size=3, match="last").candidates(10) == [[7, 8, 9, 1, 2]]
    assert indexed(text, max_ngram_size=3, match="last", require_full_continuation=True).candidates(10) == \
        [list(range(10, 20))]
    short = [5, 6, 7, 1, 2, 3, 4, 1, 2]
    assert indexed(short).candidates(10) == [[3, 4, 1, 2]]
    assert indexed(short, require_full_continuation=True).candidates(10) == []
    assert indexed(short, require_full_continuation=True).candidates(2) == []   # judged on num_pred_tokens, not the budget


def test_specbench_pld_is_lossless_and_drafts_only_full_continuations(tiny_llama):
    reference = _turn(tiny_llama, Proposer(), tokens=64)
    proposer = build_method(compose_config("method=pld_specbench").method)
    assert proposer.name == "pld_specbench" and proposer.require_full_continuation
    assert (proposer.max_ngram_size, proposer.min_ngram_size, proposer.num_pred_tokens) == (3, 1, 10)
    result = _turn(tiny_llama, proposer, tokens=64)
    assert result.token_ids == reference.token_ids
    emitted = 1
    for accepted, drafted in zip(result.accepted_lengths[1:], result.draft_sizes[1:]):
        assert drafted in (0, 10) or drafted == 64 - emitted - 1   # 10 tokens, or the budget at the turn's end
        emitted += accepted
    assert result.new_tokens / result.steps > 1.5


def _turn(model, proposer, prompt=REPETITIVE_PROMPT, tokens=48, sampling=None, generator=None):
    return decode_turn(Target(model), proposer, prompt, sampling or Sampling(),
                       StopCriteria(frozenset(), max_new_tokens=tokens), generator)


def test_greedy_pld_is_lossless_and_takes_transformers_steps(tiny_llama):
    reference = _turn(tiny_llama, Proposer())
    result = _turn(tiny_llama, PromptLookupProposer())
    assert result.token_ids == reference.token_ids
    assert result.new_tokens / result.steps > 1.5           # the loop repeats: most drafts are accepted
    # transformers' own prompt lookup, same defaults: the same drafts, so the same accepted lengths
    runner = HFGenerate(prompt_lookup_num_tokens=10)
    runner.loaded = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0))
    theirs = runner.generate_turn(Target(tiny_llama), REPETITIVE_PROMPT, Sampling(),
                                  StopCriteria(frozenset(), max_new_tokens=48), None)
    assert theirs.token_ids == reference.token_ids and theirs.accepted_lengths == result.accepted_lengths


@pytest.mark.parametrize("options", [dict(max_matches=4, max_ngram_size=3, match="last"),
                                     dict(max_matches=3, min_ngram_size=2, num_pred_tokens=4)])
def test_tree_pld_is_lossless(tiny_llama, options):
    prompt = list(range(60, 100)) + list(range(60, 70))
    reference = _turn(tiny_llama, Proposer(), prompt)
    proposer = PromptLookupProposer(**options)
    result = _turn(tiny_llama, proposer, prompt)
    assert result.token_ids == reference.token_ids
    assert result.steps < reference.steps and max(result.draft_sizes) <= options.get("num_pred_tokens", 10) * \
        options["max_matches"]


def test_drafts_never_exceed_the_tokens_left(tiny_llama):
    result = _turn(tiny_llama, PromptLookupProposer(num_pred_tokens=50), tokens=20)
    emitted = 0
    for accepted, drafted in zip(result.accepted_lengths, result.draft_sizes):
        assert drafted <= 20 - emitted - 1
        emitted += accepted
    assert result.new_tokens == 20 and result.steps < 20


@pytest.fixture(scope="module")
def sharp_llama():
    """The tiny random Llama with near-deterministic logits, so sampled text repeats and lookups pay off."""
    model = make_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


def test_sampling_runs_through_the_loop_and_is_reproducible(sharp_llama):
    sampling = Sampling(temperature=0.7)
    first = _turn(sharp_llama, PromptLookupProposer(), tokens=48, sampling=sampling,
                  generator=torch.Generator().manual_seed(1))
    again = _turn(sharp_llama, PromptLookupProposer(), tokens=48, sampling=sampling,
                  generator=torch.Generator().manual_seed(1))
    assert first.new_tokens == 48 and first.token_ids == again.token_ids
    # one-hot q: a draft token is accepted with probability p_target(token); some are
    assert sum(first.draft_sizes) > 0 and first.steps < 48


def test_config_builds_the_transformers_defaults():
    proposer = build_method(compose_config("method=pld").method)
    assert isinstance(proposer, PromptLookupProposer) and proposer.name == "pld"
    assert (proposer.max_ngram_size, proposer.min_ngram_size, proposer.num_pred_tokens) == (2, 1, 10)
    assert proposer.max_matches == 1 and proposer.match == "first"
    with pytest.raises(HarnessError, match="min_ngram_size"):
        build_method(compose_config("method=pld", "method.min_ngram_size=4").method)
