"""A reduced draft vocabulary (FR-Spec / EAGLE-3): heads project onto the most frequent tokens only, decoders
still see full-vocabulary ids, verification stays the target's full distribution, so every method stays
token-identical to greedy; the ids survive saving and shipping; training picks the most frequent tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from head_fitting import as_loaded, fit_head, greedy, one_thread  # noqa: F401 (autouse fixture)

from baselines.eagle import EagleProposer
from baselines.medusa import MedusaProposer
from harness.engine.acceptance import Sampling
from harness.engine.loop import StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.heads.base import BaseHandles, build_head
from harness.engine.target import Target
from methods.ours import OursProposer

pytestmark = pytest.mark.filterwarnings("ignore:method.head_path is null")

PROMPT = list(range(5, 25))
TOKENS = 40


@pytest.fixture(scope="module")
def model_and_reference():
    model = make_tiny_llama()
    return model, greedy(model, PROMPT, TOKENS)


def draft_vocab(reference: list[int], keep_fraction: float) -> list[int]:
    """Some of the continuation's tokens (the rest are never drafted) padded with others to 64 ids."""
    seen = sorted(set(reference))
    kept = seen[: max(1, int(len(seen) * keep_fraction))]
    others = [t for t in range(256) if t not in seen][: 64 - len(kept)]
    return sorted(kept + others)


def with_head(proposer, model, head):
    proposer.setup(as_loaded(model))
    proposer.head = head
    proposer.base = BaseHandles.for_head(model, head)    # what setup() builds for a loaded head
    return proposer


class Recording:
    """Wraps a proposer and keeps every drafted token."""

    def __init__(self, inner):
        self.inner, self.drafted = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, ctx):
        draft = self.inner.propose(ctx)
        self.drafted += [int(t) for t in draft.tokens]
        return draft


@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["medusa", "ours", "eagle"])
def test_reduced_vocabulary_heads_are_lossless_and_draft_only_inside_it(model_and_reference, kind, keep):
    model, reference = model_and_reference
    vocab = draft_vocab(reference, keep)
    torch.manual_seed(0)
    if kind == "eagle":
        proposer = EagleProposer(tree="dynamic", total_token=12, depth=4, top_k=4)
        proposer.setup(as_loaded(model))
        head = proposer.head
        head.set_draft_vocab(64, vocab)
        proposer.base = BaseHandles.for_head(model, head)
    else:
        options = {"medusa_num_heads": 3} if kind == "medusa" else {"num_positions": 3}
        head = build_head(kind, model.config, base=BaseHandles.of(model), **options)
        if keep == 1.0:   # trained within its vocabulary: full-size logits, -inf outside it
            head.set_draft_vocab(64, vocab)
            losses = fit_head(head, model, [PROMPT + reference], steps=60, lr=3e-2,
                              base=BaseHandles.for_head(model, head))
        else:             # trained on the full vocabulary, then half the continuation's tokens cut away
            losses = fit_head(head, model, [PROMPT + reference], steps=60, lr=3e-2)
            head.set_draft_vocab(64, vocab)
        assert losses[-1] < 0.5 * losses[0]
        proposer = with_head(MedusaProposer() if kind == "medusa" else OursProposer(), model, head)
    recording = Recording(proposer)
    result = decode_turn(Target(model), recording, PROMPT, Sampling(), StopCriteria(frozenset(), max_new_tokens=TOKENS))
    assert result.token_ids == reference
    assert recording.drafted and set(recording.drafted) <= set(vocab)
    if kind != "eagle" and keep == 1.0:
        assert sum(result.accepted_lengths) / len(result.accepted_lengths) > 1.2   # the fitted head drafts well


def test_projection_scatters_into_full_vocabulary_logits():
    model = make_tiny_llama()
    head = build_head("medusa", model.config, base=BaseHandles.of(model), medusa_num_heads=1)
    head.set_draft_vocab(4, [7, 3, 200, 9])
    full, reduced = BaseHandles.for_head(model, head), BaseHandles.for_head(model, head, scatter=False)
    x = torch.randn(2, model.config.hidden_size)
    logits, small = full.lm_head(x), reduced.lm_head(x)
    assert logits.shape == (2, 256) and small.shape == (2, 4)
    expected = model.lm_head(x)
    ids = torch.tensor([3, 7, 9, 200])
    assert torch.allclose(logits[:, ids], expected[:, ids], atol=1e-5)
    assert torch.isinf(logits).sum() == 2 * 252
    assert reduced.lm_head.to_draft_ids(torch.tensor([3, 5, -100, 200])).tolist() == [1, -1, -1, 2]   # positions in the given order
    with pytest.raises(HarnessError, match="repeats"):
        head.set_draft_vocab(3, [1, 1, 2])
    with pytest.raises(HarnessError, match="draft_vocab_size=999"):
        build_head("medusa", model.config, medusa_num_heads=1, draft_vocab_size=999)
