"""Published checkpoints: synthetic folders in the exact layout of yuhuili/EAGLE-* (config.json +
pytorch_model.bin / model.safetensors, cnets.py key names) and FasterDecoding/medusa-* (config.json +
medusa_lm_head.pt, `{head}.{layer}.linear.*` / `{head}.{layers}.weight`), with tiny dims. The reference
forwards below are written from the published architecture, independently of our head classes."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from baselines.eagle import EagleHead, EagleProposer
from baselines.medusa import MedusaHead, MedusaProposer
from harness.engine.acceptance import Sampling
from harness.bench import build_method
from harness.engine.loop import Proposer, StopCriteria, decode_turn
from harness.infra.errors import HarnessError
from harness.heads.base import BaseHandles
from harness.model.loading import LoadedModel
from baselines.medusa import official_state_dict as medusa_state_dict
from harness.engine.target import Target
from tests.conftest import compose_config, make_tiny_llama

HIDDEN, VOCAB, HEADS, KV_HEADS, INTER = 64, 256, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(seed=0, vocab=VOCAB, hidden=HIDDEN)


def as_loaded(model) -> LoadedModel:
    return LoadedModel("tiny", model, None, None, torch.device("cpu"), torch.float32, "test")


def greedy_reference(model, new_tokens: int) -> list[int]:
    return decode_turn(Target(model), Proposer(), PROMPT, Sampling(),
                       StopCriteria(frozenset(), max_new_tokens=new_tokens)).token_ids


def decode(model, proposer: Proposer, new_tokens: int) -> list[int]:
    return decode_turn(Target(model), proposer, PROMPT, Sampling(), StopCriteria(frozenset(), max_new_tokens=new_tokens)
                       ).token_ids


# ---------------------------------------------------------------------------------------------------- EAGLE

def eagle_checkpoint(model, seed: int = 0, bias: bool = True) -> dict[str, torch.Tensor]:
    """The official cnets.py `Model` state dict (1 layer) with random weights, its embedding copied from the target."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.08):
        return torch.randn(*shape, generator=generator) * scale

    state = {"embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
             "fc.weight": rand(HIDDEN, 2 * HIDDEN),
             "layers.0.self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
             "layers.0.self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
             "layers.0.self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
             "layers.0.self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
             "layers.0.self_attn.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM),
             "layers.0.mlp.gate_proj.weight": rand(INTER, HIDDEN),
             "layers.0.mlp.up_proj.weight": rand(INTER, HIDDEN),
             "layers.0.mlp.down_proj.weight": rand(HIDDEN, INTER),
             "layers.0.post_attention_layernorm.weight": 1.0 + rand(HIDDEN)}
    if bias:
        state["fc.bias"] = rand(HIDDEN)
    return state


def eagle_config(**changes) -> dict:
    """An EAGLE config.json: the target's Llama config with num_hidden_layers = 1 (transformers 4.28 era keys)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "max_position_embeddings": 1024,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": VOCAB, "torch_dtype": "float16",
              "bias": True}
    config.update(changes)
    return config


def write_eagle(folder, state: dict, config: dict, safetensors: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def reference_eagle(state: dict, hidden: torch.Tensor, next_tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """EAGLE-1's draft forward written from cnets.py: fc(cat(embed, feature)) -> attention WITHOUT input norm
    (RoPE theta 10000, rotate_half, causal, grouped KV) -> residual -> post norm -> SiLU MLP -> residual."""
    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    length = hidden.shape[0]
    x = torch.cat([state["embed_tokens.weight"][next_tokens], hidden], -1) @ state["fc.weight"].T
    if "fc.bias" in state:
        x = x + state["fc.bias"]
    q = (x @ state["layers.0.self_attn.q_proj.weight"].T).view(length, HEADS, HEAD_DIM).transpose(0, 1)
    k = (x @ state["layers.0.self_attn.k_proj.weight"].T).view(length, KV_HEADS, HEAD_DIM).transpose(0, 1)
    v = (x @ state["layers.0.self_attn.v_proj.weight"].T).view(length, KV_HEADS, HEAD_DIM).transpose(0, 1)
    angles = torch.arange(length)[:, None].float() * (1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 0), v.repeat_interleave(HEADS // KV_HEADS, 0)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, HIDDEN)
    x = x + attended @ state["layers.0.self_attn.o_proj.weight"].T
    normed = rms(x, state["layers.0.post_attention_layernorm.weight"])
    gate = F.silu(normed @ state["layers.0.mlp.gate_proj.weight"].T) * (normed @ state["layers.0.mlp.up_proj.weight"].T)
    return x + gate @ state["layers.0.mlp.down_proj.weight"].T


@pytest.mark.parametrize("safetensors,bias", [(False, True), (True, False)])
def test_published_eagle_layout_loads_and_computes_the_official_forward(tiny, tmp_path, safetensors, bias):
    state = eagle_checkpoint(tiny, bias=bias)
    folder = write_eagle(tmp_path / "EAGLE-tiny", state, eagle_config(bias=bias), safetensors)
    assert EagleHead.is_published(folder) and not MedusaHead.is_published(folder)
    head = EagleHead.from_official(folder, as_loaded(tiny))
    assert isinstance(head, EagleHead) and head.config["fc_bias"] is bias
    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        hidden = tiny.model(input_ids=ids).last_hidden_state
        predicted, _ = head.unroll(hidden, ids, BaseHandles.of(tiny), steps=1)
    expected = reference_eagle(state, hidden[0, :-1], ids[0, 1:])
    torch.testing.assert_close(predicted[0, 0, :-1], expected, atol=1e-4, rtol=1e-4)


def test_published_eagle_decodes_losslessly_through_the_method_config(tiny, tmp_path):
    folder = write_eagle(tmp_path / "EAGLE-tiny", eagle_checkpoint(tiny), eagle_config())
    expected = greedy_reference(tiny, 40)
    for settings in (dict(official=True, tree="static"), dict(tree="dynamic", total_token=24, depth=3, top_k=4)):
        proposer = EagleProposer(head_path=str(folder), **settings)   # official=false: detected from the folder
        proposer.setup(as_loaded(tiny))
        assert decode(tiny, proposer, 40) == expected


def test_published_eagle_for_another_model_is_refused(tiny, tmp_path):
    state = eagle_checkpoint(tiny)
    state["embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN)
    with pytest.raises(HarnessError, match="another model's embedding"):
        EagleHead.from_official(write_eagle(tmp_path / "other", state, eagle_config()), as_loaded(tiny))
    with pytest.raises(HarnessError, match="hidden_size=128"):
        EagleHead.from_official(write_eagle(tmp_path / "wide", eagle_checkpoint(tiny), eagle_config(hidden_size=128)),
                            as_loaded(tiny))
    state = eagle_checkpoint(tiny)
    del state["layers.0.mlp.up_proj.weight"]
    with pytest.raises(HarnessError, match="does not have the EAGLE layout"):
        EagleHead.from_official(write_eagle(tmp_path / "broken", state, eagle_config()), as_loaded(tiny))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match="no config.json"):
        EagleHead.from_official(tmp_path / "empty", as_loaded(tiny))
    with pytest.raises(HarnessError, match="does not exist"):
        EagleHead.from_official(tmp_path / "missing", as_loaded(tiny))


# ---------------------------------------------------------------------------------------------------- Medusa

def medusa_checkpoint(heads: int, layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`medusa_head.state_dict()` of the official MedusaModel: ResBlocks then each head's own lm_head."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for h in range(heads):
        for layer in range(layers):
            state[f"{h}.{layer}.linear.weight"] = torch.randn(HIDDEN, HIDDEN, generator=generator) * 0.1
            state[f"{h}.{layer}.linear.bias"] = torch.randn(HIDDEN, generator=generator) * 0.1
        state[f"{h}.{layers}.weight"] = torch.randn(VOCAB, HIDDEN, generator=generator)
    return state


def write_medusa(folder, state: dict, heads: int, layers: int, safetensors: bool = False):
    """config.json says `heads`, whatever the weights hold (medusa-vicuna-7b-v1.3's says 2 over 5 stored heads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"medusa_num_heads": heads, "medusa_num_layers": layers,
                                                    "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(folder / "medusa_lm_head.safetensors"))
    else:
        torch.save(state, folder / "medusa_lm_head.pt")
    return folder


@pytest.mark.parametrize("safetensors", [False, True])
def test_published_medusa_layout_maps_onto_medusa_head(tiny, tmp_path, safetensors):
    heads, layers = 3, 2
    state = medusa_checkpoint(heads, layers)
    folder = write_medusa(tmp_path / "medusa-tiny", state, heads, layers, safetensors)
    assert MedusaHead.is_published(folder) and not EagleHead.is_published(folder)
    head = MedusaHead.from_official(folder, as_loaded(tiny))
    assert isinstance(head, MedusaHead) and head.num_positions == heads and head.own_lm_head
    features = torch.randn(5, HIDDEN)
    expected = []
    for h in range(heads):      # Medusa: x + SiLU(W x + b) per block, then the head's own lm_head
        x = features
        for layer in range(layers):
            x = x + F.silu(x @ state[f"{h}.{layer}.linear.weight"].T + state[f"{h}.{layer}.linear.bias"])
        expected.append(x @ state[f"{h}.{layers}.weight"].T)
    with torch.no_grad():
        torch.testing.assert_close(head.logits(features, BaseHandles.of(tiny)), torch.stack(expected))
    mapped = medusa_state_dict(state, heads, layers)
    assert set(mapped) == set(head.state_dict()) and "medusa_head.1.2.weight" in mapped


def test_published_medusa_decodes_losslessly_through_head_path(tiny, tmp_path):
    folder = write_medusa(tmp_path / "medusa-tiny", medusa_checkpoint(4, 1), 4, 1)
    proposer = MedusaProposer(head_path=str(folder), medusa_choices="mc_sim_7b_63", medusa_num_heads=4)
    proposer.setup(as_loaded(tiny))
    assert isinstance(proposer.head, MedusaHead) and proposer.head.num_positions == 4
    assert decode(tiny, proposer, 40) == greedy_reference(tiny, 40)


# FasterDecoding/medusa-vicuna-7b-v1.3 and -13b-v1.3: config.json {"medusa_num_heads": 2, "medusa_num_layers": 1}
# over a medusa_lm_head.pt of 5 heads, keys 0.0.linear.weight, 0.0.linear.bias, 0.1.weight, .., 4.1.weight
# (listed in InternLM/lmdeploy issue #1180); the official loader forces 5 heads, Spec-Bench builds 4.
DEEP_CHOICES = [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]   # 5 deep: every head drafts


def test_published_vicuna_layout_loads_five_heads_and_decodes_losslessly(tiny, tmp_path, caplog):
    folder = write_medusa(tmp_path / "medusa-vicuna-tiny", medusa_checkpoint(5, 1), heads=2, layers=1)
    with caplog.at_level(logging.INFO, logger="baselines.medusa"):
        head = MedusaHead.from_official(folder, as_loaded(tiny))
    assert head.num_positions == 5 and head.own_lm_head
    said = [r.getMessage() for r in caplog.records if "config.json says" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("config.json says 2 heads, the weights hold 5: using 5, as the "
                                               "official loader does")
    expected = greedy_reference(tiny, 40)
    proposer = MedusaProposer(head_path=str(folder), medusa_choices=DEEP_CHOICES, medusa_num_heads=5)
    proposer.setup(as_loaded(tiny))
    assert proposer.head.num_positions == 5 and proposer.used_heads == 5
    assert decode(tiny, proposer, 40) == expected
    # the `medusa_head.` prefix (a state dict saved from the whole model) maps the same way
    prefixed = {f"medusa_head.{key}": value for key, value in medusa_checkpoint(5, 1).items()}
    again = MedusaHead.from_official(write_medusa(tmp_path / "prefixed", prefixed, heads=2, layers=1), as_loaded(tiny))
    features, base = torch.randn(3, HIDDEN), BaseHandles.of(tiny)
    with torch.no_grad():
        torch.testing.assert_close(again.logits(features, base), head.logits(features, base))


def test_method_medusa_num_heads_caps_the_published_heads(tiny, tmp_path, caplog):
    folder = write_medusa(tmp_path / "medusa-vicuna-tiny", medusa_checkpoint(5, 1), heads=2, layers=1)
    expected = greedy_reference(tiny, 40)
    # conf/method/medusa.yaml (medusa_num_heads: 4, mc_sim_7b_63) = Spec-Bench's 4 heads
    proposer = build_method(compose_config("method=medusa", f"method.head_path={folder}").method)
    with caplog.at_level(logging.INFO, logger="baselines.medusa"):
        proposer.setup(as_loaded(tiny))
    assert proposer.head.num_positions == 4 and any("using the first 4 of its 5 heads" in r.getMessage()
                                                    for r in caplog.records)
    assert decode(tiny, proposer, 40) == expected
    full = MedusaHead.from_official(folder, as_loaded(tiny))
    two = MedusaHead.from_official(folder, as_loaded(tiny), max_heads=2)
    assert two.num_positions == 2 and MedusaHead.from_official(folder, as_loaded(tiny), max_heads=9).num_positions == 5
    features, base = torch.randn(3, HIDDEN), BaseHandles.of(tiny)
    with torch.no_grad():         # the first heads, unchanged
        torch.testing.assert_close(two.logits(features, base), full.logits(features, base)[:2])
    with pytest.raises(HarnessError, match="at least 1"):
        MedusaHead.from_official(folder, as_loaded(tiny), max_heads=0)


def test_medusa_heads_are_counted_from_the_weights_and_strays_are_refused(tiny, tmp_path):
    # config.json says 3, the weights hold 2: the weights win
    assert MedusaHead.from_official(write_medusa(tmp_path / "a", medusa_checkpoint(2, 1), 3, 1),
                                as_loaded(tiny)).num_positions == 2
    gap = medusa_checkpoint(4, 1)
    for key in [k for k in gap if k.startswith("2.")]:
        del gap[key]                                          # heads 0, 1, 3
    with pytest.raises(HarnessError, match="lacks 2.0.linear.weight"):
        MedusaHead.from_official(write_medusa(tmp_path / "gap", gap, 4, 1), as_loaded(tiny))
    stray = medusa_checkpoint(5, 1)
    stray["0.1.linear.weight"] = torch.zeros(HIDDEN, HIDDEN)  # a second block that medusa_num_layers=1 does not have
    with pytest.raises(HarnessError, match="does not explain"):
        MedusaHead.from_official(write_medusa(tmp_path / "stray", stray, 2, 1), as_loaded(tiny))
    stray = medusa_checkpoint(2, 1)
    stray["rotary.inv_freq"] = torch.zeros(4)
    with pytest.raises(HarnessError, match=r"does not explain \(\['rotary.inv_freq'\]\)"):
        MedusaHead.from_official(write_medusa(tmp_path / "stray2", stray, 2, 1), as_loaded(tiny))
    misshapen = medusa_checkpoint(5, 1)
    misshapen["4.0.linear.bias"] = torch.zeros(HIDDEN + 1)    # refused even when only 2 heads are used
    with pytest.raises(HarnessError, match=r"medusa_head.4.0.linear.bias has shape \(65,\)"):
        MedusaHead.from_official(write_medusa(tmp_path / "misshapen", misshapen, 2, 1), as_loaded(tiny), max_heads=2)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    torch.save({"0.0.linear.weight": torch.zeros(2, 2)}, tmp_path / "c" / "medusa_lm_head.pt")
    with pytest.raises(HarnessError, match="medusa_num_layers"):
        MedusaHead.from_official(tmp_path / "c", as_loaded(tiny))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"medusa_num_layers": 1}))
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "d" / "medusa_lm_head.pt")
    with pytest.raises(HarnessError, match="holds no Medusa head weights"):
        MedusaHead.from_official(tmp_path / "d", as_loaded(tiny))
