"""The memory planner: hand-computed numbers, exact weight bytes against loaded models, refusal before loading."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from harness.infra.errors import HarnessError
from harness.engine.loop import Proposer
from harness.plan import (Architecture, estimate, head_parameters, method_class, method_verify_tokens, parse_memory,
                          plan_from_config, read_architecture, run_plan, weight_bytes)
from harness.model.quantization import quant_load_kwargs, quantize_after_load, weight_memory_bytes

# conftest.make_tiny_llama's shape
TINY = Architecture(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=1024,
                    tie_word_embeddings=False, attention_bias=False, mlp_bias=False, source="test")


def test_tiny_config_matches_hand_computed_bytes():
    # Linear params per layer: q 64x64 + k 32x64 + v 32x64 + o 64x64 + gate/up 128x64 + down 64x128 = 36864;
    # 2 layers = 73728. Rows (out features) per layer: 64+32+32+64+128+128+64 = 512.
    # Rest: embed 256x64 + lm_head 256x64 + norms (2*2+1)x64 = 33088 params, + rotary 2 x 8 fp32 = 64 bytes.
    assert weight_bytes(TINY, "none", 4, "cpu") == (73728 * 4, 33088 * 4 + 64)            # 294912, 132416
    assert weight_bytes(TINY, "int8", 4, "cpu") == (73728 + 2 * 512 * 4, 132416)           # 77824
    # NF4: 73728 / 2 packed + blocks of 64 per layer (64+32+32+64+128+128+128 = 576) x 2 x fp32 + 14 code tables
    assert weight_bytes(TINY, "int4", 4, "cpu") == (36864 + 1152 * 4 + 14 * 64, 132416)    # 42368
    assert weight_bytes(TINY, "int8", 2, "cuda") == (73728 + 1024 * 4, 33088 * 2 + 64)     # LLM.int8: fp32 SCB

    rows = {r.component: r.bytes for r in estimate(TINY, quantization="none", dtype="fp32", device="cpu",
                                                   max_seq_len=100, tree_size=4)}
    assert rows["KV cache"] == 2 * 2 * 2 * 16 * 104 * 4 == 53248                               # K,V x layers x kv x hd x tokens
    # prefill 100: (5*100*64 + 2*100*32 + 3*100*128 + 2*4*100*100) * 4 + last logits 256 * (4 + 4) = 629248
    # verify 4 over 104 keys: (5*4*64 + 2*4*32 + 3*4*128 + 2*4*4*104) * 4 + 4*256*8 = 33792 -> prefill wins
    assert rows["activations + logits (peak forward)"] == 629248
    # model.cpu_linear (auto) on the CPU: a oneDNN-layout copy of every Linear + the lm_head (256 x 64 fp32)
    assert rows["weights: packed copy for oneDNN (model.cpu_linear)"] == 294912 + 256 * 64 * 4 == 360448
    assert sum(rows.values()) == 427328 + 360448 + 53248 + 629248                           # no CUDA overhead on CPU
    off = estimate(TINY, quantization="none", dtype="fp32", device="cpu", max_seq_len=100, tree_size=4,
                   cpu_linear="off")
    assert sum(r.bytes for r in off) == 427328 + 53248 + 629248
    assert not any("packed" in r.component for r in estimate(TINY, quantization="int8", dtype="fp32", device="cpu"))
    # a frozen head beside the packed target is packed too (pack_frozen_head): its copy is a row of its own
    headed = {r.component: r.bytes for r in estimate(TINY, dtype="fp32", device="cpu", head_params=1000,
                                                     head_type="eagle")}
    assert headed["draft head (eagle)"] == headed["draft head: packed copy for oneDNN"] == 4000
    assert not any("head: packed" in r.component for r in estimate(TINY, dtype="fp32", device="cpu", head_params=1000,
                                                                   head_type="eagle", cpu_linear="off"))

    cuda = {r.component: r.bytes for r in estimate(TINY, dtype="fp16", device="cuda", max_seq_len=100, tree_size=4,
                                                   overhead_gib=0.5, overhead_fraction=0.1)}
    subtotal = sum(v for k, v in cuda.items() if not k.startswith("CUDA"))
    assert cuda["CUDA context + allocator overhead"] == int(0.5 * 1024 ** 3 + 0.1 * subtotal)


def test_training_rows_and_head_size():
    medusa = OmegaConf.create({"name": "medusa", "_target_": "baselines.medusa.MedusaProposer",
                               "medusa_choices": "mc_cpu_5", "medusa_num_heads": 1, "medusa_num_layers": 1,
                               "own_lm_head": False})
    assert head_parameters(medusa, TINY) == ("medusa", 64 * 64 + 64, 1)                     # one ResBlock
    medusa.own_lm_head = True
    assert head_parameters(medusa, TINY)[1] == 64 * 64 + 64 + 64 * 256                      # + its own lm_head
    rows = {r.component: r.bytes for r in estimate(TINY, dtype="fp32", device="cpu", mode="train", max_seq_len=8,
                                                   batch_size=2, head_params=100, head_type="medusa",
                                                   head_positions=3)}
    assert "KV cache" not in rows
    assert rows["draft head (medusa)"] == 100 * 4 and rows["head gradients + AdamW state"] == 100 * 12
    assert rows["head activations + logits (train)"] == 3 * 16 * (256 * 12 + 64 * 16)


def test_known_architectures_and_method_sizes():
    counts = {name: read_architecture(OmegaConf.create({"name": name})).parameters()
              for name in ("llama2-7b-chat", "vicuna-13b-v1.3", "llama2-70b-chat")}
    # the published parameter counts of Llama-2-7B / 13B / 70B (Hugging Face model cards' safetensors totals)
    assert counts == {"llama2-7b-chat": 6_738_415_616, "vicuna-13b-v1.3": 13_015_864_320,
                      "llama2-70b-chat": 68_976_648_192}
    assert method_verify_tokens(compose_config("method=vanilla").method) == 1
    assert method_verify_tokens(compose_config("method=pld").method) == 11                 # root + 10
    assert method_verify_tokens(compose_config("method=medusa").method) == 64              # root + 63 nodes
    assert parse_memory("32GB") == 32 * 1024 ** 3 and parse_memory("500MiB") == 500 * 1024 ** 2
    with pytest.raises(HarnessError, match="gpu_memory=32GB"):
        parse_memory("lots")


# verify tokens per shipped method config, as the planner computed them when it dispatched on class names
# (ours_auto crashed there; it now plans its auto_max_tokens)
VERIFY_TOKENS = {"vanilla": 1, "hf_generate": 1, "hf_prompt_lookup": 11, "pld": 11, "pld_cpu": 11, "pld_specbench": 11,
                 "sps": 6, "early_exit": 13, "lookahead": 121, "lookahead_cpu": 9, "lookahead_specbench": 57,
                 "medusa": 64, "medusa_typical": 64, "medusa_cpu": 6, "medusa1_cpu": 6, "medusa_cpu_auto": 64,
                 "eagle": 26, "eagle2": 60, "eagle2_cpu": 16, "ours": 5, "ours_no_trigram": 5, "ours_auto": 16,
                 "ours_tree": 60}
HEAD_TYPES = {"medusa": "medusa", "medusa_typical": "medusa", "medusa_cpu": "medusa", "medusa1_cpu": "medusa",
              "medusa_cpu_auto": "medusa", "eagle": "eagle", "eagle2": "eagle", "eagle2_cpu": "eagle", "ours": "ours",
              "ours_no_trigram": "ours", "ours_auto": "ours", "ours_tree": "ours"}


def test_every_method_states_its_verify_size_and_head_type():
    from harness import CONF_DIR

    assert sorted(VERIFY_TOKENS) == sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
    for name, tokens in VERIFY_TOKENS.items():
        method = compose_config(f"method={name}").method
        assert method_verify_tokens(method) == tokens, name
        assert method_class(method).head_type == HEAD_TYPES.get(name), name
    overrides = {("sps", "method.adaptive_k=true"): 17, ("early_exit", "method.adaptive_k=false"): 7,
                 ("pld", "method.max_matches=3"): 31, ("hf_generate", "method.assistant_model=x"): 21,
                 ("hf_generate", "method.num_assistant_tokens=7 method.assistant_model=x"): 8,
                 ("lookahead", "method.level=3"): 61, ("eagle", "method.tree_choices=eagle_cpu_5"): 6,
                 ("ours", "method.draft=beam"): 17, ("ours", "method.draft=tree method.depth=3"): 13,
                 ("ours", "method.depth=3"): 4, ("ours", "method.max_nodes=5"): 6, ("medusa", "+method.tree_size=9"): 9}
    for (name, override), tokens in overrides.items():
        assert method_verify_tokens(compose_config(f"method={name}", *override.split()).method) == tokens, override


class SelfSized(Proposer):
    """A method the planner has never heard of: it must answer from the class itself."""

    head_type = "medusa"

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        return 2 + int(cls.config_value(cfg, "width"))

    def __init__(self, width: int = 3):
        self.width = width


class Unsized:
    pass


def test_the_planner_asks_the_method_class():
    method = OmegaConf.create({"name": "self_sized", "_target_": f"{__name__}.SelfSized"})
    assert method_verify_tokens(method) == 5                                   # the constructor's default width
    method.width = 7
    assert method_verify_tokens(method) == 9 and method_class(method) is SelfSized
    assert method_verify_tokens(OmegaConf.create({"name": "bare"})) == 1       # no _target_: vanilla
    for target, words in [(f"{__name__}.Unsized", "does not say its verify size"),
                          ("baselines.nowhere.Proposer", "names no importable class")]:
        with pytest.raises(HarnessError, match=words) as error:
            method_verify_tokens(OmegaConf.create({"name": "broken", "_target_": target}))
        assert "\n" not in str(error.value)


def test_weight_estimate_equals_measured_on_the_tiny_model(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    assert weight_memory_bytes(tiny_llama) == sum(weight_bytes(TINY, "none", 4, "cpu"))
    int8 = quantize_after_load(copy.deepcopy(tiny_llama), "int8", torch.device("cpu"))
    assert weight_memory_bytes(int8) == sum(weight_bytes(TINY, "int8", 4, "cpu"))
    tiny_llama.save_pretrained(tmp_path / "tiny")
    int4 = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32,
                                                **quant_load_kwargs("int4", torch.device("cpu"), torch.float32))
    assert weight_memory_bytes(int4) == sum(weight_bytes(TINY, "int4", 4, "cpu"))


def test_planner_refuses_before_any_weights_load(monkeypatch, questions_path, tmp_path, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded for a config that cannot fit")

    monkeypatch.setattr("harness.model.loading.load_model", no_loading)
    monkeypatch.setattr("harness.bench.load_model", no_loading)
    cfg = compose_config("model=vicuna-13b-v1.3", "gpu_memory=16GB", "method=medusa", config_name="plan")
    assert run_plan(cfg) == 2
    out, err = capsys.readouterr()
    assert "DOES NOT FIT" in out and len(err.strip().splitlines()) == 1 and "model.quantization=int8" in err
    cfg.model.quantization = "int4"
    assert run_plan(cfg) == 0 and "fits - needs" in capsys.readouterr().out

    from harness.bench import run_bench

    bench_cfg = compose_config("model=vicuna-13b-v1.3", "logger=none", "plan.gpu_memory=16GB", "device=cuda",
                               f"bench.path={questions_path}", "bench.limit=1")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # as on the GPU machine the plan is for
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(HarnessError, match="DOES NOT FIT.*model.quantization=int8 or int4") as info:
        run_bench(bench_cfg, tmp_path / "run")
    assert "\n" not in str(info.value)


def test_default_model_architecture_without_weights():
    arch = read_architecture(compose_config().model)
    assert (arch.hidden_size, arch.num_hidden_layers, arch.num_key_value_heads, arch.vocab_size) == (576, 30, 3, 49152)
    assert arch.tie_word_embeddings and arch.parameters() == 134_515_008


@pytest.mark.integration
def test_default_model_weights_exact(default_model):
    cfg = compose_config()
    arch = read_architecture(cfg.model)
    assert weight_memory_bytes(default_model.model) == sum(weight_bytes(arch, "none", 4, "cpu"))
    int8 = quantize_after_load(copy.deepcopy(default_model.model), "int8", torch.device("cpu"))
    assert weight_memory_bytes(int8) == sum(weight_bytes(arch, "int8", 4, "cpu"))
    plan = plan_from_config(compose_config("device=cpu", "max_seq_len=512", config_name="plan"))
    assert plan.rows[0].bytes + plan.rows[1].bytes == weight_memory_bytes(default_model.model)


# Run in a fresh interpreter: peak RSS (VmHWM, reset via /proc/self/clear_refs) of one vanilla turn after the
# model is loaded and warmed up, against the planner's run-time rows (KV cache + activations + logits).
RSS_SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, re, sys, torch
    sys.path.insert(0, sys.argv[1])
    from conftest import compose_config
    from harness.engine.acceptance import Sampling
    from harness.engine.loop import Proposer, StopCriteria, decode_turn
    from harness.model.loading import load_model
    from harness.plan import estimate, read_architecture
    from harness.engine.target import Target

    # no transparent huge pages: with THP "always" a mapping's RSS rounds up to 2 MiB pages (kernel setting, not ours)
    ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)   # PR_SET_THP_DISABLE

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    quantization, prompt_len, new_tokens = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cfg = compose_config(f"model.quantization={quantization}")
    loaded = load_model(cfg.model, "cpu")
    target = Target(loaded.model)
    prompt = list(range(1000, 1000 + prompt_len))
    decode_turn(target, Proposer(), prompt[:16], Sampling(), StopCriteria(frozenset(), max_new_tokens=4))
    target.cache = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)           # hand freed heap back, so the run's pages are new pages
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")      # reset the peak RSS to the current RSS
    decode_turn(target, Proposer(), prompt, Sampling(), StopCriteria(frozenset(), max_new_tokens=new_tokens))
    growth = status("VmHWM") - before
    rows = estimate(read_architecture(cfg.model), quantization=quantization, dtype="fp32", device="cpu",
                    max_seq_len=prompt_len + new_tokens, tree_size=1)
    print(json.dumps({"growth": growth, "estimate": sum(r.bytes for r in rows if not r.component.startswith("weights")),
                      "threads": torch.get_num_threads(), "rss_before": before}))   # the last two: for a failure's message
""")


@pytest.mark.integration
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_peak_rss_growth_of_a_run_is_within_the_estimate(quantization):
    """The estimate must bound the run's live memory from above without being useless: measured / estimated
    in [0.45, 1.0]. Measured here 0.64 (fp32) and 0.61 (int8) at a 512-token prompt. The estimate is a deliberate
    upper bound: it counts the eager attention path's heads x T x S scores (10.6 MB at 544 tokens), which CPU
    SDPA's fused kernel never materialises, and every activation of the widest layer as live at once."""
    from conftest import REPO_ROOT

    # RSS must follow the live tensors, not the heap's history. Every block of 128 KiB or more gets its own
    # mapping, returned to the kernel when freed (a fixed threshold also stops glibc raising it after frees), so
    # the peak is the live peak: with glibc's default heap it read 0.93-1.17x (fp32) and 0.95-2.24x (int8) on
    # different machines, fragmentation included. One arena: memory freed by one intra-op thread is reused by
    # the others.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(REPO_ROOT / "tests"), quantization, "512", "32"],
                         capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["growth"] / result["estimate"]
    assert 0.45 <= ratio <= 1.0, result
