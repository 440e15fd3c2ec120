"""Quantized targets: the CPU int8 / NF4 paths keep the harness working and lossless w.r.t. the quantized target."""

import copy
import logging

import pytest
import torch

from harness.engine.acceptance import Sampling
from harness.engine.loop import Draft, Proposer, StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.model.quantization import (WeightOnlyInt8Linear, check_head_quantization, check_quantization, quant_load_kwargs,
                           quantization_signature, quantize_after_load, weight_memory_bytes)
from harness.engine.target import Target
from helpers import decode, greedy, tiny_bench

CPU = torch.device("cpu")


class ReferenceWithErrors(Proposer):
    """Drafts a tree from a known continuation (the quantized vanilla answer): a chain of the next 4 tokens with
    every third one wrong, plus a wrong sibling at the first position, so steps accept partially and fully."""

    def __init__(self, prompt_len: int, reference: list[int]):
        self.prompt_len, self.reference = prompt_len, reference

    def propose(self, ctx):
        start = len(ctx.tokens) - self.prompt_len            # reference index of the first draft token
        chain = self.reference[start:start + 4]
        if not chain:
            return Draft.empty()
        tokens = [(tok + 1) % 256 if (start + i) % 3 == 2 else tok for i, tok in enumerate(chain)]
        wrong_sibling = (chain[0] + 7) % 256
        return Draft(tokens + [wrong_sibling], tuple(range(-1, len(tokens) - 1)) + (-1,))


def _int8_tiny(tiny_llama):
    return quantize_after_load(copy.deepcopy(tiny_llama), "int8", CPU).eval()


def _int4_tiny(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama.save_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32,
                                                 **quant_load_kwargs("int4", CPU, torch.float32))
    return model.eval().requires_grad_(False)


def _vanilla_and_speculative(model, prompt, new_tokens=40):
    vanilla = decode(model, Proposer(), prompt, new_tokens)
    speculative = decode(model, ReferenceWithErrors(len(prompt), vanilla.token_ids), prompt, new_tokens)
    return vanilla, speculative


def test_int8_cpu_keeps_the_target_interface(tiny_llama):
    model = _int8_tiny(tiny_llama)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, WeightOnlyInt8Linear) and isinstance(layer.mlp.down_proj,
                                                                                  WeightOnlyInt8Linear)
    assert layer.mlp.up_proj.weight.dtype == torch.int8
    target = Target(model)                       # body + lm_head + a float mask dtype
    assert type(target.lm_head) is torch.nn.Linear and target.dtype == torch.float32
    # weight-only int8 is close to fp32: same greedy token on a sharpened random model, small logit error
    ids = torch.tensor([list(range(3, 40))])
    error = (model(ids).logits - tiny_llama(ids).logits).abs().max()
    assert 0 < error < 0.2 * tiny_llama(ids).logits.abs().max()


def test_int8_verify_equals_sequential_forwards(tiny_llama):
    """The lossless claim rests on this: a token's logits do not depend on the other tokens in the forward
    (torch.ao dynamic quantization fails it, ~5e-2; weight-only int8 matches fp32's ~1e-6)."""
    model = _int8_tiny(tiny_llama)
    target = Target(model)
    prompt, draft = list(range(10, 30)), [31, 32, 33, 34]
    with torch.inference_mode():
        _, logits = target.prefill(prompt)
        batched = target.verify(int(logits.argmax()), draft, tuple(range(-1, 3))).logits
        target.prefill(prompt)
        single = [target.verify(tok, [], ()).logits[0] for tok in [int(logits.argmax())] + draft]
    torch.testing.assert_close(batched, torch.stack(single), atol=1e-4, rtol=1e-4)


def test_int8_cpu_vanilla_and_tree_proposer_are_token_identical(tiny_llama):
    model = _int8_tiny(tiny_llama)
    prompt = list(range(100, 124))
    vanilla, speculative = _vanilla_and_speculative(model, prompt)
    assert speculative.token_ids == vanilla.token_ids
    assert speculative.steps < vanilla.steps and max(speculative.accepted_lengths) >= 3


def test_int8_cpu_prompt_lookup_is_token_identical(tiny_llama):
    from baselines.pld import PromptLookupProposer

    model = _int8_tiny(tiny_llama)
    prompt = [5, 6, 7, 8] * 6 + list(range(60, 70))
    assert decode(model, PromptLookupProposer(), prompt, 40).token_ids == greedy(model, prompt, 40)


def test_int4_cpu_nf4_via_bitsandbytes_is_lossless_against_itself(tiny_llama, tmp_path):
    model = _int4_tiny(tiny_llama, tmp_path)
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear and Target(model).dtype == torch.float32   # lm_head kept
    vanilla, speculative = _vanilla_and_speculative(model, list(range(40, 64)))
    assert speculative.token_ids == vanilla.token_ids and speculative.steps < vanilla.steps


def test_measured_weight_memory_counts_packed_weights_and_scales(tiny_llama, tmp_path):
    fp32 = weight_memory_bytes(tiny_llama)
    int8 = weight_memory_bytes(_int8_tiny(tiny_llama))
    int4 = weight_memory_bytes(_int4_tiny(tiny_llama, tmp_path))
    assert fp32 > int8 > int4 > 0
    # the plan test checks each against the planner byte for byte; here: scales are not forgotten
    linear_params = sum(m.weight.numel() for m in tiny_llama.model.modules() if isinstance(m, torch.nn.Linear))
    assert int8 - (fp32 - 4 * linear_params) > linear_params                  # int8 bytes + per-row scales
    assert int4 - (fp32 - 4 * linear_params) > linear_params // 2             # 4 bit + absmax per 64


def test_check_quantization_one_line_errors():
    check_quantization("none", CPU)
    check_quantization("int8", CPU)
    with pytest.raises(HarnessError, match="use one of none, int8, int4"):
        check_quantization("int3", CPU)
    with pytest.raises(HarnessError, match="cuda or cpu"):
        check_quantization("int8", torch.device("meta"))


def test_signature_and_head_quantization_warning(caplog):
    signature = quantization_signature({"quantization": "int8"}, "cpu")
    assert signature == {"quantization": "int8", "scheme": "int8-weight-only-per-channel", "lm_head_quantized": False}
    assert quantization_signature({"quantization": "int4"}, "cuda")["scheme"] == "bnb-nf4-blocksize64"
    assert quantization_signature({}, "cpu")["quantization"] == "none"

    class Loaded:
        quantization = "none"

    with caplog.at_level(logging.WARNING, logger="harness.model.quantization"):
        check_head_quantization({"base_quantization": signature}, Loaded())
    assert "quantization=int8 but runs on quantization=none" in caplog.text
    caplog.clear()
    Loaded.quantization = "int8"
    with caplog.at_level(logging.WARNING, logger="harness.model.quantization"):
        check_head_quantization({"base_quantization": signature}, Loaded())
        check_head_quantization({"head_type": "medusa"}, Loaded())        # no record = trained on none
    assert caplog.text.count("trained over a base with quantization=none but runs on quantization=int8") == 1


@pytest.mark.integration
def test_default_model_int8_vanilla_and_pld_are_token_identical(questions_path):
    from baselines.pld import PromptLookupProposer
    from harness.data.questions import load_questions
    from harness.model.loading import load_model
    from conftest import compose_config

    cfg = compose_config("model.quantization=int8", "bench.limit=2", f"bench.path={questions_path}")
    loaded = load_model(cfg.model, "cpu")
    assert loaded.quantization == "int8"
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, WeightOnlyInt8Linear)
    stop = StopCriteria(frozenset(loaded.template.stop_token_ids), max_new_tokens=32)
    target = Target(loaded.model)
    for question in load_questions(cfg.bench)[:2]:
        prompt = loaded.template.encode([(question.turns[0], None)])
        vanilla = decode_turn(target, Proposer(), prompt, Sampling(), stop)
        pld = decode_turn(target, PromptLookupProposer(), prompt, Sampling(), stop)
        assert pld.token_ids == vanilla.token_ids and len(vanilla.token_ids) > 8


def test_bench_records_quantization_and_the_lossless_check_uses_the_same_quantized_vanilla(
        tiny_model_dir, questions_path, tmp_path):
    import json

    runs = {}
    for quantization in ("none", "int8"):
        run_dir = tmp_path / f"vanilla-{quantization}"
        tiny_run(tiny_model_dir, run_dir, questions_path, f"model.quantization={quantization}")
        runs[quantization] = json.loads((run_dir / "run.json").read_text())
    assert runs["int8"]["quantization"] == "int8" and runs["none"]["quantization"] == "none"
    assert 0 < runs["int8"]["weight_memory_bytes"] < runs["none"]["weight_memory_bytes"]
    pld_dir = tmp_path / "pld-int8"
    summary = tiny_run(tiny_model_dir, pld_dir, questions_path, "model.quantization=int8", "method=pld",
                       f"reference={tmp_path / 'vanilla-int8'}")
    assert summary["lossless_rate"] == 1.0


def tiny_run(model_dir, run_dir, questions, *extra):
    return tiny_bench(model_dir, run_dir, questions, "bench.limit=2", "max_new_tokens=12", *extra)
