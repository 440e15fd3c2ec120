"""Issue 15 item 6: a target spread over several GPUs (`model.device_map`, EAGLE's fp16 70B setting), the heads
beside its lm_head, and the planner's per-GPU verdict. No GPU here: the loader's arguments, the clock's
synchronisation, the per-device cache index and the planner are checked by hand; the spread itself runs in
the GPU check script (scripts/gpu_check.sh)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from harness.engine.loop import Clock
from harness.engine.tree import compact_cache
from harness.heads.base import BaseHandles, DeviceBridge
from harness.infra.errors import HarnessError
from harness.model import loading
from harness.plan import GIB, plan_from_config


def test_the_70b_preset_is_fp16_over_gpus_and_plans_per_gpu():
    cfg = compose_config("experiment=gpu_llama2_70b", "method=eagle2", "plan.gpus=2", "plan.gpu_memory=80GB",
                         "device=cuda")
    assert cfg.model.device_map == "auto" and cfg.model.quantization == "none"
    plan = plan_from_config(cfg)
    one = plan_from_config(compose_config("experiment=gpu_llama2_70b", "method=eagle2", "plan.gpus=1",
                                          "plan.gpu_memory=80GB", "device=cuda"))
    rows = {r.component: r.bytes for r in plan.rows}
    single = {r.component: r.bytes for r in one.rows}
    # the layer split halves the decoder weights and the KV cache; the rest stays whole on the heaviest GPU
    assert rows["weights: decoder Linear layers"] == -(-single["weights: decoder Linear layers"] // 2)
    assert rows["KV cache"] == -(-single["KV cache"] // 2)
    for name in ("weights: embeddings, lm_head, norms", "draft head (eagle)", "activations + logits (peak forward)"):
        assert rows[name] == single[name]
    overhead = rows["CUDA context + allocator overhead"]
    rest = sum(v for k, v in rows.items() if k != "CUDA context + allocator overhead")
    assert overhead == int(1.0 * GIB + 0.05 * rest)
    assert plan.fits and not one.fits and plan.gpus == 2          # fp16 70B: 2 x 80 GB yes, one card no
    assert "per GPU on each of 2 GPUs" in plan.verdict() and "on one" in plan.title


def test_bad_gpus_is_one_line():
    cfg = compose_config("plan.gpus=0", "plan.gpu_memory=80GB", "device=cuda")
    with pytest.raises(HarnessError, match="gpus=0 must be an integer >= 1"):
        plan_from_config(cfg)


def test_device_map_reaches_from_pretrained_and_the_model_is_not_moved(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained
    seen = {}

    def spread(source, **kwargs):
        seen.update(kwargs)
        model = real(source, dtype=torch.float32)
        model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}
        model.to = lambda *a, **k: pytest.fail("a model placed by device_map must not be moved")
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spread)
    cfg = OmegaConf.merge(compose_config().model, {"path": str(tiny_model_dir), "device_map": "auto",
                                                   "max_memory": {0: "70GiB", 1: "75GiB"}, "gguf": None})
    loaded = loading.load_model(cfg, "cuda")
    assert seen["device_map"] == "auto" and seen["max_memory"] == {0: "70GiB", 1: "75GiB"}
    assert loaded.head_device == loaded.model.get_output_embeddings().weight.device


def test_device_map_is_refused_on_the_cpu_and_when_misspelled():
    cfg = OmegaConf.create({"name": "m", "device_map": "auto"})
    with pytest.raises(HarnessError, match="drop model.device_map"):
        loading.placement_kwargs(cfg, torch.device("cpu"))
    with pytest.raises(HarnessError, match="must be auto, balanced"):
        loading.placement_kwargs(OmegaConf.create({"device_map": "everywhere"}), torch.device("cuda"))
    assert loading.placement_kwargs(OmegaConf.create({"device_map": None}), torch.device("cuda")) == {}
    mapping = loading.placement_kwargs(OmegaConf.create({"device_map": {"": 1}}), torch.device("cuda"))
    assert mapping == {"device_map": {"": 1}}


def test_the_clock_waits_for_every_gpu_the_model_uses_and_no_other(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda index=None: synced.append(index))
    Clock([torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 2)])()
    assert synced == [0, 2]                       # a spread model: its GPUs, once each; GPU 1 is not touched
    synced.clear()
    Clock(torch.device("cuda"))()
    assert synced == [None]                       # one device: the current one, as before
    synced.clear()
    Clock([torch.device("cpu")])()
    Clock(torch.device("cpu"))()
    assert synced == []


class _Layer:
    def __init__(self, keys):
        self.keys, self.values = keys, keys.clone()


def test_compacting_keeps_the_rows_and_copies_the_index_only_for_another_device(monkeypatch):
    moved = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        moved.append(args[0] if args else kwargs.get("device"))
        return real_to(self, *args, **kwargs)

    keys = torch.arange(2 * 6, dtype=torch.float32).reshape(1, 1, 6, 2)
    cache = type("Cache", (), {"layers": [_Layer(keys.clone()), _Layer(keys.clone())]})()
    monkeypatch.setattr(torch.Tensor, "to", spy)
    compact_cache(cache, 2, [0, 2, 3])
    monkeypatch.undo()
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 5
        assert layer.keys[0, 0, :, 0].tolist() == [0.0, 2.0, 4.0, 8.0, 10.0]   # rows 0, 1, then 2, 4, 5
    assert moved == []          # one device: the index is reused, never copied


def test_heads_read_the_embedding_through_a_bridge_only_when_it_lives_elsewhere(tiny_llama):
    handles = BaseHandles.of(tiny_llama)
    assert handles.embed is tiny_llama.get_input_embeddings()          # same device: the module itself
    bridge = DeviceBridge(tiny_llama.get_input_embeddings(), torch.device("cpu"))
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(bridge(ids), tiny_llama.get_input_embeddings()(ids))
