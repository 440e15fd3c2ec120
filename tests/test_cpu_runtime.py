"""The CPU runtime under every method: nn.Linear through oneDNN with packed weights (model.cpu_linear) and the
KV cache written into a growing buffer instead of concatenated (harness/engine/kv.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from conftest import compose_config, make_tiny_llama
from harness.engine.kv import BufferedLayer, new_cache
from harness.engine.target import Target
from harness.engine.tree import compact_cache
from harness.infra.errors import HarnessError
from harness.model.loading import load_model
from harness.model.packing import PackedLinear, pack_linears
from helpers import greedy
from tiny_chat import model_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dtype=torch.float32):
    model = make_tiny_llama(seed=3).to(dtype)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_gives_the_plain_linear_result(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True).to(dtype).requires_grad_(False)
    x = torch.randn(1, 5, 64, dtype=dtype)
    expected = F.linear(x, linear.weight, linear.bias)
    linear.__class__ = PackedLinear
    linear.pack()
    got = linear(x)
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)                 # both are oneDNN: bit-identical
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the packed path does not serve training or autocast: the plain linear of the same weight does
    linear.weight.requires_grad_(True)
    assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


def test_pack_linears_keeps_the_model_object_and_its_weights():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm_head = model.lm_head
    assert pack_linears(model, "auto", torch.device("cpu"), torch.float32) == "onednn"
    assert model.lm_head is lm_head and type(lm_head) is PackedLinear
    assert all(type(m) is not nn.Linear for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_packed_model_decodes_the_same_greedy_tokens():
    prompt = [5, 17, 42, 99, 3, 8]
    plain = greedy(_model(), prompt, 24)
    packed = _model()
    pack_linears(packed, "onednn", torch.device("cpu"), torch.float32)
    assert greedy(packed, prompt, 24) == plain


def test_cpu_linear_choices_and_refusals():
    model = _model()
    assert pack_linears(model, "off", torch.device("cpu"), torch.float32) == "default"
    assert all(type(m) is not PackedLinear for m in model.modules())
    with pytest.raises(HarnessError, match="model.cpu_linear=fast is not one of auto, onednn, off"):
        pack_linears(model, "fast", torch.device("cpu"), torch.float32)
    with pytest.raises(HarnessError, match="model.quantization=int8 has its own kernels; use model.cpu_linear=auto"):
        pack_linears(model, "onednn", torch.device("cpu"), torch.float32, "int8")
    assert pack_linears(_model(torch.float16), "auto", torch.device("cpu"), torch.float16) == "default"
    with pytest.raises(HarnessError, match="float16 is not fp32 or bf16"):
        pack_linears(_model(torch.float16), "onednn", torch.device("cpu"), torch.float16)


def test_auto_skips_packing_when_the_copy_would_not_fit(monkeypatch):
    from harness.model import packing

    monkeypatch.setattr(packing, "_available_bytes", lambda: 1000)
    model = _model()
    assert pack_linears(model, "auto", torch.device("cpu"), torch.float32) == "default"
    assert pack_linears(model, "onednn", torch.device("cpu"), torch.float32) == "onednn"   # asked for: done


def test_load_model_applies_model_cpu_linear(chat_model):
    cfg = compose_config(*model_overrides(chat_model)).model
    loaded = load_model(cfg, "cpu")
    assert loaded.linear == "onednn" and type(loaded.model.lm_head) is PackedLinear
    cfg.cpu_linear = "off"
    loaded = load_model(cfg, "cpu")
    assert loaded.linear == "default" and type(loaded.model.lm_head) is nn.Linear


def _cache_tensors(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def test_buffered_cache_holds_what_concatenation_holds_through_verifies_and_compaction():
    model = _model()
    config = model.config
    caches = {"cat": DynamicCache(config=config), "buffered": new_cache(config)}
    assert all(type(layer) is BufferedLayer for layer in caches["buffered"].layers)
    torch.manual_seed(1)
    kv = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    steps = [(300, None), (4, [0, 2]), (6, [0, 1, 2]), (3, [0]), (200, [0, 5, 9])]   # the first grows the buffer
    for n, keep in steps:
        new = [(torch.randn(1, kv, n, head_dim), torch.randn(1, kv, n, head_dim)) for _ in range(config.num_hidden_layers)]
        for cache in caches.values():
            past = cache.get_seq_length()
            for i, (k, v) in enumerate(new):
                cache.layers[i].update(k, v)
            if keep is not None:
                compact_cache(cache, past, keep)
        for (k1, v1), (k2, v2) in zip(_cache_tensors(caches["cat"]), _cache_tensors(caches["buffered"])):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
    layer = caches["buffered"].layers[0]
    assert layer.keys.data_ptr() == layer.key_buffer.data_ptr() and layer.key_buffer.shape[-2] >= 256


def test_buffered_layer_adopts_keys_replaced_from_outside():
    layer = BufferedLayer()
    k = torch.randn(1, 2, 5, 4)
    layer.update(k, k + 1)
    layer.keys, layer.values = torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4)    # e.g. a library's own crop
    keys, values = layer.update(k[..., :1, :], k[..., :1, :])
    assert keys.shape[-2] == 4 and torch.equal(keys[..., :3, :], torch.zeros(1, 2, 3, 4))
    assert torch.equal(values[..., 3:, :], k[..., :1, :])
    assert keys.data_ptr() == layer.key_buffer.data_ptr()


def test_target_uses_the_buffered_cache_and_matches_generate():
    model = _model()
    target = Target(model)
    target.prefill([1, 2, 3])
    assert all(type(layer) is BufferedLayer for layer in target.cache.layers)
    prompt = [5, 17, 42, 99]
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy(model, prompt, 12) == ids


def test_buffer_never_doubles_past_the_model_context():
    model = _model()                                   # max_position_embeddings 1024
    cache = new_cache(model.config)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 700, 16)
    layer.update(k, k)
    assert layer.key_buffer.shape[-2] == 1024
    layer.update(k[..., :400, :], k[..., :400, :])      # past the context: grows to exactly what is needed
    assert layer.keys.shape[-2] == 1100 and layer.key_buffer.shape[-2] == 1100


def test_a_packed_model_deep_copies_and_quantizes():
    import copy

    from harness.model.quantization import quantize_after_load

    model = _model()
    pack_linears(model, "onednn", torch.device("cpu"), torch.float32)
    clone = copy.deepcopy(model)
    assert type(clone.lm_head) is PackedLinear and clone.lm_head.packed_weight is not model.lm_head.packed_weight
    x = torch.randn(1, 3, 64)
    assert torch.equal(clone.lm_head(x), model.lm_head(x))
    int8 = quantize_after_load(clone, "int8", torch.device("cpu"))
    assert not any(type(m) in (nn.Linear, PackedLinear) for m in int8.model.layers.modules())
