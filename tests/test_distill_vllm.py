"""specdec-distill's vLLM backend (against a stub with vLLM's interface; the real one where it is installed),
self-written prompts (Magpie) with their filters, and the parquet dataset training reads."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from harness import distill
from harness.distill import run_distill
from harness.data.backends import Completion, HFBackend
from harness.infra.errors import HarnessError
from harness.model.loading import load_model
from harness.data.self_prompts import EvalOverlap, NearDuplicates, open_user_turn, user_turn_stops
from harness.data.sharegpt import JsonlLog
from harness.data.token_data import TokenDataset, read_parquet, sha256_of
from harness.data.examples import ConversationDataset
from helpers import MT_BENCH_81, distill_cfg, sharegpt_input

STUB = Path(__file__).with_name("stub_vllm")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def stub_vllm(monkeypatch, tmp_path):
    """The vLLM worker runs under this Python with the stub `vllm` first on its path."""
    log = tmp_path / "engines.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STUB), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("STUB_VLLM_LOG", str(log))
    return log


def test_vllm_backend_gives_the_hf_backends_greedy_answers(chat_model, questions_path, tmp_path, stub_vllm,
                                                           monkeypatch):
    data = sharegpt_input(tmp_path / "in.json", count=4)
    common = [f"data_path={data}", "max_length=80", "max_new_tokens=10"]
    hf = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *common, f"out_dir={tmp_path / 'hf'}"))
    vllm = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *common, f"out_dir={tmp_path / 'vllm'}",
                                   "backend=vllm", f"vllm.python={sys.executable}", "vllm.tensor_parallel_size=2",
                                   "+vllm.engine_kwargs.gpu_memory_utilization=0.5", "in_flight=3"))
    assert vllm["backend"] == "vllm" and vllm["vllm_version"] == "0.0-stub" and vllm["conversations"] == 4
    by_id = {r["id"]: r for r in JsonlLog(hf["file"]).records()}
    for record in JsonlLog(vllm["file"]).records():
        twin = by_id[record["id"]]
        assert record["conversations"] == twin["conversations"]
        assert record["input_ids"] == twin["input_ids"] and record["answer_spans"] == twin["answer_spans"]
    engine = json.loads(stub_vllm.read_text().splitlines()[0])   # one engine for the whole job, as asked
    assert len(stub_vllm.read_text().splitlines()) == 1
    assert engine["tensor_parallel_size"] == 2 and engine["max_model_len"] == 80
    assert engine["gpu_memory_utilization"] == 0.5 and engine["model"] == str(chat_model)
    assert engine["threads_bind"] is None          # tensor parallelism: vLLM splits the cores per rank itself
    assert engine["top_p_rows_only"] == "1"        # the sampler patch asked for (vllm.top_p_rows_only, default)
    meta = json.loads((tmp_path / "vllm" / "shard-00000-of-00001.meta.json").read_text())
    assert meta["backend_info"] == {"vllm": "0.0-stub"} and meta["stats"][0]["tokens_per_s_now"] > 0
    assert len(meta["stats"]) == 1 and meta["stats"][0]["finished"]    # one entry per run, updated in place

    # a run that continues a shard (or extends a dataset) seeds its engine apart from the first run: the CPU build
    # has no per-request seeds, and the first run's seed would replay its sampled user turns
    # (and vllm.top_p_rows_only=false wins over a SPECDEC_VLLM_TOP_P_ROWS_ONLY=1 the shell exported)
    monkeypatch.setenv("SPECDEC_VLLM_TOP_P_ROWS_ONLY", "1")
    data = sharegpt_input(tmp_path / "in.json", count=6)
    again = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *common[1:], f"data_path={data}",
                                    f"out_dir={tmp_path / 'vllm'}", "backend=vllm", f"vllm.python={sys.executable}",
                                    "vllm.tensor_parallel_size=2", "+vllm.engine_kwargs.gpu_memory_utilization=0.5",
                                    "vllm.top_p_rows_only=false"))
    assert json.loads(stub_vllm.read_text().splitlines()[1])["top_p_rows_only"] == "0"
    seeds = [json.loads(line)["seed"] for line in stub_vllm.read_text().splitlines()]
    assert again["written_now"] == 2 and seeds[0] == 0 and seeds[1] == distill.engine_seed(0, 4) != 0
    assert again["engine_seed"] == seeds[1] and distill.engine_seed(0, 4) == distill.engine_seed(0, 4)


def test_vllm_backend_without_its_environment_is_one_line(chat_model, questions_path, tmp_path):
    data = sharegpt_input(tmp_path / "in.json", count=1)
    cfg = distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "backend=vllm",
                      f"vllm.python={tmp_path / 'nowhere' / 'python'}")
    with pytest.raises(HarnessError, match="make distill-env"):
        run_distill(cfg)
    assert JsonlLog(tmp_path / "out" / "shard-00000-of-00001.jsonl").records() == []


def test_a_vllm_worker_that_dies_is_reported_with_its_log(chat_model, questions_path, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    (broken / "vllm").mkdir(parents=True)
    (broken / "vllm" / "__init__.py").write_text("raise ImportError('no CUDA and no CPU build here')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken))
    data = sharegpt_input(tmp_path / "in.json", count=1)
    cfg = distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "backend=vllm",
                      f"vllm.python={sys.executable}")
    with pytest.raises(HarnessError, match="vLLM could not start: ImportError: no CUDA and no CPU build here"):
        run_distill(cfg)


class CannedUsers(HFBackend):
    """The tiny model answers; user turns come from a list (a random tiny model writes no requests)."""

    def __init__(self, loaded, template, users):
        super().__init__(loaded, 1)
        self.prefix = template.tokenizer(open_user_turn(template, []), add_special_tokens=False).input_ids
        self.users, self.user_calls = list(users), 0

    def _one(self, prompt, param):
        if param.temperature == 1.0:                 # Magpie's sampling: a user turn is asked for
            self.user_calls += 1
            text = self.users.pop(0)
            return Completion(self.loaded.tokenizer(text, add_special_tokens=False).input_ids
                              + [self.loaded.tokenizer.eos_token_id], "stop")
        return super()._one(prompt, param)


def test_self_written_prompts_are_filtered_and_get_second_turns(chat_model, questions_path, tmp_path, monkeypatch):
    eval_question = "tell me about the sun and the moon and the star in the night sky please"
    questions = tmp_path / "mt_bench.jsonl"     # an MT-Bench question in the tiny model's words
    questions.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": [eval_question]}) + "\n")
    users = ["tell me about the red car and the blue house please",      # self-0 ...
             "tell me about the red car and the blue house please !",    # a near-duplicate of the first
             eval_question.replace("please", "now"),                     # the benchmark itself, nearly
             "why ?",                                                     # too short
             "what is the colour of the sea at night and why is it so",
             "how long is the river near the old city"]
    backends = []

    def fake_backend(cfg, out_dir, shard_name, done=0):
        loaded = load_model(cfg.model, cfg.device)
        backends.append(CannedUsers(loaded, loaded.template, users + ["and the sun ? tell me about it"] * 20))
        return backends[-1], loaded.template

    monkeypatch.setattr(distill, "make_backend", fake_backend)
    cfg = distill_cfg(chat_model, questions, tmp_path, "prompts=self", "self_prompts.count=6",
                      "self_prompts.second_turn_fraction=0.5", "max_length=96", "max_new_tokens=6", "in_flight=6")
    summary = run_distill(cfg)
    records = {r["id"]: r for r in JsonlLog(summary["file"]).records()}
    assert len(records) == 6
    dropped = {k: r["skipped"] for k, r in records.items() if r.get("skipped")}
    assert sorted(dropped.values()) == ["self-written prompt dropped: eval_overlap",
                                        "self-written prompt dropped: near_duplicate",
                                        "self-written prompt dropped: too_short"]
    kept = [r for r in records.values() if not r.get("skipped")]
    assert {r["source"] for r in kept} == {"self"} and len(kept) == 3
    assert summary["self_prompts_now"]["dropped"] == {"near_duplicate": 1, "eval_overlap": 1, "too_short": 1}
    planned = {c.id: c.planned_turns for c in distill.self_conversations(cfg)}
    for record in kept:   # a conversation planned with two turns got a written second turn and its answer
        assert len(record["new_tokens"]) == planned[record["id"]]
        if planned[record["id"]] == 2:
            assert record["conversations"][2]["value"] == "and the sun ? tell me about it"
    assert 0 < sum(p == 2 for p in planned.values()) < 6

    # a larger count extends the dataset: the same folder resumes, the first six are not redone
    extended = _with(cfg, self_prompts={**cfg.self_prompts, "count": 7})
    backends.clear()
    assert run_distill(extended)["written_now"] == 1 and backends[0].user_calls >= 1
    assert JsonlLog(summary["file"]).records()[:6] == list(records.values())
    cfg = extended

    with open_dict(cfg):   # merge: parquet + manifest, the skipped ones left out
        cfg.merge, cfg.output, cfg.eval_fraction = True, str(tmp_path / "out" / "d.parquet"), 0.0
    merged = run_distill(cfg)
    manifest = json.loads(Path(merged["manifest"]).read_text())
    assert manifest["counts"]["all"]["conversations"] == 3 + (not records_7_skipped(summary["file"]))
    assert manifest["prompts"] == "self"
    assert manifest["files"]["all"]["sha256"] == sha256_of(merged["output"])
    kept = [r for r in JsonlLog(summary["file"]).records() if not r.get("skipped")]
    assert manifest["counts"]["all"]["generated_tokens"] == sum(sum(r["new_tokens"]) for r in kept)

    # extend= on a machine that kept only the parquet: the old prompts still count for near-duplicates; the
    # conversations dropped before (not in the parquet) are written again, then the new ids
    old_ids = set(read_parquet(merged["output"])["id"])
    fresh = ["tell me about the red car and the blue house please !!",   # near-duplicates an old kept prompt
             "why is the sea blue at night near the old city", "tell me how long the red car is",
             "what is the colour of the old house and why", "how is the moon so far from the sun"]
    users[:] = fresh
    grown = _with(cfg, merge=False, extend=merged["output"], out_dir=str(tmp_path / "grown"),
                  self_prompts={**cfg.self_prompts, "count": 9})
    backends.clear()
    again = run_distill(grown)
    redone = {r["id"] for r in JsonlLog(again["file"]).records()}
    assert redone == {f"self-{i:07d}" for i in range(9)} - old_ids and not redone & old_ids
    assert again["self_prompts_now"]["dropped"] == {"near_duplicate": 1}
    final = run_distill(_with(grown, merge=True, output=str(tmp_path / "grown" / "d.parquet")))
    assert set(read_parquet(final["output"])["id"]) == old_ids | {r["id"] for r in JsonlLog(again["file"]).records()
                                                                   if not r.get("skipped")}


def records_7_skipped(path) -> bool:
    return bool([r for r in JsonlLog(path).records() if r["id"] == "self-0000006"][0].get("skipped"))


def test_parquet_labels_are_the_generated_answers(chat_model, questions_path, tmp_path):
    """TokenDataset (token ids as generated + answer spans) labels what ConversationDataset (the ShareGPT text,
    re-tokenised) labels, on a word-level tokenizer where both tokenisations agree; turn 2 included."""
    data = sharegpt_input(tmp_path / "in.json", count=6)
    cfg = distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "max_length=90",
                      "max_new_tokens=8")
    run_distill(cfg)
    with open_dict(cfg):
        cfg.merge = True
    parquet = run_distill(_with(cfg, output=str(tmp_path / "out" / "d.parquet")))["output"]
    sharegpt = run_distill(_with(cfg, output=str(tmp_path / "out" / "d.json")))["output"]
    template = load_model(cfg.model, "cpu").template
    tokens, text = TokenDataset(parquet, 90), ConversationDataset(sharegpt, template, 90)
    assert len(tokens) == len(text) == 6
    two_turns = 0
    columns = read_parquet(parquet)
    for index in range(6):
        generated, written = tokens[index], text[index]
        if columns["stop_reasons"][index][-1] == "eos":
            assert generated == written
        else:   # cut by the cap: the text closes the answer with an end-of-turn token the model never wrote
            width = len(generated["input_ids"])
            assert len(written["input_ids"]) == width + 1
            assert generated == {k: v[:width] for k, v in written.items()}
        two_turns += len(columns["new_tokens"][index]) == 2
    assert two_turns == 2

    from conftest import compose_config
    from harness.train import run_train
    from tiny_chat import model_overrides

    trained = run_train(compose_config(*model_overrides(chat_model)[:-1], "logger=none", f"data_path={parquet}",
                                       f"eval_data_path={parquet}", f"output_dir={tmp_path / 'head'}",
                                       "head.medusa_num_heads=2", "head.draft_vocab_size=null", "+training.max_steps=2", "training.eval_steps=2",
                                       "training.save_steps=2", "+training.disable_tqdm=true",
                                       "+training.use_cpu=true", config_name="train"))
    assert trained["global_step"] == 2 and trained["eval"]["eval_pos1_tokens"] > 0


def _with(cfg, **values):
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    return cfg


def test_overlap_and_near_duplicate_filters():
    overlap = EvalOverlap([MT_BENCH_81], n=8)
    assert overlap.score(MT_BENCH_81.upper() + " !!") == 1.0
    assert overlap.score("Compose an engaging travel blog post about a recent trip to Hawaii, and more") > 0.5
    assert overlap.score("What is the boiling point of water at the top of a high mountain?") == 0.0
    index = NearDuplicates(0.7)
    assert index.add("a", "give me a recipe for a quick vegan curry with chickpeas and spinach tonight")
    assert not index.add("b", "Give me a recipe for a quick vegan curry with chickpeas and spinach tonight!")
    assert index.add("c", "plan a three day trip to Kyoto in autumn on a small budget")


def test_magpie_prefix_is_the_templates_opened_user_turn(chat_model):
    from omegaconf import OmegaConf

    from harness.model.loading import load_template

    template = load_template(OmegaConf.create({"name": "tiny", "template": "chat_template"}), str(chat_model))
    assert open_user_turn(template, []) == "<|im_start|>system\nyou are a helpful model .<|im_end|>\n<|im_start|>user\n"
    with_history = open_user_turn(template, [("hello", "world")])
    assert with_history.endswith("<|im_start|>assistant\nworld<|im_end|>\n<|im_start|>user\n")
    assert user_turn_stops(template)[0] == "<|im_end|>"


VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


@pytest.mark.integration
@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="vLLM's environment is not built here (make distill-env)")
def test_real_vllm_distils_self_written_prompts_on_the_default_model(questions_path, tmp_path):
    from conftest import compose_config

    cfg = compose_config(f"bench.path={questions_path}", "logger=none", f"out_dir={tmp_path}", "max_length=512",
                         "max_new_tokens=16", "prompts=self", "self_prompts.count=8", "backend=vllm",
                         f"vllm.python={VLLM_PYTHON}", "progress=false", config_name="distill")
    summary = run_distill(cfg)
    records = JsonlLog(summary["file"]).records()
    assert summary["vllm_version"] and len(records) == 8
    kept = [r for r in records if not r.get("skipped")]
    assert kept and all(r["conversations"][0]["value"] and 0 < r["new_tokens"][0] <= 16 for r in kept)
    # the sampler patch reaches the processes vLLM spawns (the model runner samples in its own process)
    log = next((tmp_path / "logs").glob("vllm-*.log")).read_text()
    assert len(set(re.findall(r"on sampled rows only \(pid (\d+)\)", log))) >= 2


def test_cpu_threads_bind_gives_the_worker_every_core(monkeypatch):
    """vLLM's CPU build keeps one core for its engine by default; `all` binds the worker to every core this
    process may use (on 2 cores: 175 -> 303 tok/s measured), as one range vLLM parses."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert distill.cpu_threads_bind("all", 1) == "0-3"
    assert distill.cpu_threads_bind("all", 2) is None and distill.cpu_threads_bind("auto", 1) is None
    assert distill.cpu_threads_bind("0-1", 1) == "0-1"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})
    assert distill.cpu_threads_bind("all", 1) is None          # not one range: vLLM decides


def test_top_p_is_masked_only_on_the_rows_that_sample_with_it(monkeypatch):
    """vLLM's CPU sampler sorts every row of a step for top-p once one request asks for it; the worker's patch
    (vllm.top_p_rows_only) sorts only those rows and must give every row the same logits as before."""
    import torch

    monkeypatch.syspath_prepend(str(STUB))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    from harness.data import vllm_worker
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    original = ops.apply_top_k_top_p
    monkeypatch.setattr(ops, "apply_top_k_top_p", original)           # put back after the test
    assert vllm_worker.top_p_on_sampled_rows_only() and vllm_worker.top_p_on_sampled_rows_only()
    patched = ops.apply_top_k_top_p
    assert patched is not original and patched.rows_only              # installed once
    torch.manual_seed(0)
    vocab = 64
    logits = torch.randn(6, vocab)
    # greedy answers (top_p 1, no top_k) beside sampled user turns (top_p 0.99 / 0.5, top_k 5)
    p = torch.tensor([1.0, 0.99, 1.0, 0.5, 1.0, 1.0])
    k = torch.tensor([vocab, vocab, 5, vocab, vocab, vocab])
    expected = original(logits.clone(), k, p)
    ops.calls.clear()
    got = patched(logits.clone(), k, p)
    assert torch.equal(got, expected)                  # every row: the logits the unpatched sampler gives
    assert ops.calls == [3]                            # only rows 1-3 were sorted
    assert torch.isinf(got[1]).any() and torch.equal(got[0], logits[0])
    ops.calls.clear()
    ones = torch.ones(6)
    assert torch.equal(patched(logits.clone(), torch.full((6,), vocab), ones), logits) and ops.calls == []
    assert torch.equal(patched(logits.clone(), None, None), logits)
    all_sampled = torch.full((6,), 0.9)
    assert torch.equal(patched(logits.clone(), None, all_sampled), original(logits.clone(), None, all_sampled))
    # a GPU platform keeps vLLM's own sampler
    monkeypatch.setattr(ops, "apply_top_k_top_p", original)
    monkeypatch.setattr(vllm_worker, "on_cpu_platform", lambda torch: False)
    assert not vllm_worker.top_p_on_sampled_rows_only() and ops.apply_top_k_top_p is original
