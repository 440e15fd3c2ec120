"""Medusa: the choice tree, lossless decoding (untrained and fitted heads, greedy and sampling), typical
acceptance as a declared lossy mode, and head errors through the bench path."""

import json

import pytest
import torch
from conftest import compose_config, make_tiny_llama, real_bench_overrides, tiny_bench_overrides
from head_fitting import as_loaded, fit_head, greedy, one_thread  # noqa: F401 (autouse fixture)

from baselines.medusa import MC_SIM_7B_63, MedusaProposer
from harness.engine.acceptance import Sampling
from harness.bench import run_bench
from harness.engine.loop import StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.heads.base import BaseHandles, build_head
from harness.heads.checkpoint import base_identity, save_head
from harness.infra.store import RunStore
from harness.engine.target import Target
from harness.engine.tree import depths_of, index_tree

pytestmark = pytest.mark.filterwarnings("ignore:method.head_path is null")   # fitted heads replace it

PROMPT = list(range(5, 25))
TOKENS = 40


def medusa(model, head=None, **options) -> MedusaProposer:
    proposer = MedusaProposer(**options)
    proposer.setup(as_loaded(model))
    if head is not None:
        proposer.head = head
    return proposer


def run(model, proposer, sampling=None, generator=None, tokens=TOKENS):
    return decode_turn(Target(model), proposer, PROMPT, sampling or Sampling(),
                       StopCriteria(frozenset(), max_new_tokens=tokens), generator)


@pytest.fixture(scope="module")
def fitted():
    """A tiny Llama and a 3-head Medusa taught its own greedy continuation of PROMPT."""
    model = make_tiny_llama()
    reference = greedy(model, PROMPT, TOKENS)
    torch.manual_seed(0)
    head = build_head("medusa", model.config, base=BaseHandles.of(model), medusa_num_heads=3)
    losses = fit_head(head, model, [PROMPT + reference], steps=60, lr=3e-2)
    assert losses[-1] < 0.3 * losses[0]
    return model, head, reference


def test_choice_tree_orders_parents_first_and_drops_what_the_head_cannot_draft():
    parents, depths, ranks = index_tree([[0, 1], [1], [0], [0, 1, 0], [0, 0]], max_depth=2)
    # sorted by depth then path: [0] [1] [0,0] [0,1]; [0,1,0] needs a third head (depth d = head d-1)
    assert parents == (-1, -1, 0, 0) and depths == [1, 1, 2, 2] and ranks == [0, 1, 0, 1]
    full = index_tree(MC_SIM_7B_63, max_depth=4)
    assert len(full[0]) == 63 and max(full[1]) == 4
    with pytest.raises(HarnessError, match="medusa_choices has .* without its parent"):
        index_tree([[0], [1, 0]], max_depth=2, option="medusa_choices")
    with pytest.raises(HarnessError, match="without its parent"):
        MedusaProposer(medusa_choices=[[0], [1, 0]]).setup(as_loaded(make_tiny_llama()))


@pytest.mark.parametrize("options", [dict(medusa_choices="mc_sim_7b_63", medusa_num_heads=4, own_lm_head=True),
                                     dict(medusa_choices="mc_cpu_5", medusa_num_heads=3, own_lm_head=False)])
def test_untrained_medusa_is_lossless(tiny_llama, options):
    reference = greedy(tiny_llama, PROMPT, TOKENS)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        proposer = medusa(tiny_llama, **options)
    result = run(tiny_llama, proposer)
    assert result.token_ids == reference
    assert max(result.draft_sizes) == (63 if options["medusa_num_heads"] == 4 else 5)


@pytest.mark.parametrize("choices", ["mc_cpu_5", "mc_sim_7b_63"])
def test_fitted_medusa_is_lossless_and_accepts_drafts(fitted, choices):
    model, head, reference = fitted
    result = run(model, medusa(model, head, medusa_choices=choices))
    assert result.token_ids == reference
    assert result.new_tokens / result.steps > 1.5                   # τ: the heads are mostly right
    assert result.pos_accepted[0] > 0 and len(result.pos_attempted) == 3


def test_sampling_goes_through_rejection_sampling(fitted):
    model, head, reference = fitted
    # near-zero temperature: the target distribution is one-hot, so a lossless sampler must give greedy
    cold = run(model, medusa(model, head), Sampling(temperature=1e-4), torch.Generator().manual_seed(1))
    assert cold.token_ids == reference and cold.new_tokens / cold.steps > 1.5
    warm = [run(model, medusa(model, head), Sampling(temperature=0.8), torch.Generator().manual_seed(7)).token_ids
            for _ in range(2)]
    assert warm[0] == warm[1] and len(warm[0]) == TOKENS          # reproducible under a seeded generator


def test_typical_acceptance_is_lossy_and_must_be_declared(fitted):
    model, head, reference = fitted
    with pytest.raises(HarnessError, match="lossy=true"):
        MedusaProposer(acceptance="typical")
    with pytest.raises(HarnessError, match="lossy=true"):
        MedusaProposer(acceptance="lossless", lossy=True)
    assert compose_config("method=medusa_typical").method.lossy is True
    assert compose_config("method=medusa").method.lossy is False
    typical = medusa(model, head, acceptance="typical", lossy=True)
    assert typical.propose(_context(model)).q_draft is None
    # the method declares its rule and the loop applies it; the default is the shared lossless one
    assert (typical.acceptance, typical.lossy) == ("typical", True)
    assert typical.acceptance_options == {"posterior_threshold": 0.09, "posterior_alpha": 0.3}
    lossless = medusa(model, head)
    assert (lossless.acceptance, lossless.lossy, lossless.acceptance_options) == ("lossless", False, {})
    # Medusa falls back to greedy at temperature 0, and so does this
    assert run(model, typical).token_ids == reference
    result = run(model, typical, Sampling(temperature=0.7), torch.Generator().manual_seed(3))
    assert len(result.token_ids) == TOKENS and result.new_tokens / result.steps > 1.5


FLAT = {1: 0.010, 64: 0.0101}                 # a GPU-like curve: a big verify costs what a small one does
STEEP = {1: 0.010, 2: 1.0, 64: 60.0}          # a draft token costs 100 target steps: never worth it


def test_auto_tree_follows_the_latency_curve(fitted):
    """tree=auto keeps the heads' most confident nodes while they pay: many on a flat curve, none on a steep
    one (where the heads stop running but for probes); the output stays the target's either way."""
    model, head, reference = fitted
    flat = medusa(model, head, medusa_choices="mc_sim_7b_63", tree="auto", latency_curve=FLAT)
    result = run(model, flat)
    assert result.token_ids == reference and result.new_tokens / result.steps > 1.5
    assert 8 <= max(result.draft_sizes) <= 15             # the confident nodes, within auto_max_tokens 16 (root included)
    steep = medusa(model, head, medusa_choices="mc_sim_7b_63", tree="auto", latency_curve=STEEP)
    result = run(model, steep)
    assert result.token_ids == reference and max(result.draft_sizes) == 0
    assert 0 < len(steep.sizer.sizes) < result.steps / 2     # the heads ran on probes only
    # one draft token is cheap, a second costs 100 steps: one node per step, and only head 0 runs after that
    one = medusa(model, head, medusa_choices="mc_sim_7b_63", tree="auto", latency_curve={1: 0.010, 2: 0.0101, 3: 1.0, 64: 60.0})
    result = run(model, one)
    assert result.token_ids == reference and max(result.draft_sizes) == 1 and one.depth_limit == 2
    assert result.new_tokens / result.steps > 1.5
    # a probe (drafting stopped paying) runs every head: on a curve where one draft token never pays but a
    # 3-deep path does (2 tokens 2.1x a step, 64 tokens 2.25x), it finds the deep path again
    jump = medusa(model, head, medusa_choices="mc_sim_7b_63", tree="auto", calibrate=False,
                  latency_curve={1: 0.010, 2: 0.021, 64: 0.0225})
    jump.sizer.gain, jump.depth_limit, jump.sizer.skipped = 0.5, 1, jump.sizer.interval - 1
    probe = jump.propose(_context(model))
    assert max(depths_of(probe.parents)) == 3 and jump.depth_limit == 3
    cold = run(model, medusa(model, head, tree="auto", latency_curve=FLAT), Sampling(temperature=1e-4),
               torch.Generator().manual_seed(1))
    assert cold.token_ids == reference
    with pytest.raises(HarnessError, match="method.tree=dynamic"):
        MedusaProposer(tree="dynamic")


def _context(model, remaining=10):
    from harness.engine.loop import DecodeContext

    target = Target(model)
    with torch.inference_mode():
        hidden, logits = target.prefill(PROMPT)
    return DecodeContext(PROMPT + [int(logits.argmax())], len(PROMPT), target, hidden, logits, remaining, Sampling())


def test_drafts_never_run_past_the_tokens_left(fitted):
    model, head, _ = fitted
    proposer = medusa(model, head, medusa_choices="mc_sim_7b_63")
    assert len(proposer.propose(_context(model, remaining=10)).tokens) == 61   # 3 heads: the 61 nodes of depth <= 3
    near_end = proposer.propose(_context(model, remaining=2))
    assert len(near_end.tokens) == 10 and set(near_end.parents) == {-1}        # depth 1 only
    assert proposer.propose(_context(model, remaining=1)).tokens == []


def _save(head, model, folder):
    return save_head(head, folder, base_identity(model))


def test_head_errors_through_the_bench_path(tiny_model_dir, questions_path, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    good = _save(build_head("medusa", tiny.config, base=BaseHandles.of(tiny), medusa_num_heads=2), tiny,
                 tmp_path / "good")
    # through the bench: the trained-head path decodes losslessly against vanilla
    vanilla_dir, medusa_dir = tmp_path / "vanilla", tmp_path / "medusa"
    common = ("bench.limit=1", "max_new_tokens=16")
    run_bench(compose_config(*tiny_bench_overrides(tiny_model_dir, vanilla_dir, questions_path, *common)), vanilla_dir)
    summary = run_bench(compose_config(*tiny_bench_overrides(
        tiny_model_dir, medusa_dir, questions_path, *common, "method=medusa_cpu", f"method.head_path={good}",
        f"reference={vanilla_dir}")), medusa_dir)
    assert summary["lossless_rate"] == 1.0
    info = json.loads((medusa_dir / "run.json").read_text())
    assert info["config"]["method"]["lossy"] is False

    other = make_tiny_llama(seed=1)                                   # another base model (vocab 256)
    foreign = _save(build_head("medusa", other.config, medusa_num_heads=2), other, tmp_path / "foreign")
    corrupt = _save(build_head("medusa", tiny.config, medusa_num_heads=2), tiny, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for name, folder, words in [("foreign", foreign, "was trained for"), ("corrupt", corrupt, "corrupt or truncated"),
                                ("missing", tmp_path / "nowhere", "does not exist")]:
        run_dir = tmp_path / f"run-{name}"
        cfg = compose_config(*tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, *common,
                                                   "method=medusa_cpu", f"method.head_path={folder}"))
        with pytest.raises(HarnessError, match=words) as error:
            run_bench(cfg, run_dir)
        assert "\n" not in str(error.value)
        assert not RunStore(run_dir).answers.is_file() or not RunStore(run_dir).records()


@pytest.mark.integration
def test_untrained_and_shipped_medusa_on_the_default_model_are_lossless(questions_path, vanilla_reference, tmp_path):
    for name, question, options in [("untrained", 81, ["method.head_path=null", "allow_untrained=true"]), ("shipped", 82, [])]:
        run_dir = tmp_path / name
        summary = run_bench(compose_config(*real_bench_overrides(questions_path, run_dir, f"bench.question_ids=[{question}]",
                                                                 "method=medusa_cpu", *options,
                                                                 f"reference={vanilla_reference}")), run_dir)
        assert summary["questions"] == 1 and summary["turns"] == 2 and summary["lossless_rate"] == 1.0, name
        assert summary["untrained_head"] == (name == "untrained")     # marked, never passed off as the method's number
        head_path = json.loads((run_dir / "run.json").read_text())["config"]["method"]["head_path"]
        assert (head_path is None) == (name == "untrained"), head_path   # the shipped head, not a silent fallback
