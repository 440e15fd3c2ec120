"""Every method config in conf/method/ (found by glob, so a new file is covered the day it lands) runs
through the bench on the tiny chat model and gives vanilla greedy's token ids; a config that declares
`lossy: true` is refused without that declaration and, with it, runs and is marked lossy in its run folder.

A config is shrunk only where a tiny random model forces it (SHRINK below); anything else that stops a
config from running here fails its case with the reason, so it gets fixed rather than skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.utils import get_class
import torch
from omegaconf import DictConfig, open_dict

from conftest import compose_config
from harness import CONF_DIR
from harness.bench import run_bench
from harness.infra.errors import HarnessError
from harness.infra.store import RunStore
from harness.model.loading import load_model
from reports.results import load_runs
from tiny_chat import model_overrides

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:method.head_path is null")]   # untrained heads, on purpose

METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
NEW_TOKENS = 24
# A GPU-shaped verify curve (flat: a 16-token verify costs ~10 % more than a 1-token step), so auto-sized
# methods do draft here instead of measuring a curve at setup (slow, and noisy on a shared machine).
FLAT_CURVE = {1: 0.010, 2: 0.0101, 4: 0.0102, 8: 0.0104, 16: 0.0108, 64: 0.0125}
# Both turns of one question, in the tiny tokenizer's words; the repeated phrases give the lookup methods
# (pld, lookahead) n-grams to match, so their drafts are accepted some of the time.
QUESTION = {"question_id": 81, "category": "writing",
            "turns": ["tell me about the red cat . the red cat sat on the mat and the red cat sat on the mat .",
                      "translate the red cat sat on the mat into french , please ."]}

# method key -> its value on the tiny model, from (configured value, composed config, the model's config.json)
SHRINK = {
    # shipped heads are trained for the real model: an untrained head of the tiny model's shape instead
    "head_path": lambda value, cfg, tiny: None,
    # auto-sized methods read a fixed curve instead of timing the machine at setup
    "latency_curve": lambda value, cfg, tiny: FLAT_CURVE,
    # the only model with the tiny tokenizer is the tiny model itself (SpS then drafts for itself)
    "draft_model": lambda value, cfg, tiny: cfg.model.name,
    # an early exit inside the tiny model's depth
    "exit_layer": lambda value, cfg, tiny: min(int(value), tiny["num_hidden_layers"] - 1),
}


@pytest.fixture(scope="module")
def bench_inputs(chat_model, tmp_path_factory):
    """(model folder, question file, a folder for the module's runs)."""
    folder = tmp_path_factory.mktemp("every-method")
    questions = folder / "question.jsonl"
    questions.write_text(json.dumps(QUESTION) + "\n")
    return chat_model, questions, folder


def bench_config(bench_inputs, run_dir: Path, method: str, *extra: str) -> DictConfig:
    model_dir, questions, _ = bench_inputs
    cfg = compose_config(f"method={method}", *model_overrides(model_dir), f"bench.path={questions}",
                         f"run_dir={run_dir}", f"max_new_tokens={NEW_TOKENS}", "warmup=0", "progress=false",
                         "logger.wandb.mode=disabled", "allow_untrained=true", *extra)
    tiny = json.loads((model_dir / "config.json").read_text())
    with open_dict(cfg):
        for key, shrink in SHRINK.items():
            if key in cfg.method:
                cfg.method[key] = shrink(cfg.method[key], cfg, tiny)
    return cfg


def naive_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation: no cache, no harness, nothing shared with the methods."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def vanilla_run(bench_inputs) -> Path:
    """The reference every method is compared with: vanilla through the bench, itself checked against a
    cache-free greedy decode of the same prompts (so a bug the loop shares with every method still shows)."""
    run_dir = bench_inputs[2] / "vanilla-reference"
    cfg = bench_config(bench_inputs, run_dir, "vanilla")
    run_bench(cfg, run_dir)
    [record] = RunStore(run_dir).records()
    loaded = load_model(cfg.model, "cpu")
    answers = []
    for turn in record["turns"]:
        assert turn["new_tokens"] >= NEW_TOKENS // 2, "the tiny model stops too early to test: change QUESTION"
        prompt = loaded.template.turn_prompt(QUESTION["turns"], answers)
        assert turn["token_ids"] == naive_greedy(loaded.model, prompt, turn["new_tokens"]), \
            "vanilla through the bench differs from cache-free greedy decoding"
        answers.append(turn["text"])
    return run_dir


def check_lossless(method: str, bench_inputs, vanilla_run: Path, run_dir: Path) -> None:
    summary = run_bench(bench_config(bench_inputs, run_dir, method, f"reference={vanilla_run}"), run_dir)
    [run] = load_runs([run_dir])
    [record], [reference] = run.records, RunStore(vanilla_run).records()
    assert [t["token_ids"] for t in record["turns"]] == [t["token_ids"] for t in reference["turns"]]
    assert record["lossless"]["status"] == "exact" and summary["lossless_mismatch"] == 0
    # the tiny model has no trained heads: every head method ran a random one, and says so everywhere
    has_head = bool(getattr(get_class(run.config["method"]["_target_"]), "head_type", None))
    assert run.untrained == has_head and summary["untrained_head"] == has_head
    assert not run.lossy and run.label == method + (" (UNTRAINED head)" if has_head else "")
    sizes = [t["draft_sizes"] for t in record["turns"]]
    if None in sizes:       # transformers' generate does not report its drafts
        return
    drafted = sum(map(sum, sizes))
    if run.config["method"]["_target_"] == "baselines.vanilla.VanillaProposer":
        assert drafted == 0
    else:   # an identical answer says little about a verify path that never ran
        assert drafted > 0, f"{method} verified no draft in {2 * NEW_TOKENS} tokens: its lossless check proved nothing"


def check_declared_lossy(method: str, bench_inputs, run_dir: Path) -> None:
    undeclared = run_dir / "undeclared"
    with pytest.raises(HarnessError, match="lossy"):
        run_bench(bench_config(bench_inputs, undeclared, method, "method.lossy=false"), undeclared)
    declared = run_dir / "declared"
    # sampled, so the method's own (lossy) acceptance rule is the one deciding
    run_bench(bench_config(bench_inputs, declared, method, "decoding.temperature=0.7"), declared)
    [run] = load_runs([declared])
    assert run.lossy and run.label == f"{method} (lossy) (UNTRAINED head)" and run.untrained
    assert all(turn["new_tokens"] > 0 for turn in run.records[0]["turns"])


@pytest.mark.parametrize("method", METHODS)
def test_method_is_token_identical_to_vanilla_or_declared_lossy(method, bench_inputs, vanilla_run, tmp_path):
    if compose_config(f"method={method}").method.get("lossy", False):
        check_declared_lossy(method, bench_inputs, tmp_path)
    else:
        check_lossless(method, bench_inputs, vanilla_run, tmp_path / method)
