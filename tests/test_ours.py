"""Ours (methods/ours.py): teacher-forced training logits, chain / beam / tree drafting, lossless decoding
with untrained and fitted heads, and the checks on head type and trigram flag."""

import json

import pytest
import torch
from conftest import compose_config, make_tiny_llama, real_bench_overrides, tiny_bench_overrides
from head_fitting import as_loaded, fit_head, greedy, one_thread  # noqa: F401 (autouse fixture)

from harness.engine.acceptance import Sampling
from harness.bench import run_bench
from harness.engine.loop import DecodeContext, StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.heads.base import BaseHandles, build_head
from harness.heads.checkpoint import base_identity, save_head
from harness.engine.target import Target
from harness.engine.tree import depths_of
from methods.ours import OursHead, OursProposer

pytestmark = pytest.mark.filterwarnings("ignore:method.head_path is null")   # fitted heads replace it

PROMPT = list(range(5, 25))
TOKENS = 40
MODES = [dict(draft="chain"), dict(draft="beam", beam_width=2, top_k=2),
         dict(draft="tree", beam_width=2, top_k=3, max_nodes=8)]


def ours(model, head=None, **options) -> OursProposer:
    proposer = OursProposer(**options)
    proposer.setup(as_loaded(model))
    if head is not None:
        proposer.head = head
    return proposer


def run(model, proposer, sampling=None, generator=None):
    return decode_turn(Target(model), proposer, PROMPT, sampling or Sampling(),
                       StopCriteria(frozenset(), max_new_tokens=TOKENS), generator)


def context(model, tokens=10):
    target = Target(model)
    with torch.inference_mode():
        hidden, logits = target.prefill(PROMPT)
    return DecodeContext(PROMPT + [int(logits.argmax())], len(PROMPT), target, hidden, logits, tokens, Sampling())


@pytest.fixture(scope="module")
def fitted():
    """A tiny Llama with a trigram head and a no-trigram head taught its greedy continuation of PROMPT."""
    model = make_tiny_llama()
    reference = greedy(model, PROMPT, TOKENS)
    heads = {}
    for trigram in (True, False):
        torch.manual_seed(0)
        head = build_head("ours", model.config, base=BaseHandles.of(model), num_positions=3, trigram=trigram)
        losses = fit_head(head, model, [PROMPT + reference], steps=60, lr=3e-2)
        assert losses[-1] < 0.3 * losses[0]
        heads[trigram] = head
    return model, heads, reference


def test_training_logits_unroll_the_recurrence_with_true_tokens():
    model = make_tiny_llama()
    base = BaseHandles.of(model)
    torch.manual_seed(1)
    head = build_head("ours", model.config, base=base, num_positions=3, num_layers=2)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ids = torch.randint(0, 256, (2, 6))
    hidden = torch.randn(2, 6, 64)
    logits = head.training_logits(hidden, ids, base)
    assert logits.shape == (3, 2, 6, 256)
    embed = base.embed.weight

    def e(b, j):   # the embedding of x_j, zeros off the ends (as at t = 0 when decoding a 1-token prompt)
        return embed[ids[b, j]] if 0 <= j < ids.shape[1] else torch.zeros(64)

    for b, t in [(0, 0), (1, 2), (1, 3), (0, 5)]:
        state = hidden[b, t]
        for k in range(3):
            trigram = torch.cat([e(b, t + k - 1), e(b, t + k), e(b, t + k + 1)])
            state = head.step(state, trigram)
            torch.testing.assert_close(logits[k, b, t], base.lm_head(state))
    # an untrained head starts as "s = h": position 1 repeats the target's own next-token logits
    hidden = torch.randn(1, 5, 64)
    fresh = build_head("ours", model.config, base=base, num_positions=3)
    torch.testing.assert_close(fresh.training_logits(hidden, torch.zeros(1, 5, dtype=torch.long), base)[0],
                               base.lm_head(hidden))


def test_draft_shapes_for_chain_beam_and_tree(fitted):
    model, heads, _ = fitted
    head = heads[True]
    chain = ours(model, head, draft="chain").propose(context(model))
    assert depths_of(chain.parents)[1:] == (1, 2, 3) and chain.q_draft is None
    beam = ours(model, head, draft="beam", beam_width=2, top_k=2).propose(context(model))
    assert sorted(depths_of(beam.parents)[1:]) == [1, 1, 2, 2, 3, 3]          # the kept prefixes, 2 per depth
    tree = ours(model, head, draft="tree", beam_width=2, top_k=2).propose(context(model))
    assert sorted(depths_of(tree.parents)[1:]) == [1, 1] + [2] * 4 + [3] * 4  # all children of the kept beams
    cut = ours(model, head, draft="tree", beam_width=2, top_k=2, max_nodes=5).propose(context(model))
    assert len(cut.tokens) == 5 and all(p < i for i, p in enumerate(cut.parents))
    # the draft never runs past the tokens left (the bonus token always comes from the target)
    assert len(ours(model, head, draft="chain").propose(context(model, tokens=2)).tokens) == 1
    assert ours(model, head, draft="chain").propose(context(model, tokens=1)).tokens == []
    # the fitted chain's first guess is the target's token after the pending one
    assert chain.tokens[0] == greedy(model, PROMPT, 2)[1]


@pytest.mark.parametrize("options", MODES)
@pytest.mark.parametrize("trigram", [True, False])
def test_untrained_head_is_lossless(tiny_llama, options, trigram):
    reference = greedy(tiny_llama, PROMPT, TOKENS)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        proposer = ours(tiny_llama, trigram=trigram, **options)
    assert run(tiny_llama, proposer).token_ids == reference


@pytest.mark.parametrize("options", MODES)
@pytest.mark.parametrize("trigram", [True, False])
def test_fitted_head_is_lossless_and_accepts_drafts(fitted, options, trigram):
    model, heads, reference = fitted
    result = run(model, ours(model, heads[trigram], trigram=trigram, **options))
    assert result.token_ids == reference
    assert result.new_tokens / result.steps > 1.5                             # τ
    assert result.pos_accepted[0] > 0


def test_sampling_goes_through_rejection_sampling(fitted):
    model, heads, reference = fitted
    for options in MODES:
        cold = run(model, ours(model, heads[True], **options), Sampling(temperature=1e-4),
                   torch.Generator().manual_seed(1))
        assert cold.token_ids == reference and cold.new_tokens / cold.steps > 1.5


@pytest.mark.parametrize("options", MODES[:2] + [dict(draft="tree", beam_width=2, top_k=3)])
def test_auto_size_follows_the_latency_curve(fitted, options):
    """max_nodes=auto: the most confident nodes while they pay. A flat curve keeps the whole draft, a steep
    one none (the head then runs on probes only), one where a single token pays keeps one per step and
    drafts only one level deep after that; the output is the target's every time."""
    model, heads, reference = fitted
    full = len(ours(model, heads[True], **options).propose(context(model)).tokens)
    flat = ours(model, heads[True], max_nodes="auto", latency_curve={1: 0.010, 64: 0.0101}, **options)
    result = run(model, flat)
    # the chain and the beam keep everything; the tree's improbable siblings (path prob ~0) do not pay even here
    assert result.token_ids == reference and full // 2 < max(result.draft_sizes) <= full
    assert max(result.draft_sizes) == full or options["draft"] == "tree"
    assert result.new_tokens / result.steps > 1.5
    steep = ours(model, heads[True], max_nodes="auto", latency_curve={1: 0.010, 2: 1.0, 64: 60.0}, **options)
    result = run(model, steep)
    assert result.token_ids == reference and max(result.draft_sizes) == 0
    assert 0 < len(steep.sizer.sizes) < result.steps / 2
    one = ours(model, heads[True], max_nodes="auto", latency_curve={1: 0.010, 2: 0.0101, 3: 1.0, 64: 60.0}, **options)
    result = run(model, one)
    assert result.token_ids == reference and max(result.draft_sizes) == 1 and one.depth_limit == 2
    assert result.new_tokens / result.steps > 1.5
    # a probe (drafting stopped paying) drafts the full depth: on a curve where one draft token never pays
    # but the whole confident chain does (2 tokens 2.1x a step, 64 tokens 2.25x), it finds the chain again
    jump = ours(model, heads[True], max_nodes="auto", calibrate=False, latency_curve={1: 0.010, 2: 0.021, 64: 0.0225},
                **options)
    jump.sizer.gain, jump.depth_limit, jump.sizer.skipped = 0.5, 1, jump.sizer.interval - 1
    probe = jump.propose(context(model))
    assert max(depths_of(probe.parents)) == 3 and jump.depth_limit == 4


def test_bad_options_and_mismatched_heads_are_refused(fitted, tmp_path):
    model, heads, _ = fitted
    with pytest.raises(HarnessError, match="max_nodes=most"):
        OursProposer(max_nodes="most")
    with pytest.raises(HarnessError, match="method.draft"):
        OursProposer(draft="greedy")
    with pytest.raises(HarnessError, match=">= 1"):
        OursProposer(beam_width=0)
    folder = save_head(heads[True], tmp_path / "trigram", base_identity(model))
    with pytest.raises(HarnessError, match="method=ours"):
        OursProposer(head_path=str(folder), trigram=False).setup(as_loaded(model))
    medusa = save_head(build_head("medusa", model.config), tmp_path / "medusa", base_identity(model))
    with pytest.raises(HarnessError, match="is a medusa head"):
        OursProposer(head_path=str(medusa)).setup(as_loaded(model))
    loaded = OursProposer(head_path=str(folder))
    loaded.setup(as_loaded(model))
    assert loaded.depth == 3 and not loaded.head.training


def test_bench_path_refuses_a_head_for_another_model(tiny_model_dir, questions_path, tmp_path):
    other = make_tiny_llama(seed=2)
    folder = save_head(build_head("ours", other.config), tmp_path / "head", base_identity(other))
    run_dir = tmp_path / "run"
    cfg = compose_config(*tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "bench.limit=1",
                                               "max_new_tokens=8", "method=ours", f"method.head_path={folder}"))
    with pytest.raises(HarnessError, match="was trained for") as error:
        run_bench(cfg, run_dir)
    assert "\n" not in str(error.value) and not (run_dir / "answers.jsonl").exists()


@pytest.mark.integration
def test_untrained_and_shipped_ours_on_the_default_model_are_lossless(questions_path, vanilla_reference, tmp_path):
    cases = [("ours", ["method.head_path=null", "allow_untrained=true", "method.draft=tree", "method.max_nodes=6"]),   # untrained, tree
             ("ours", []), ("ours_no_trigram", [])]                                            # the shipped heads
    for i, (method, options) in enumerate(cases):
        run_dir = tmp_path / f"{method}-{i}"
        summary = run_bench(compose_config(*real_bench_overrides(questions_path, run_dir, "bench.question_ids=[81]",
                                                                 f"method={method}", *options,
                                                                 f"reference={vanilla_reference}")), run_dir)
        assert summary["questions"] == 1 and summary["turns"] == 2 and summary["lossless_rate"] == 1.0, method
        assert summary["untrained_head"] == (i == 0)     # marked, never passed off as the method's number
        head_path = json.loads((run_dir / "run.json").read_text())["config"]["method"]["head_path"]
        assert (head_path is None) == (i == 0) and (i == 0 or head_path.endswith(f"heads/smollm2-135m/{method}"))


def test_trigram_is_a_documented_alias_of_the_ours_head_type():
    """Checkpoints written before the rename say head_type "trigram": they still build the same class."""
    model = make_tiny_llama()
    old = build_head("trigram", model.config, num_positions=2)
    assert type(old) is OursHead and old.head_type == "ours"
