"""The loop's core on a tiny random Llama: tree attention, KV compaction, vanilla == transformers."""

import torch

from harness.engine.acceptance import Sampling, greedy_accept
from harness.engine.loop import Draft, Proposer, StopCriteria, decode_turn
from harness.engine.target import Target
from harness.engine.tree import children_of, depths_of, verify_layout


def test_vanilla_loop_matches_transformers_generate(tiny_llama):
    prompt = list(range(5, 30))
    result = decode_turn(Target(tiny_llama), Proposer(), prompt, Sampling(),
                         StopCriteria(frozenset(), max_new_tokens=48))
    expected = tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert result.token_ids == expected
    assert result.accepted_lengths == [1] * 48 and result.steps == 48


def test_tree_verify_equals_sequential_runs_and_compaction_keeps_the_path(tiny_llama):
    target = Target(tiny_llama)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    with torch.inference_mode():
        _, logits = target.prefill(prompt)
        root = int(logits.argmax())
        parents = (-1, -1, 0, 0, 1, 2)          # two branches from the root, depth 3
        tokens = [7, 9, 11, 13, 15, 17]
        past = target.past
        scores = target.verify(root, tokens, parents)
        for node in range(len(tokens)):
            path, walk = [], node
            while walk >= 0:
                path.insert(0, tokens[walk])
                walk = parents[walk]
            sequential = tiny_llama(torch.tensor([prompt + [root] + path])).logits[0, -1]
            torch.testing.assert_close(scores.logits[node + 1], sequential, atol=1e-4, rtol=1e-4)
        target.commit(past, [0, 1, 3])          # root -> 7 -> 11
        assert target.past == len(prompt) + 3
        after = target.verify(17, [], ())
        sequential = tiny_llama(torch.tensor([prompt + [root, 7, 11, 17]])).logits[0, -1]
        torch.testing.assert_close(after.logits[0], sequential, atol=1e-4, rtol=1e-4)


def test_layout_positions_and_mask():
    parents = (-1, 0, -1, 2)
    mask, positions = verify_layout(parents, past=10)
    assert positions.tolist() == [[10, 11, 12, 11, 12]]
    visible = mask[0, 0, :, 10:] == 0
    assert visible.tolist() == [[True, False, False, False, False],
                                [True, True, False, False, False],
                                [True, True, True, False, False],
                                [True, False, False, True, False],
                                [True, False, False, True, True]]
    assert (mask[0, 0, :, :10] == 0).all()
    chain_mask, chain_positions = verify_layout((-1, 0, 1), past=4)
    assert chain_mask is None and chain_positions.tolist() == [[4, 5, 6, 7]]
    assert depths_of(parents) == (0, 1, 2, 1, 2)
    assert children_of(parents) == [[1, 3], [2], [], [4], []]


def test_greedy_accept_takes_longest_matching_branch():
    vocab = 10
    parents = (-1, -1, 0, 1)                  # root -> a(5) -> c(7);  root -> b(6) -> d(8)
    tokens = [5, 6, 7, 8]
    logits = torch.full((5, vocab), -10.0)
    logits[0, 6] = 5                          # target wants b after root
    logits[2, 8] = 5                          # then d after b
    logits[4, 2] = 5                          # bonus after d
    logits[1, 7] = 5
    result = greedy_accept(parents, tokens, logits)
    assert result.path == [0, 2, 4] and result.tokens == [6, 8, 2] and result.accepted_draft == 2


class _FixedDraft(Proposer):
    """Drafts a fixed tree so the test controls what the loop must verify and compact."""

    def __init__(self, guesses):
        self.guesses = guesses

    def propose(self, ctx):
        tokens = [self.guesses.get(len(ctx.tokens), 1), 2, 3]
        return Draft(tokens, (-1, 0, -1))


def test_stop_token_inside_an_accepted_draft_ends_the_turn(tiny_llama):
    prompt = list(range(40, 60))
    reference = decode_turn(Target(tiny_llama), Proposer(), prompt, Sampling(),
                            StopCriteria(frozenset(), max_new_tokens=30)).token_ids
    stop_token = reference[6]
    cut = reference[: reference.index(stop_token) + 1]
    result = decode_turn(Target(tiny_llama), Proposer(), prompt, Sampling(),
                         StopCriteria(frozenset({stop_token}), max_new_tokens=30))
    assert result.token_ids == cut and result.stop_reason == "eos"


def test_a_random_tree_proposer_is_lossless(tiny_llama):
    prompt = list(range(100, 120))
    reference = decode_turn(Target(tiny_llama), Proposer(), prompt, Sampling(),
                            StopCriteria(frozenset(), max_new_tokens=40)).token_ids
    # guesses keyed by context length: right token half the time, so some drafts are accepted
    guesses = {len(prompt) + i + 1: (tok if i % 2 else 0) for i, tok in enumerate(reference)}
    result = decode_turn(Target(tiny_llama), _FixedDraft(guesses), prompt, Sampling(),
                         StopCriteria(frozenset(), max_new_tokens=40))
    assert result.token_ids == reference
    assert sum(result.accepted_lengths) == 40 and max(result.accepted_lengths) >= 2
