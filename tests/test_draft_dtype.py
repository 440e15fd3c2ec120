"""method.draft_dtype and packed heads: a head may draft in bf16 beside an fp32 target (the CPU presets do), and
beside a packed target (model.cpu_linear) its linears and its draft-vocabulary projection run packed too. Drafting
only proposes, so every method stays token-identical to the target's greedy; a head taught the continuation still
drafts well in bf16; a bad dtype is one line before anything loads."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from head_fitting import fit_head, greedy, one_thread  # noqa: F401 (autouse fixture)
from torch import nn

from baselines.eagle import EagleProposer
from baselines.medusa import MedusaProposer
from harness.engine.acceptance import Sampling
from harness.engine.loop import StopCriteria, decode_turn
from harness.engine.target import Target
from harness.heads.base import BaseHandles, CastProjection, DraftVocabProjection, build_head, resolve_draft_dtype
from harness.heads.checkpoint import base_identity, save_head
from harness.infra.errors import HarnessError
from harness.model.loading import LoadedModel
from harness.model.packing import PackedLinear, pack_linears
from methods.ours import OursProposer

pytestmark = pytest.mark.filterwarnings("ignore:no head for this method")

PROMPT = list(range(5, 25))
TOKENS = 40


def loaded_as(model, linear: str) -> LoadedModel:
    return LoadedModel("tiny", model, None, None, torch.device("cpu"), torch.float32, "test", linear=linear)


@pytest.fixture(scope="module")
def packed():
    """The tiny target with its linears packed (what load_model does on a CPU), and its greedy continuation."""
    model = make_tiny_llama().eval().requires_grad_(False)
    assert pack_linears(model, "onednn", torch.device("cpu"), torch.float32) == "onednn"
    return model, greedy(model, PROMPT, TOKENS)


@pytest.fixture(scope="module")
def fitted(packed, tmp_path_factory):
    """Medusa and ours heads with a reduced draft vocabulary, taught the continuation (fp32), saved."""
    model, reference = packed
    seen = sorted(set(reference))
    vocab = sorted(seen + [t for t in range(256) if t not in seen][: 64 - len(seen)])   # the continuation + fillers
    folders = {}
    for kind, options in (("medusa", {"medusa_num_heads": 3}), ("ours", {"num_positions": 3})):
        torch.manual_seed(0)
        head = build_head(kind, model.config, base=BaseHandles.of(model), **options)
        head.set_draft_vocab(64, vocab)
        losses = fit_head(head, model, [PROMPT + reference], steps=60, lr=3e-2, base=BaseHandles.for_head(model, head))
        assert losses[-1] < 0.5 * losses[0]
        folders[kind] = tmp_path_factory.mktemp(kind)
        save_head(head, folders[kind], base_identity(model))
    return folders


def proposer_for(kind: str, folder, dtype):
    if kind == "medusa":
        return MedusaProposer(head_path=str(folder), medusa_choices=[[0], [1], [0, 0], [0, 0, 0]], draft_dtype=dtype)
    if kind == "ours":
        return OursProposer(head_path=str(folder), draft="chain", draft_dtype=dtype)
    return EagleProposer(head_path=None, tree="dynamic", total_token=12, depth=3, top_k=3, draft_dtype=dtype)


@pytest.mark.parametrize("kind", ["medusa", "ours", "eagle"])
def test_a_bf16_head_beside_an_fp32_target_is_lossless_packed_and_drafts_well(packed, fitted, kind):
    model, reference = packed
    proposer = proposer_for(kind, fitted.get(kind), "bfloat16")
    proposer.setup(loaded_as(model, "onednn"))
    head = proposer.head
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    projection = proposer.base.lm_head
    assert isinstance(projection, CastProjection if kind == "eagle" else DraftVocabProjection)
    hidden = torch.randn(2, model.config.hidden_size)
    logits = projection(hidden.to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, model.config.vocab_size)
    torch.testing.assert_close(logits.float()[logits.isfinite()], model.lm_head(hidden)[logits.isfinite()],
                               rtol=0.05, atol=0.05)      # bf16 rows of the same lm_head
    result = decode_turn(Target(model), proposer, PROMPT, Sampling(), StopCriteria(frozenset(), max_new_tokens=TOKENS))
    assert result.token_ids == reference
    assert sum(result.draft_sizes) > 0
    if kind != "eagle":   # taught the continuation: its bf16 drafts are still mostly right
        assert sum(result.accepted_lengths) / len(result.accepted_lengths) > 1.2


def test_beside_an_unpacked_target_the_head_stays_plain_and_in_the_targets_dtype(packed, fitted):
    model, _ = packed
    proposer = proposer_for("ours", fitted["ours"], None)
    proposer.setup(loaded_as(model, "default"))
    assert {p.dtype for p in proposer.head.parameters()} == {torch.float32}
    assert all(type(m) is nn.Linear for m in proposer.head.modules() if isinstance(m, nn.Linear))
    projection = proposer.base.lm_head
    hidden = torch.randn(3, model.config.hidden_size)
    ids = proposer.head.draft_vocab
    torch.testing.assert_close(projection(hidden)[:, ids], model.lm_head(hidden)[:, ids], rtol=1e-5, atol=1e-5)


def test_packed_draft_vocabulary_rows_give_the_plain_projection(packed, fitted):
    model, _ = packed
    proposer = proposer_for("medusa", fitted["medusa"], None)
    proposer.setup(loaded_as(model, "onednn"))
    projection = proposer.base.lm_head
    hidden = torch.randn(4, model.config.hidden_size)
    got = projection(hidden)
    assert projection._packed is not None      # a packed target's reduced rows are packed too
    ids = proposer.head.draft_vocab
    torch.testing.assert_close(got[:, ids], torch.nn.functional.linear(hidden, model.lm_head.weight[ids]),
                               rtol=1e-5, atol=1e-5)
    outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
    outside[ids] = False
    assert torch.isinf(got[:, outside]).all()


def test_draft_dtype_names_and_refusals():
    loaded = loaded_as(make_tiny_llama(), "default")
    assert resolve_draft_dtype(None, loaded) == torch.float32
    assert resolve_draft_dtype("bfloat16", loaded) == resolve_draft_dtype("bf16", loaded) == torch.bfloat16
    with pytest.raises(HarnessError, match="method.draft_dtype=int8: use null"):
        resolve_draft_dtype("int8", loaded)
    with pytest.raises(HarnessError, match="float16 has no fast CPU kernels: use bfloat16"):
        resolve_draft_dtype("float16", loaded)
    for make in (EagleProposer, MedusaProposer, OursProposer):     # refused when the method is built, before loading
        with pytest.raises(HarnessError, match="method.draft_dtype=fp8: use null"):
            make(draft_dtype="fp8")
