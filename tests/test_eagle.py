"""EAGLE / EAGLE-2 on a tiny random Llama: the head's training unroll equals what drafting computes, a few
training steps lower the loss, and static / dynamic trees decode token-identically to vanilla greedy."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from baselines.eagle import EAGLE_TREE_25, EagleHead, EagleProposer, HeadCache, build_eagle_head, sample_children
from harness.engine.acceptance import Sampling, target_probs
from harness.bench import run_bench
from harness.engine.loop import DecodeContext, Proposer, StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.heads.base import BaseHandles
from harness.heads.checkpoint import base_identity, load_head, save_head
from harness.model.loading import LoadedModel
from harness.engine.target import Target
from harness.engine.tree import index_tree
from tests.conftest import compose_config, make_tiny_llama, real_bench_overrides

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59], [1, 41, 42, 13, 56, 23, 73, 9, 30]]


def as_loaded(model) -> LoadedModel:
    return LoadedModel("tiny", model, None, None, torch.device("cpu"), torch.float32, "test")


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    return decode_turn(Target(model), Proposer(), prompt, Sampling(),
                       StopCriteria(frozenset(), max_new_tokens=new_tokens)).token_ids


def decode(model, proposer: Proposer, prompt: list[int], new_tokens: int, sampling: Sampling = Sampling(),
           seed: int = 0):
    return decode_turn(Target(model), proposer, prompt, sampling, StopCriteria(frozenset(), max_new_tokens=new_tokens),
                       torch.Generator().manual_seed(seed))


def features(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids=ids).last_hidden_state


def train_head(head: EagleHead, model, sequences: list[list[int]], steps: int, lr: float = 3e-3) -> list[float]:
    """EAGLE's own loss (training_loss), AdamW with EAGLE's betas; returns the loss per step."""
    ids = torch.tensor(sequences)
    hidden, base = features(model, ids), BaseHandles.of(model)
    head.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95))
    losses = []
    for _ in range(steps):
        loss, _ = head.training_loss(hidden, ids, torch.ones_like(ids, dtype=torch.bool), base)
        optimizer.zero_grad()
        loss.backward()
        for parameter in head.parameters():          # EAGLE clips by value
            parameter.grad.clamp_(-0.5, 0.5)
        optimizer.step()
        losses.append(loss.item())
    head.eval().requires_grad_(False)
    return losses


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine intra-op threads
    that wait for a busy core make every small op ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def sequences(tiny):
    return [prompt + greedy(tiny, prompt, 56 - len(prompt)) for prompt in PROMPTS]


@pytest.fixture(scope="module")
def fitted_folder(tiny, sequences, tmp_path_factory):
    """A head taught the tiny model's own continuations (memorisation: drafts are often right), saved."""
    torch.manual_seed(0)
    head = build_eagle_head(tiny.config, BaseHandles.of(tiny), noise_std=0.0)
    losses = train_head(head, tiny, sequences, steps=150)
    assert losses[-1] < 0.5 * losses[0]
    folder = tmp_path_factory.mktemp("eagle-head")
    save_head(head, folder, base_identity(tiny))
    return folder


def test_published_tree_and_head_layout(tiny):
    parents, depths, ranks = index_tree(EAGLE_TREE_25)
    assert len(parents) == 25 and max(depths) == 5 and depths.count(1) == 4
    assert all(parent < node for node, parent in enumerate(parents))
    head = build_eagle_head(tiny.config)
    names = set(head.state_dict())
    # the official cnets.py names: fc with bias, layer 0 without input_layernorm, no embedding / lm_head stored
    assert {"fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight",
            "layers.0.post_attention_layernorm.weight"} <= names
    assert not any("input_layernorm" in n or "embed" in n or "lm_head" in n or "inv_freq" in n for n in names)
    assert head.fc.weight.shape == (64, 128)
    with pytest.raises(HarnessError, match="use static"):
        EagleProposer(tree="beam")
    with pytest.raises(HarnessError, match="tree=dynamic"):
        EagleProposer(tree="static", total_token="auto")


def test_training_unroll_equals_drafting_with_the_cache(tiny):
    """Unrolled step j at origin t == feeding the head the true pairs 0..t, then its own f^ with the true tokens."""
    torch.manual_seed(1)
    head = build_eagle_head(tiny.config, num_layers=2).eval()
    base = BaseHandles.of(tiny)
    ids = torch.tensor([list(range(3, 43))])
    hidden = features(tiny, ids)
    with torch.no_grad():
        predicted, logits = head.unroll(hidden, ids, base, steps=3)
        assert logits.shape == (3, 1, 40, 256)
        for origin in (0, 7, 20):
            cache = HeadCache(*head.kv_shape, torch.float32, "cpu")
            out = head.forward_cached(hidden[0, : origin + 1], ids[0, 1: origin + 2], torch.arange(origin + 1), None,
                                      cache, base)[-1]
            torch.testing.assert_close(out, predicted[0, 0, origin], atol=1e-5, rtol=1e-5)
            for step in (1, 2):
                out = head.forward_cached(out[None], ids[0, origin + step + 1: origin + step + 2],
                                          torch.tensor([origin + step]), None, cache, base)[0]
                torch.testing.assert_close(out, predicted[step, 0, origin], atol=1e-5, rtol=1e-5)


def test_a_few_training_steps_lower_the_loss_and_checkpoints_round_trip(tiny, sequences, tmp_path):
    torch.manual_seed(0)
    head = build_eagle_head(tiny.config, BaseHandles.of(tiny), train_steps=2)
    losses = train_head(head, tiny, sequences, steps=12)
    assert losses[-1] < losses[0]
    assert set(head.last_losses) == {"vloss", "ploss"}
    ids = torch.tensor(sequences)
    _, eval_logits = head.eval().training_loss(features(tiny, ids), ids, torch.ones_like(ids), BaseHandles.of(tiny))
    assert eval_logits.shape[0] == head.num_positions == 4      # eval mode: every position for top-k accuracy
    save_head(head, tmp_path, base_identity(tiny))
    loaded = load_head(tmp_path, as_loaded(tiny))
    assert isinstance(loaded, EagleHead) and loaded.config == head.config
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_training_loss_projects_only_the_loss_rows_and_matches_the_full_projection(tiny, sequences):
    """Training projects only the assistant rows through the lm_head; the loss equals EAGLE-1's masked mean
    computed from full [B, T, V] projections (written out here), and the eval-mode loss (which keeps every row)."""
    torch.manual_seed(3)
    head = build_eagle_head(tiny.config, BaseHandles.of(tiny), train_steps=2, noise_std=0.0)
    base = BaseHandles.of(tiny)
    ids = torch.tensor(sequences)
    hidden = features(tiny, ids)
    mask = torch.zeros_like(ids)
    mask[:, 20:] = 1                        # "assistant" tokens only
    mask[1, 40:] = 0
    train_loss, train_logits = head.train().training_loss(hidden, ids, mask, base)
    assert train_logits is None
    eval_loss, _ = head.eval().training_loss(hidden, ids, mask, base)
    with torch.no_grad():
        predicted, logits = head.unroll(hidden, ids, base, 2)
        target_logp = torch.log_softmax(base.lm_head(hidden), dim=-1)
        expected = 0.0
        for step in range(2):
            span = ids.shape[1] - step - 2
            valid = mask[:, step + 2:].float()
            regression = torch.nn.functional.smooth_l1_loss(predicted[step, :, :span], hidden[:, step + 1: step + 1 + span],
                                                            reduction="none").mean(-1)
            p_target = target_logp[:, step + 1: step + 1 + span].exp()
            cross = -(p_target * torch.log_softmax(logits[step, :, :span], dim=-1)).sum(-1)
            expected += ((regression * valid).sum() + 0.1 * (cross * valid).sum()) / (valid.sum() + 1e-5)
    torch.testing.assert_close(train_loss.detach(), expected / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_loss.detach(), expected / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", [dict(tree="static"),
                                      dict(tree="static", tree_choices="eagle_cpu_5"),
                                      dict(tree="dynamic", total_token=20, depth=3, top_k=4),
                                      dict(tree="dynamic", total_token=60, depth=5, top_k=10)])
def test_trees_are_lossless_greedy_and_accept_a_fitted_heads_drafts(tiny, fitted_folder, settings):
    proposer = EagleProposer(head_path=str(fitted_folder), **settings)
    proposer.setup(as_loaded(tiny))
    for prompt in PROMPTS:
        expected = greedy(tiny, prompt, 48)
        result = decode(tiny, proposer, prompt, 48)
        assert result.token_ids == expected
        assert result.new_tokens / result.steps > 2.0        # memorised continuations: most drafts accepted
    sizes = {"eagle_25": 25, "eagle_cpu_5": 5}
    expected_size = sizes[settings.get("tree_choices", "eagle_25")] if settings["tree"] == "static" \
        else settings["total_token"] - 1
    assert max(result.draft_sizes) == expected_size


def test_untrained_head_is_lossless_and_dynamic_trees_are_prefix_closed(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proposer = EagleProposer(tree="dynamic", total_token=30, depth=4, top_k=5)
        proposer.setup(as_loaded(tiny))
    prompt = PROMPTS[0]
    assert decode(tiny, proposer, prompt, 40).token_ids == greedy(tiny, prompt, 40)
    target = Target(tiny)
    with torch.inference_mode():
        hidden, logits = target.prefill(prompt)
        ctx = DecodeContext(prompt + [int(logits.argmax())], len(prompt), target, hidden, logits, 40, Sampling())
        proposer.reset(ctx)
        draft = proposer.propose(ctx)
    assert len(draft.tokens) == 29 and draft.q_draft is None
    depth = {-1: 0}
    for node, parent in enumerate(draft.parents):
        assert parent < node                                   # parents first: the kept set is prefix-closed
        depth[node] = depth[parent] + 1
    assert max(depth.values()) <= 5                            # depth expansions after the root's: depth + 1 levels
    for parent in set(draft.parents):
        siblings = [draft.tokens[n] for n, p in enumerate(draft.parents) if p == parent]
        assert len(siblings) == len(set(siblings)) <= 5


def test_sampling_runs_through_every_tree(tiny, fitted_folder):
    sampling = Sampling(temperature=0.8, top_p=0.95)
    for settings in (dict(tree="static"), dict(tree="static", sample_draft=True),
                     dict(tree="dynamic", total_token=16, depth=3, top_k=4)):
        proposer = EagleProposer(head_path=str(fitted_folder), **settings)
        proposer.setup(as_loaded(tiny))
        result = decode(tiny, proposer, PROMPTS[1], 32, sampling, seed=3)
        assert result.new_tokens == 32 and result.steps < 32
        again = decode(tiny, proposer, PROMPTS[1], 32, sampling, seed=3)
        assert again.token_ids == result.token_ids             # seeded: reproducible


def test_sampled_children_carry_their_exact_draw_distributions():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -30.0])
    tokens, q = sample_children(logits, 3, 1.0, torch.Generator().manual_seed(0))
    assert len(set(tokens)) == 3 and q.shape == (3, 5)
    full = torch.softmax(logits, -1)
    torch.testing.assert_close(q[0], full)
    for i in range(1, 3):          # row i = softmax without tokens 0..i-1, renormalised
        expected = full.clone()
        expected[tokens[:i]] = 0
        torch.testing.assert_close(q[i], expected / expected.sum())
    tokens, q = sample_children(torch.tensor([0.0, -float("inf"), -float("inf")]), 2, 1.0, None)
    assert tokens[0] == 0 and q[1].sum() == 1 and q[1, tokens[1]] == 1   # support exhausted: a point mass


def test_auto_size_follows_the_latency_curve(tiny, fitted_folder):
    """A flat (GPU-like) curve makes big trees pay; a steep one makes drafting not pay: the sizer stops
    drafting (with occasional probes) and the output stays identical."""
    prompt = PROMPTS[2]
    expected = greedy(tiny, prompt, 40)
    flat = EagleProposer(head_path=str(fitted_folder), tree="dynamic", total_token="auto", depth=3, top_k=4,
                         latency_curve={1: 0.010, 64: 0.0101})
    flat.setup(as_loaded(tiny))
    result = decode(tiny, flat, prompt, 40)
    assert result.token_ids == expected and max(result.draft_sizes) >= 8
    steep = EagleProposer(head_path=str(fitted_folder), tree="dynamic", total_token="auto", depth=3, top_k=4,
                          latency_curve={1: 0.010, 2: 1.0, 64: 60.0})
    steep.setup(as_loaded(tiny))
    result = decode(tiny, steep, prompt, 40)
    assert result.token_ids == expected and max(result.draft_sizes) == 0


@pytest.mark.integration
def test_untrained_and_shipped_eagle2_on_the_default_model_are_lossless(questions_path, vanilla_reference, tmp_path):
    cases = [("untrained", 81, ["method=eagle2", "method.total_token=16", "method.depth=2", "method.top_k=4",
                                "method.head_path=null", "allow_untrained=true"]),
             ("shipped", 82, ["method=eagle2_cpu"])]                   # heads/smollm2-135m/eagle, auto-sized tree
    for name, question, options in cases:
        run_dir = tmp_path / name
        summary = run_bench(compose_config(*real_bench_overrides(questions_path, run_dir, f"bench.question_ids=[{question}]",
                                                                 *options, f"reference={vanilla_reference}")), run_dir)
        assert summary["questions"] == 1 and summary["turns"] == 2 and summary["lossless_rate"] == 1.0, name
        assert summary["untrained_head"] == (name == "untrained")     # marked, never passed off as the method's number
        head_path = json.loads((run_dir / "run.json").read_text())["config"]["method"]["head_path"]
        assert (head_path is None) == (name == "untrained"), head_path   # the shipped head, not a silent fallback



SMALL_VOCAB, SMALL_PROMPT = 8, [1, 5, 2, 7, 3]


@torch.inference_mode()
def exact_pairs(model, sampling: Sampling) -> np.ndarray:
    """[V, V] exact P(token 2 = b, token 3 = c), token 1 marginalised out (token 1 is the prefill's own sample)."""
    vocab, prompt = SMALL_VOCAB, SMALL_PROMPT
    p_first = target_probs(model(torch.tensor([prompt])).logits[0, -1], sampling).double()
    logits = model(torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])).logits
    logits = logits.view(vocab, vocab, len(prompt) + 2, vocab)
    p_second = target_probs(logits[:, 0, -2], sampling).double()
    p_third = target_probs(logits[:, :, -1], sampling).double()
    return (p_first[:, None, None] * p_second[:, :, None] * p_third).sum(0).numpy()


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    counts, probs = counts.ravel(), probs.ravel()
    assert counts[probs == 0].sum() == 0, "drew a pair the target gives probability 0"
    keep = probs > 0
    counts, expected = counts[keep], probs[keep] / probs[keep].sum() * counts.sum()
    small = expected < 5          # pooled so the chi-square approximation holds
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(chisquare(counts, expected).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [dict(tree="static", tree_choices="eagle_cpu_5", sample_draft=True),
                                      dict(tree="dynamic", total_token=6, depth=2, top_k=3)])
def test_sampling_follows_the_target_distribution(settings):
    """Chi-square of (token 2, token 3) over 1500 seeded generations against the exact distribution (as
    tests/test_sampling_distribution.py does for the engine): EAGLE-1's drawn children with their q rows,
    and EAGLE-2's deterministic top-ranked candidates with q_draft = None."""
    target = make_tiny_llama(seed=0, vocab=SMALL_VOCAB, layers=1, hidden=32)
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proposer = EagleProposer(**settings)
        proposer.setup(as_loaded(target))
    sampling = Sampling(temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    stop = StopCriteria(frozenset(), max_new_tokens=4)
    counts = np.zeros((SMALL_VOCAB, SMALL_VOCAB), dtype=np.int64)
    accepted = 0
    for _ in range(1500):
        result = decode_turn(Target(target), proposer, SMALL_PROMPT, sampling, stop, generator)
        counts[result.token_ids[1], result.token_ids[2]] += 1
        accepted += sum(result.pos_accepted)
    assert accepted > 300                                       # drafts are accepted (and rejected) often
    assert chi_square_p_value(counts, exact_pairs(target, sampling)) > 1e-3


def test_feature_cache_round_trip_size_and_base_check(tiny, sequences, tmp_path):
    from harness.data.feature_cache import (CachedTrainingSet, FeatureCache, FeatureCollator, feature_bytes,
                                       target_features, write_cache)
    from harness.data.examples import Collator

    examples = [{"id": f"c{i}", "input_ids": seq[: 40 + i], "loss_mask": [i % 2 == 0] * (40 + i)}
                for i, seq in enumerate(sequences)]
    write_cache(tiny, examples, tmp_path, base_identity(tiny), shard_size=2, progress=False)
    cache = FeatureCache(tmp_path, base_identity(tiny))
    assert len(cache) == 3 and len(cache.index["shards"]) == 2
    assert cache.total_bytes == sum(feature_bytes(40 + i, 64) for i in range(3)) == (40 + 41 + 42) * 64 * 2
    for i, example in enumerate(examples):
        item = cache[i]
        assert item["id"] == f"c{i}" and item["input_ids"].tolist() == example["input_ids"]
        assert item["hidden"].dtype == torch.bfloat16 and bool(item["loss_mask"].all()) == (i % 2 == 0)
        exact = target_features(tiny, torch.tensor([example["input_ids"]]))[0]
        torch.testing.assert_close(item["hidden"].float(), exact, atol=2e-2, rtol=1e-2)   # bf16: 8 mantissa bits
    with pytest.raises(HarnessError, match="trained for"):
        FeatureCache(tmp_path, base_identity(make_tiny_llama(seed=1)))
    batch = FeatureCollator(Collator(pad_id=0))([CachedTrainingSet(cache)[i] for i in range(3)])
    assert batch["hidden"].shape == (3, 42, 64) and batch["input_ids"].shape == (3, 42)
    assert (batch["labels"][1] == -100).all() and bool(batch["hidden"][0, 40:].eq(0).all())


def test_specdec_train_eagle_end_to_end_from_a_feature_cache(tmp_path, monkeypatch):
    """train=eagle_smollm2 on a tiny chat model: the cache is written once and reused, the loss falls, gradients
    are clipped by value before every optimizer step, the head folder loads as an EAGLE head and eval reports
    top-k accuracy for every unrolled position."""
    import json

    from harness import train as train_module
    from harness.model.loading import load_model
    from harness.data.sharegpt import write_sharegpt
    from harness.train import run_train

    clipped = []
    original = train_module.ClipGradValue.on_pre_optimizer_step

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        grads = [p.grad for p in self.trainer.model.parameters() if p.grad is not None]
        clipped.append(max(float(g.abs().max()) for g in grads) <= self.value)

    monkeypatch.setattr(train_module.ClipGradValue, "on_pre_optimizer_step", spy)
    from tiny_chat import make_tiny_chat_model, model_overrides

    chat = make_tiny_chat_model(tmp_path / "chat")
    words = "one two three four five six seven eight nine ten".split()
    records = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"tell me {words[i]} words"},
                                                  {"from": "gpt", "value": " ".join(words[i % 3:] + words[:i % 3])}]}
               for i in range(8)]
    train, held = write_sharegpt(records[:6], tmp_path / "train.json"), write_sharegpt(records[6:], tmp_path / "e.json")

    def run(output_dir):
        cfg = compose_config(*model_overrides(chat)[:-1], "train=eagle_smollm2", "logger=none", f"data_path={train}",
                             f"eval_data_path={held}", f"output_dir={output_dir}", "model_max_length=64",
                             f"feature_cache={tmp_path / 'features'}", "training.num_train_epochs=1",
                             "+training.max_steps=12", "training.per_device_train_batch_size=2",
                             "training.per_device_eval_batch_size=2", "training.learning_rate=3e-3",
                             "training.warmup_ratio=0.0", "training.logging_steps=1", "training.eval_steps=12",
                             "training.save_steps=12", "+training.disable_tqdm=true", "+training.use_cpu=true",
                             "head.draft_vocab_size=null", "training.bf16=false",
                             config_name="train")
        return cfg, run_train(cfg)

    cfg, summary = run(tmp_path / "eagle")
    assert len(clipped) == 12 and all(clipped)             # EAGLE-1's clip_grad_value 0.5 on every step
    index = tmp_path / "features" / "index.json"
    written = index.stat().st_mtime_ns
    assert summary["global_step"] == 12 and json.loads(index.read_text())["hidden_size"] == 64
    history = json.loads((tmp_path / "eagle" / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert sum(losses[-3:]) < sum(losses[:3])
    for position in (1, 2, 3, 4):
        assert 0.0 <= summary["eval"][f"eval_pos{position}_top5"] <= 1.0
    head = load_head(tmp_path / "eagle", load_model(cfg.model, "cpu"))
    assert isinstance(head, EagleHead) and head.config["p_weight"] == 0.1
    run(tmp_path / "again")                                 # the finished cache is read, not rewritten
    assert index.stat().st_mtime_ns == written


def test_static_sampled_draft_gives_each_node_the_row_it_was_drawn_from(tiny, fitted_folder):
    proposer = EagleProposer(head_path=str(fitted_folder), tree="static", sample_draft=True)
    proposer.setup(as_loaded(tiny))
    target = Target(tiny)
    with torch.inference_mode():
        hidden, logits = target.prefill(PROMPTS[0])
        ctx = DecodeContext(PROMPTS[0] + [int(logits.argmax())], len(PROMPTS[0]), target, hidden, logits, 40,
                            Sampling(temperature=0.7), torch.Generator().manual_seed(5))
        proposer.reset(ctx)
        draft = proposer.propose(ctx)
    q = draft.q_draft
    assert q.shape == (25, 256)
    for parent in set(draft.parents):
        siblings = [n for n, p in enumerate(draft.parents) if p == parent]     # ranks 0, 1, .. in draft order
        first = q[siblings[0]]
        for i, node in enumerate(siblings):
            assert q[node, draft.tokens[node]] > 0
            expected = first.clone()
            expected[[draft.tokens[s] for s in siblings[:i]]] = 0
            torch.testing.assert_close(q[node], expected / expected.sum())


def test_while_the_sizer_declines_drafting_the_head_reads_committed_pairs_lazily(tiny, fitted_folder):
    """Steps that draft nothing do not run the head: their committed pairs wait and are read in one forward by
    the next step that drafts, which then drafts what reading them step by step would have drafted."""
    prompt = PROMPTS[1]
    expected = greedy(tiny, prompt, 40)
    runs = {}
    for name, gain in (("lazy", 0.5), ("eager", 1.5)):
        proposer = EagleProposer(head_path=str(fitted_folder), tree="dynamic", total_token="auto", depth=2, top_k=3,
                                 latency_curve={1: 0.010, 64: 0.0101})
        proposer.setup(as_loaded(tiny))
        script = iter(([True] + [False] * 4) * 20)
        proposer.sizer.should_draft = lambda: next(script)      # the same decisions in both runs
        proposer.sizer.choose = lambda path_probs, draft_seconds: 3
        proposer.sizer.gain = gain                               # < 1: drafting declined lately, reads wait
        queued, drafts, inner = [], [], proposer.propose

        def propose(ctx, inner=inner, proposer=proposer, queued=queued, drafts=drafts):
            queued.append(len(proposer.pending))
            draft = inner(ctx)
            if draft.tokens:
                drafts.append((list(draft.tokens), tuple(draft.parents)))
            return draft

        proposer.propose = propose
        result = decode(tiny, proposer, prompt, 40)
        assert result.token_ids == expected
        runs[name] = (queued, drafts, proposer.committed + sum(len(ids) for _, ids in proposer.pending))
    (lazy_queued, lazy_drafts, lazy_seen), (eager_queued, eager_drafts, eager_seen) = runs["lazy"], runs["eager"]
    assert max(lazy_queued) >= 4 and max(eager_queued) == 0
    assert lazy_drafts == eager_drafts and len(lazy_drafts) >= 3
    assert lazy_seen == eager_seen          # every committed pair is read or queued, none lost or read twice
