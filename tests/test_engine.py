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


# -- the shared tree builders (harness/engine/tree.py) against the trees the methods built themselves before

# what baselines.medusa.choice_tree(MC_SIM_7B_63, 4) and baselines.eagle.static_tree(EAGLE_TREE_25) returned
MEDUSA_63_PARENTS = (-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1,
                     2, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 12, 12,
                     13, 14, 15, 16, 17, 20, 20, 27, 38, 38)
MEDUSA_63_HEADS = [0] * 10 + [1] * 28 + [2] * 23 + [3] * 2
MEDUSA_63_RANKS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1,
                   0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1]
EAGLE_25 = ((-1, -1, -1, -1, 0, 0, 0, 1, 1, 2, 2, 3, 4, 4, 4, 5, 5, 6, 6, 7, 12, 12, 12, 20, 20),
            [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 5, 5],
            [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 0, 0, 1, 2, 0, 1, 0, 1, 0, 0, 1, 2, 0, 1])


def test_one_index_tree_builds_both_published_static_trees():
    from baselines.eagle import EAGLE_TREE_25
    from baselines.medusa import MC_SIM_7B_63
    from harness.engine.tree import index_tree

    parents, depths, ranks = index_tree(MC_SIM_7B_63, max_depth=4)
    assert (parents, [d - 1 for d in depths], ranks) == (MEDUSA_63_PARENTS, MEDUSA_63_HEADS, MEDUSA_63_RANKS)
    # a head with 2 positions: the nodes of depth <= 2 (they come first), parents unchanged
    assert index_tree(MC_SIM_7B_63, max_depth=2)[0] == MEDUSA_63_PARENTS[:38]
    assert index_tree(EAGLE_TREE_25) == EAGLE_25
    # duplicates and empty paths are ignored; input order does not matter
    assert index_tree([[1], [0], [], [0, 0], [0]]) == ((-1, -1, 0), [1, 1, 2], [0, 1, 0])


def test_index_tree_refuses_broken_paths_in_one_line():
    import pytest

    from harness.engine.tree import index_tree
    from harness.infra.errors import HarnessError

    with pytest.raises(HarnessError, match=r"tree_choices has \[1, 0\] without its parent \[1\]"):
        index_tree([[0], [1, 0]])
    with pytest.raises(HarnessError, match="medusa_choices path .* negative rank"):
        index_tree([[0], [0, -1]], option="medusa_choices")


def test_trie_best_nodes_and_subtree():
    from harness.engine.tree import best_nodes, subtree, trie

    tokens, parents = trie([[1, 2, 3], [1, 2, 4], [1, 5]])
    assert (tokens, parents) == ([1, 2, 3, 4, 5], (-1, 0, 1, 1, 0))
    # cumulative log-probs: a child never above its parent; the tie at -1.0 goes to the lower index
    scores = [-0.1, -1.0, -3.0, -1.0, -0.5]
    assert best_nodes(scores, 3) == [0, 1, 4]
    assert best_nodes(torch.tensor(scores), 3) == [0, 1, 4] == best_nodes(torch.tensor(scores).double(), 3)
    assert best_nodes(scores, 0) == [] and best_nodes(scores, 9) == [0, 1, 2, 3, 4]
    assert subtree(tokens, parents, best_nodes(scores, 3)) == ([1, 2, 5], (-1, 0, 0))


# -- the draft budget and the acceptance a method declares


def _context(remaining: int):
    from harness.engine.loop import DecodeContext

    return DecodeContext([1, 2, 3], 2, None, torch.zeros(1, 4), torch.zeros(8), remaining, Sampling())


def test_draft_budget_leaves_room_for_the_bonus_token():
    assert [_context(remaining).draft_budget(5) for remaining in (10, 6, 5, 2, 1)] == [5, 5, 4, 1, 0]
    assert _context(10).draft_budget(0) == 0


class _Declares(Proposer):
    """Vanilla drafting under a declared acceptance rule."""

    def __init__(self, acceptance, lossy):
        self.acceptance, self.lossy = acceptance, lossy


def test_a_lossy_acceptance_needs_lossy_true_and_the_loop_applies_the_declared_rule(tiny_llama, monkeypatch):
    import pytest

    from harness.engine import acceptance
    from harness.infra.errors import HarnessError

    prompt, stop = list(range(5, 25)), StopCriteria(frozenset(), max_new_tokens=12)
    for rule, lossy, words in [("typical", False, "set method.lossy=true"),
                               ("lossless", True, "set method.lossy=false"),
                               ("nucleus", False, "unknown acceptance 'nucleus'")]:
        with pytest.raises(HarnessError, match=words) as error:
            decode_turn(Target(tiny_llama), _Declares(rule, lossy), prompt, Sampling(), stop)
        assert "\n" not in str(error.value)
    calls = []

    def recorded(*args, **options):
        calls.append(options)
        return acceptance.typical_accept(*args, **options)

    monkeypatch.setitem(acceptance.RULES, "typical", (recorded, True))
    declared = _Declares("typical", True)
    monkeypatch.setattr(_Declares, "acceptance_options", {"posterior_threshold": 0.2, "posterior_alpha": 0.5})
    reference = decode_turn(Target(tiny_llama), Proposer(), prompt, Sampling(), stop).token_ids
    # the loop runs the declared rule at every step, with the method's options; at temperature 0 it is greedy
    assert decode_turn(Target(tiny_llama), declared, prompt, Sampling(), stop).token_ids == reference
    assert calls == [{"posterior_threshold": 0.2, "posterior_alpha": 0.5}] * 11   # the prefill's token is no step
    warm = decode_turn(Target(tiny_llama), declared, prompt, Sampling(temperature=0.8), stop, torch.Generator())
    assert len(warm.token_ids) == 12 and len(calls) == 22
