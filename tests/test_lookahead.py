"""Lookahead decoding: window mask and positions, the n-gram pool, the Jacobi window, losslessness."""

import random

import pytest
import torch

from baselines.lookahead import LookaheadProposer, NgramPool, window_layout
from harness.engine.acceptance import Sampling, greedy_accept
from harness.bench import build_method
from harness.engine.loop import DecodeContext, Proposer, Step, StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.engine.target import Target
from tests.conftest import compose_config, make_tiny_llama

REPETITIVE_PROMPT = [5, 6, 7, 8, 9, 10, 11, 12] * 4 + list(range(30, 50))


def test_pool_keeps_the_most_recent_guess_set_per_first_token():
    pool = NgramPool(capacity=2)
    pool.add(1, (2, 3))
    pool.add(1, (4, 5))
    pool.add(1, (2, 3))              # seen again: becomes the most recent
    pool.add(1, (6, 7))              # full: evicts the least recent, (4, 5)
    assert pool.get(1) == [(6, 7), (2, 3)] and pool.get(9) == [] and len(pool) == 2
    text = NgramPool(capacity=5)
    text.add_text([1, 2, 3, 1, 2, 4], n=3)
    assert text.get(1) == [(2, 4), (2, 3)] and text.get(2) == [(3, 1)] and text.get(3) == [(1, 2)]
    text.add_text([1, 2, 3, 1, 2, 4, 9], n=3, start=6)           # only the n-gram ending at the new token
    assert text.get(2) == [(4, 9), (3, 1)] and len(text) == 5


def test_window_layout_by_hand():
    # N = 3, W = 3: level 0 = root + 2 guesses (offsets 1, 2), level 1 = 3 tokens (offsets 1, 2, 3)
    visible, offsets = window_layout((2, 3))
    assert offsets.tolist() == [1, 2, 1, 2, 3]
    assert visible.int().tolist() == [[1, 0, 0, 0, 0],     # level 0 col 1: root + itself
                                      [1, 1, 0, 0, 0],     # level 0 col 2: root, col 1, itself
                                      [0, 0, 1, 0, 0],     # level 1 col 0: root + itself
                                      [1, 0, 0, 1, 0],     # level 1 col 1: root, level 0 col 1, itself
                                      [1, 1, 0, 0, 1]]     # level 1 col 2: root, level 0 cols 1-2, itself


def test_every_window_row_equals_a_sequential_run_of_its_diagonal(tiny_llama):
    """Each extra token's logits = the model run on the cache + root + the extras it sees, in position
    order; the draft nodes in the same forward are invisible to it."""
    target = Target(tiny_llama)
    prompt = list(range(10, 30))
    visible, offsets = window_layout((3, 4, 4))             # N = 4, W = 4
    extras = list(range(40, 40 + len(offsets)))
    draft_tokens, parents = [7, 8, 9], (-1, 0, -1)
    n, m = len(draft_tokens), len(extras)
    extra_mask = torch.zeros(m, 1 + n + m, dtype=torch.bool)
    extra_mask[:, 0] = True
    extra_mask[:, 1 + n:] = visible
    with torch.inference_mode():
        _, logits = target.prefill(prompt)
        root = int(logits.argmax())
        scores = target.verify(root, draft_tokens, parents, extras, extra_mask, offsets)
        for row in range(m):
            seen = sorted((j for j in range(m) if visible[row, j]), key=lambda j: int(offsets[j]))
            assert [int(offsets[j]) for j in seen] == list(range(1, int(offsets[row]) + 1))
            sequential = tiny_llama(torch.tensor([prompt + [root] + [extras[j] for j in seen]])).logits[0, -1]
            torch.testing.assert_close(scores.logits[1 + n + row], sequential, atol=1e-4, rtol=1e-4)
        # and the draft rows are untouched by the extras
        sequential = tiny_llama(torch.tensor([prompt + [root, 7, 8]])).logits[0, -1]
        torch.testing.assert_close(scores.logits[2], sequential, atol=1e-4, rtol=1e-4)


def _context(tokens, prompt_len, remaining=100):
    return DecodeContext(list(tokens), prompt_len, None, torch.zeros(1, 1), torch.zeros(1), remaining, Sampling())


def test_window_warms_up_then_harvests_columns_and_slides():
    proposer = LookaheadProposer(level=3, window=2, guess_set_size=4)
    ctx = _context([1, 2, 3, 4, 5], prompt_len=4)
    proposer.reset(ctx)
    assert [len(level) for level in proposer.levels] == [2]          # W + N - 3 prompt tokens
    draft = proposer.propose(ctx)
    assert draft.tokens == [] and draft.extra_offsets.tolist() == [1, 2]
    proposer._advance([20, 21])                                       # warm-up: level 1 appears
    assert proposer.levels == [[proposer.levels[0][0]], [20, 21]]
    first = proposer.levels[0][0]
    proposer.root = 7
    proposer._advance([30, 31])                                       # full: harvest, then slide
    # columns: (root 7, 20, 30) and (level-0 token, 21, 31)
    assert proposer.pool.get(7) == [(20, 30)] and proposer.pool.get(first) == [(21, 31)]
    assert proposer.levels == [[21], [30, 31]]
    draft = proposer.propose(_context([1, 2, 3, 4, 5, 7], prompt_len=4))   # the root 7 has a pooled n-gram
    assert draft.tokens == [20, 30] and draft.parents == (-1, 0)
    assert draft.extra_tokens == [21, 30, 31] and draft.extra_offsets.tolist() == [1, 1, 2]
    assert draft.extra_mask[:, 1:3].sum() == 0                        # the window never sees the draft
    draft = proposer.propose(_context([1, 2, 3, 4, 5, 7], prompt_len=4, remaining=2))
    assert draft.tokens == [20]                                       # never draft past the token cap


def test_window_can_ride_only_on_steps_that_verify_a_draft():
    proposer = LookaheadProposer(level=3, window=2, guess_set_size=2, window_with_draft_only=True)
    ctx = _context([1, 2, 3, 4, 5], prompt_len=4)
    proposer.reset(ctx)
    empty = proposer.propose(ctx)
    assert empty.tokens == [] and not empty.extra_tokens          # nothing pooled for 5: a plain step
    proposer.pool.add(5, (6, 7))
    draft = proposer.propose(ctx)
    assert draft.tokens == [6, 7] and len(draft.extra_tokens) == 2


def _turn(model, proposer, prompt=REPETITIVE_PROMPT, tokens=48, sampling=None, generator=None):
    return decode_turn(Target(model), proposer, prompt, sampling or Sampling(),
                       StopCriteria(frozenset(), max_new_tokens=tokens), generator)


@pytest.mark.parametrize("options", [dict(level=5, window=7, guess_set_size=7),
                                     dict(level=4, window=5, guess_set_size=5, pool_from_prompt=True),
                                     dict(level=3, window=4, guess_set_size=4),
                                     dict(level=4, window=3, guess_set_size=3, pool_from_prompt=True,
                                          window_with_draft_only=True)])
def test_greedy_lookahead_is_lossless(tiny_llama, options):
    reference = _turn(tiny_llama, Proposer())
    result = _turn(tiny_llama, LookaheadProposer(**options))
    assert result.token_ids == reference.token_ids
    if options["level"] >= 4:                                         # the Jacobi/prompt n-grams hit the loop
        assert result.new_tokens / result.steps > 1.3


def test_an_empty_pool_drafts_nothing(tiny_llama):
    result = _turn(tiny_llama, LookaheadProposer(level=3, window=2, guess_set_size=2), prompt=list(range(60, 90)),
                   tokens=6)
    assert result.draft_sizes[:3] == [0, 0, 0]                        # prefill, then two warm-up steps


def test_sampling_runs_through_the_loop():
    model = make_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)                                # near-deterministic: text repeats
    sampling = Sampling(temperature=0.7)
    result = _turn(model, LookaheadProposer(level=4, window=5, guess_set_size=5, pool_from_prompt=True),
                   sampling=sampling, generator=torch.Generator().manual_seed(1))
    again = _turn(model, LookaheadProposer(level=4, window=5, guess_set_size=5, pool_from_prompt=True),
                  sampling=sampling, generator=torch.Generator().manual_seed(1))
    assert result.new_tokens == 48 and result.token_ids == again.token_ids
    assert sum(result.draft_sizes) > 0 and result.steps < 48


def test_configs_build_the_official_defaults_and_the_cpu_preset():
    official = build_method(compose_config("method=lookahead").method)
    assert isinstance(official, LookaheadProposer) and official.name == "lookahead"
    assert (official.level, official.window, official.guess_set_size, official.max_emit) == (5, 15, 15, "n")
    cpu = build_method(compose_config("method=lookahead_cpu").method)
    assert cpu.name == "lookahead_cpu" and cpu.level * cpu.window < 5 * 15
    specbench = build_method(compose_config("method=lookahead_specbench").method)
    assert specbench.name == "lookahead_specbench" and not specbench.pool_from_prompt
    assert (specbench.level, specbench.window, specbench.guess_set_size, specbench.max_emit) == (5, 7, 7, "n_minus_1")
    with pytest.raises(HarnessError, match="level"):
        build_method(compose_config("method=lookahead", "method.level=2").method)
    with pytest.raises(HarnessError, match="max_emit"):
        build_method(compose_config("method=lookahead", "method.max_emit=all").method)


def lade_hits(first_guess: int, guesses: list[tuple[int, ...]], predict) -> list[int]:
    """The tokens one official lade step appends (lade/decoding.py jacobi_greedy_search_multilevel, copied in
    Spec-Bench): `correct` = the target's token at each guess position; `gg` from the loop below stops at
    N-2 even when all N-1 guess tokens match; the step appends hits[:max_hit + 1]."""
    max_hit, hits = 0, [first_guess]
    for myguess in guesses:
        correct = [first_guess] + [predict(myguess[:k + 1]) for k in range(len(myguess))]
        gg = 0
        for gg in range(len(myguess)):
            if myguess[gg] != correct[gg]:
                break
        if gg > max_hit:
            max_hit = gg
            hits = correct[:max_hit + 1]
    return hits


def test_the_n_minus_1_cap_emits_what_official_lade_emits():
    """max_emit=n_minus_1: each pooled n-gram (the root's N-1 followers) is drafted as its first N-2 tokens,
    so a step accepts at most N-2 draft tokens + the bonus = N-1 new tokens, token for token lade's hits;
    max_emit=n may accept all N-1 + the bonus."""
    rng = random.Random(0)
    vocab, level = 3, 5
    longest_uncapped = 0
    for trial in range(300):
        table = {}

        def predict(path: tuple[int, ...]) -> int:        # a deterministic greedy target: continuation -> token
            return table.setdefault(path, rng.randrange(vocab))

        proposer = LookaheadProposer(level=level, window=2, guess_set_size=4, max_emit="n_minus_1")
        ctx = _context([1, 2, 3, 4, 9], prompt_len=4)
        proposer.reset(ctx)
        guesses = list({tuple(rng.randrange(vocab) for _ in range(level - 1)) for _ in range(rng.randrange(1, 5))})
        for guess in guesses:
            proposer.pool.add(9, guess)
        draft = proposer.propose(ctx)
        assert max(len(path) for path in _paths(draft)) == level - 2
        ours = greedy_accept(draft.parents, draft.tokens, _greedy_logits(draft, predict, vocab))
        assert ours.tokens == lade_hits(predict(()), proposer.pool.get(9), predict), trial
        assert len(ours.tokens) <= level - 1
        full = LookaheadProposer(level=level, window=2, guess_set_size=4)
        full.reset(ctx)
        for guess in guesses:
            full.pool.add(9, guess)
        uncapped = full.propose(ctx)
        assert max(len(path) for path in _paths(uncapped)) == level - 1
        longest_uncapped = max(longest_uncapped, len(greedy_accept(uncapped.parents, uncapped.tokens,
                                                                   _greedy_logits(uncapped, predict, vocab)).tokens))
    assert longest_uncapped == level             # some trials matched a whole n-gram: there lade drops the bonus


def _greedy_logits(draft, predict, vocab: int) -> torch.Tensor:
    """One-hot verify logits [1 + n, vocab] of the target `predict` (continuation -> its next token)."""
    logits = torch.zeros(1 + len(draft.tokens), vocab)
    logits[0, predict(())] = 1.0
    for node, path in enumerate(_paths(draft)):
        logits[1 + node, predict(path)] = 1.0
    return logits


def _paths(draft) -> list[tuple[int, ...]]:
    """Each draft node's tokens from the root down."""
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(draft.tokens, draft.parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (token,))
    return paths


@pytest.mark.parametrize("options", [dict(level=5, window=7, guess_set_size=7),          # lookahead_specbench
                                     dict(level=4, window=5, guess_set_size=5, pool_from_prompt=True)])
def test_the_n_minus_1_cap_holds_in_the_loop_and_stays_lossless(tiny_llama, options):
    reference = _turn(tiny_llama, Proposer())
    capped = _turn(tiny_llama, LookaheadProposer(max_emit="n_minus_1", **options))
    uncapped = _turn(tiny_llama, LookaheadProposer(max_emit="n", **options))
    n = options["level"]
    assert capped.token_ids == reference.token_ids == uncapped.token_ids
    assert max(capped.accepted_lengths) == n - 1 and len(capped.pos_attempted) == n - 2   # drafts N-2 deep
    assert max(uncapped.accepted_lengths) == n                                           # the cap bites here


def test_observe_reads_the_last_level_from_the_tail_of_the_verify_logits():
    proposer = LookaheadProposer(level=3, window=2, guess_set_size=2)
    ctx = _context([1, 2, 3, 4, 5], prompt_len=4)
    proposer.reset(ctx)
    draft = proposer.propose(ctx)
    vocab = 50
    logits = torch.zeros(1 + len(draft.extra_tokens), vocab)
    logits[-2, 11] = logits[-1, 12] = 1.0                             # the level-0 rows predict 11, 12
    from harness.engine.target import Scores
    ctx.scores = Scores(logits, torch.zeros(len(logits), 1))
    proposer.observe(Step(draft, None, [6]), ctx)
    assert proposer.levels[-1] == [11, 12]
