"""Issue 2: configs, question loading, the results store, resume, bad input, vanilla vs transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import CONF_DIR, REPO_ROOT
from harness.bench import run_bench
from harness.data.questions import load_questions, parse_questions
from harness.infra.errors import HarnessError
from harness.model.device import resolve_dtype
from harness.model.loading import load_model
from harness.infra.store import RunStore
from tests.conftest import compose_config, tiny_bench_overrides

MODELS = ["smollm2-135m", "vicuna-7b-v1.3", "vicuna-13b-v1.3", "vicuna-7b-v1.5", "vicuna-13b-v1.5",
          "llama2-7b-chat", "llama2-13b-chat", "llama2-70b-chat"]


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_composes_with_what_loading_needs(name):
    cfg = compose_config(f"model={name}").model
    assert cfg.name == name and cfg.hub_id and cfg.dtype == "auto" and cfg.trust_remote_code is False
    expected = {"smollm2": "chat_template", "vicuna": "vicuna_v1.1", "llama2": "llama-2"}[name.split("-")[0]]
    assert cfg.template == expected


def test_dtype_auto_is_fp32_on_cpu_and_fp16_on_gpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(HarnessError, match="unknown dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_fschat_templates_build_the_published_prompts():
    from harness.model.templates import make_template

    class FakeTokenizer:
        eos_token_id = 2
        chat_template = None

    vicuna = make_template(compose_config("model=vicuna-7b-v1.3").model, FakeTokenizer())
    assert vicuna.prompt_text([("Hi", "Hello!"), ("Bye", None)]).endswith(
        "USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT:")
    llama = make_template(compose_config("model=llama2-7b-chat").model, FakeTokenizer())
    assert llama.prompt_text([("Hi", None)]).startswith("[INST] <<SYS>>\nYou are a helpful, respectful")
    assert llama.prompt_text([("Hi", None)]).endswith("<</SYS>>\n\nHi [/INST] ")   # EAGLE's, tests/test_templates.py
    assert 2 in vicuna.stop_token_ids and 2 in llama.stop_token_ids


def test_mt_bench_selection(questions_path):
    bench = compose_config(f"bench.path={questions_path}").bench
    questions = load_questions(bench)
    assert len(questions) == 80 and {q.question_id for q in questions} == set(range(81, 161))
    assert all(len(q.turns) == 2 for q in questions)
    picked = load_questions(compose_config(f"bench.path={questions_path}", "bench.categories=[coding]",
                                           "bench.limit=3", "bench.max_turns=1").bench)
    assert [q.category for q in picked] == ["coding"] * 3 and all(len(q.turns) == 1 for q in picked)
    assert len(load_questions(compose_config(f"bench.path={questions_path}", "bench=spec_bench").bench)) == 480
    ids = load_questions(compose_config(f"bench.path={questions_path}", "bench.question_ids=[90,81]").bench)
    assert sorted(q.question_id for q in ids) == [81, 90]


def test_question_file_from_env_and_clear_errors(tmp_path, monkeypatch, questions_path):
    monkeypatch.setenv("SPECDEC_DATA", str(questions_path))
    assert len(load_questions(compose_config().bench)) == 80
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["a"]}\n{"question_id": 2, "turns": ["b"]}\n')
    with pytest.raises(HarnessError, match=r"q\.jsonl:2: the question lacks category"):
        parse_questions(bad)
    with pytest.raises(HarnessError, match="does not exist; fix bench.path"):
        load_questions(compose_config(f"bench.path={tmp_path / 'missing.jsonl'}").bench)


def test_offline_without_cache_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.delenv("SPECDEC_DATA", raising=False)
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(HarnessError) as caught:
        load_questions(compose_config().bench)
    assert "\n" not in str(caught.value) and "bench.path=" in str(caught.value)
    assert not (tmp_path / "cache" / "data" / "spec_bench" / "question.jsonl").exists()


def test_unloadable_model_names_model_path(tmp_path):
    cfg = compose_config(f"model.path={tmp_path / 'nowhere'}").model
    with pytest.raises(HarnessError) as caught:
        load_model(cfg, "cpu")
    message = str(caught.value)
    assert "smollm2-135m" in message and "model.path=" in message and "\n" not in message


@pytest.mark.parametrize("override, words", [("method=nope", "unknown method 'nope'"),
                                             ("model=gpt-17", "unknown model 'gpt-17'"),
                                             ("bench=nope", "unknown bench 'nope'")])
def test_unknown_names_fail_in_one_line_before_anything_loads(override, words):
    out = subprocess.run([sys.executable, "-m", "harness.bench", override], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "vanilla" in lines[0] + " vanilla" and "conf/" in lines[0]


def test_bench_run_writes_folder_and_refuses_to_overwrite(tiny_model_dir, questions_path, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(*tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "bench.limit=2",
                                               "max_new_tokens=12"))
    summary = run_bench(cfg, run_dir)
    records = RunStore(run_dir).records()
    assert [r["question_id"] for r in records] == [81, 82] and all(len(r["turns"]) == 2 for r in records)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["config"]["method"]["name"] == "vanilla" and info["versions"]["torch"]
    assert info["hardware"]["cpu_count"] and "git_commit" in info
    turn = records[0]["turns"][0]
    assert turn["new_tokens"] == len(turn["token_ids"]) <= 12 and turn["accepted_lengths"] == [1] * turn["new_tokens"]
    assert summary["tau"] == 1.0 and summary["questions"] == 2
    with pytest.raises(HarnessError, match="resume=true"):
        run_bench(cfg, run_dir)
    assert len(RunStore(run_dir).records()) == 2  # nothing already written is lost


def test_resume_refuses_other_settings_and_repairs_a_torn_line(tiny_model_dir, questions_path, tmp_path):
    run_dir = tmp_path / "run"
    base = tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "bench.limit=3", "max_new_tokens=8")
    run_bench(compose_config(*base, "bench.limit=1"), run_dir)
    with open(run_dir / "answers.jsonl", "a") as handle:
        handle.write('{"question_id": 82, "tur')   # a write cut by a kill
    with pytest.raises(HarnessError, match="different"):
        run_bench(compose_config(*base, "resume=true", "max_new_tokens=9"), run_dir)
    run_bench(compose_config(*base, "resume=true"), run_dir)
    assert [r["question_id"] for r in RunStore(run_dir).records()] == [81, 82, 83]


def test_host_probes_bracket_every_sitting_and_a_resume_keeps_the_earlier_ones(tiny_model_dir, questions_path,
                                                                               tmp_path, monkeypatch):
    from harness.engine import timing

    run_dir = tmp_path / "run"
    base = tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "bench.limit=3", "max_new_tokens=6",
                                "host_probe_repeats=3", "host_probe_every=0")
    seen_prompts = []
    real = timing.measure_verify_latency

    def spy(target, prompt_ids, **kwargs):
        seen_prompts.append(list(prompt_ids))
        return real(target, prompt_ids, **kwargs)

    monkeypatch.setattr(timing, "measure_verify_latency", spy)
    first = run_bench(compose_config(*base, "bench.limit=1"), run_dir)
    probes = json.loads((run_dir / "run.json").read_text())["host_probes"]
    assert [p["done"] for p in probes] == [0, 1] and all(p["step_ms"] > 0 and p["repeats"] == 3 for p in probes)
    assert first["host_probes"] == 2 and first["host_step_ms"] == pytest.approx(
        sorted(p["step_ms"] for p in probes)[0] / 2 + sorted(p["step_ms"] for p in probes)[1] / 2)
    summary = run_bench(compose_config(*base, "resume=true"), run_dir)
    again = json.loads((run_dir / "run.json").read_text())["host_probes"]
    assert again[:2] == probes and [p["done"] for p in again[2:]] == [1, 3]      # the first sitting's are kept
    assert summary["host_probes"] == 4
    # every probe times the bench's FIRST prompt (the same input for every method and every sitting), not the
    # first unfinished question's
    assert len(seen_prompts) == 4 and all(prompt == seen_prompts[0] for prompt in seen_prompts)
    run_bench(compose_config(*base, "resume=true"), run_dir)                     # nothing left: no probe
    assert len(json.loads((run_dir / "run.json").read_text())["host_probes"]) == 4
    off = tmp_path / "off"
    run_bench(compose_config(*tiny_bench_overrides(tiny_model_dir, off, questions_path, "bench.limit=1",
                                                   "max_new_tokens=4", "host_probe_repeats=0")), off)
    assert "host_probes" not in json.loads((off / "run.json").read_text())
    # inside a sitting: every host_probe_every questions (between two questions), never twice after the last
    every = tmp_path / "every"
    run_bench(compose_config(*tiny_bench_overrides(tiny_model_dir, every, questions_path, "bench.limit=5",
                                                   "max_new_tokens=4", "host_probe_repeats=2",
                                                   "host_probe_every=2")), every)
    assert [p["done"] for p in json.loads((every / "run.json").read_text())["host_probes"]] == [0, 2, 4, 5]


def test_resume_refuses_a_head_whose_weights_changed_since_the_run_began(tmp_path):
    """Same head_path, retrained weights in it: the answers so far were drafted by the old head, so a resume into
    the run is refused (the settings alone cannot see it); unchanged weights resume."""
    from omegaconf import OmegaConf

    from harness.heads.checkpoint import head_weights_sha256

    head = tmp_path / "head"
    head.mkdir()
    (head / "model.safetensors").write_bytes(b"old weights")
    (head / "head_config.json").write_text("{}")
    first = head_weights_sha256(head)
    assert first and len(first) == 64 and head_weights_sha256("owner/hub-id") is None
    (head / "head_config.json").write_text('{"note": 1}')
    assert head_weights_sha256(head) == first              # the weights, not the metadata
    cfg = OmegaConf.create({"model": {"name": "m"}, "method": {"name": "ours", "head_path": str(head)},
                            "bench": {"name": "mt_bench", "max_turns": None}, "decoding": {}, "max_new_tokens": 8,
                            "seed": 0, "context": None})
    store = RunStore(tmp_path / "run")
    store.open(cfg, False, {"head": {"path": str(head), "sha256": first}})
    store.append({"question_id": 81, "turns": []})
    RunStore(tmp_path / "run").open(cfg, True, {"head": {"path": str(head), "sha256": head_weights_sha256(head)}})
    (head / "model.safetensors").write_bytes(b"new weights")
    changed = head_weights_sha256(head)
    assert changed != first
    with pytest.raises(HarnessError, match="other head weights"):
        RunStore(tmp_path / "run").open(cfg, True, {"head": {"path": str(head), "sha256": changed}})
    assert [r["question_id"] for r in RunStore(tmp_path / "run").records()] == [81]    # nothing lost


def test_a_killed_run_resumes_to_exactly_one_record_per_question(tiny_model_dir, questions_path, tmp_path):
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "harness.bench",
            *tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "bench.limit=8", "max_new_tokens=160"),
            f"hydra.run.dir={tmp_path / 'hydra'}"]          # Hydra's own folder outside the checkout
    process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    answers = run_dir / "answers.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if answers.is_file() and answers.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed; make it longer"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = RunStore(run_dir).records()
    assert 2 <= len(before) < 8
    done = subprocess.run(args + ["resume=true"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [r["question_id"] for r in RunStore(run_dir).records()]
    assert sorted(ids) == list(range(81, 89)) and len(ids) == len(set(ids))
    assert ids[: len(before)] == [r["question_id"] for r in before]


def test_reference_check_records_match_and_first_divergence(tiny_model_dir, questions_path, tmp_path):
    base = ["bench.limit=2", "max_new_tokens=10"]
    first = tmp_path / "first"
    run_bench(compose_config(*tiny_bench_overrides(tiny_model_dir, first, questions_path, *base)), first)
    records = RunStore(first).records()
    records[1]["turns"][0]["token_ids"][3] += 1   # pretend the reference diverged at position 3
    (first / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    second = tmp_path / "second"
    summary = run_bench(compose_config(*tiny_bench_overrides(tiny_model_dir, second, questions_path, *base,
                                                             f"reference={first}")), second)
    lossless = [r["lossless"] for r in RunStore(second).records()]
    assert lossless[0]["match"] is True and lossless[0]["status"] == "exact"
    assert lossless[1]["match"] is False and lossless[1]["turns"][0]["position"] == 3
    assert lossless[1]["status"] == "mismatch"       # the edited token is no near-tie of the target's logits
    assert summary["lossless_rate"] == 0.5


def test_hf_generate_counts_steps_like_the_loop(tiny_model_dir, questions_path, tmp_path):
    base = ["bench.limit=2", "max_new_tokens=16"]
    vanilla = tmp_path / "vanilla"
    run_bench(compose_config(*tiny_bench_overrides(tiny_model_dir, vanilla, questions_path, *base)), vanilla)
    peer = tmp_path / "hf"
    summary = run_bench(compose_config(*tiny_bench_overrides(tiny_model_dir, peer, questions_path, *base,
                                                             "method=hf_generate", f"reference={vanilla}")), peer)
    assert summary["lossless_rate"] == 1.0 and summary["tau"] == 1.0
    lookup = tmp_path / "lookup"
    summary = run_bench(compose_config(*tiny_bench_overrides(
        tiny_model_dir, lookup, questions_path, *base, "method=hf_generate",
        "method.prompt_lookup_num_tokens=5", f"reference={vanilla}")), lookup)
    assert summary["lossless_rate"] == 1.0
    for record in RunStore(lookup).records():
        for turn in record["turns"]:
            assert sum(turn["accepted_lengths"]) == turn["new_tokens"]


@pytest.mark.integration
def test_vanilla_equals_transformers_generate_on_the_default_model(questions_path, tmp_path):
    base = [f"bench.path={questions_path}", "bench.limit=2", "max_new_tokens=32", "warmup=0",
            "logger.wandb.mode=disabled", "progress=false"]
    vanilla, peer = tmp_path / "vanilla", tmp_path / "hf"
    run_bench(compose_config(*base, f"run_dir={vanilla}"), vanilla)
    summary = run_bench(compose_config(*base, "method=hf_generate", f"run_dir={peer}", f"reference={vanilla}"), peer)
    assert summary["lossless_rate"] == 1.0 and summary["turns"] == 4
    first = RunStore(vanilla).records()[0]["turns"]
    assert first[0]["new_tokens"] == 32 and first[0]["text"].strip()
    # the second turn's prompt carries the first answer
    assert first[1]["prompt_tokens"] > first[0]["prompt_tokens"] + 20


def test_configs_dir_is_the_repo_conf():
    assert CONF_DIR == Path(REPO_ROOT) / "conf" and (CONF_DIR / "config.yaml").is_file()
