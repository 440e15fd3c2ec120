"""Issue 15 item 9: the context cap (EAGLE stops a turn before prompt + answer + a verify input pass the
model's positions) and Spec-Bench's warm-up (3 x the whole first question) as bench options."""
from __future__ import annotations

import pytest

from harness import bench
from harness.infra.errors import HarnessError
from harness.infra.settings import BENCH, check_settings
from harness.infra.store import RunStore
from tests.helpers import tiny_bench, tiny_bench_config


@pytest.mark.parametrize("method", ["vanilla", "pld"])
def test_a_turn_stops_at_the_context_limit(tiny_model_dir, questions_path, tmp_path, method):
    run_dir = tmp_path / method
    limit, reserve = 120, 10
    tiny_bench(tiny_model_dir, run_dir, questions_path, f"method={method}", "bench.limit=2", "max_new_tokens=64",
               f"context.limit={limit}", f"context.reserve={reserve}")
    turns = [t for r in RunStore(run_dir).records() for t in r["turns"]]
    capped = [t for t in turns if t["stop_reason"] == "context"]
    assert capped, "turn-2 prompts of these questions pass 120 - 64 - 10 positions: some turn must be capped"
    for t in turns:
        assert t["prompt_tokens"] + t["new_tokens"] <= max(limit - reserve, t["prompt_tokens"] + 1)
    for t in capped:
        assert t["new_tokens"] == max(1, limit - reserve - t["prompt_tokens"])


def test_the_default_cap_is_the_models_positions_and_null_turns_it_off(tiny_model_dir, questions_path, tmp_path):
    class Config:
        max_position_embeddings = 2048
    cfg = tiny_bench_config(tiny_model_dir, tmp_path / "r", questions_path)
    assert cfg.context.limit == "auto" and cfg.context.reserve == 70
    assert bench.context_limit(cfg, Config()) == 2048
    assert bench.context_limit(cfg, object()) is None                      # a config without positions
    off = tiny_bench_config(tiny_model_dir, tmp_path / "r", questions_path, "context.limit=null")
    assert bench.context_limit(off, Config()) is None
    fixed = tiny_bench_config(tiny_model_dir, tmp_path / "r", questions_path, "context.limit=300")
    assert bench.context_limit(fixed, Config()) == 300


@pytest.mark.parametrize("override, words", [("context.limit=1", "context.limit=1 must be auto"),
                                             ("context.limit=many", "context.limit='many'"),
                                             ("context.reserve=-1", "context.reserve=-1 must be an integer >= 0"),
                                             ("warmup_tokens=0", "warmup_tokens=0 must be an integer >= 1, or null")])
def test_bad_context_and_warmup_values_are_one_line(tiny_model_dir, questions_path, tmp_path, override, words):
    with pytest.raises(HarnessError) as caught:
        check_settings(tiny_bench_config(tiny_model_dir, tmp_path / "r", questions_path, override), BENCH)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_spec_bench_warm_up_runs_the_whole_first_question(tiny_model_dir, questions_path, tmp_path, monkeypatch):
    seen = []
    real_turn = bench.Runner.turn

    def counting(self, prompt_ids, generator, max_new_tokens=None):
        seen.append(max_new_tokens)
        return real_turn(self, prompt_ids, generator, max_new_tokens)

    monkeypatch.setattr(bench.Runner, "turn", counting)
    tiny_bench(tiny_model_dir, tmp_path / "full", questions_path, "bench.limit=1", "max_new_tokens=6", "warmup=3",
               "warmup_tokens=null")
    # 3 warm-up passes x 2 turns at max_new_tokens (None = the run's own cap), then the timed question's 2 turns
    assert seen == [None] * 8
    seen.clear()
    tiny_bench(tiny_model_dir, tmp_path / "short", questions_path, "bench.limit=1", "max_new_tokens=6", "warmup=2",
               "warmup_tokens=4")
    assert seen == [4, 4, None, None]
    assert len(RunStore(tmp_path / "short").records()) == 1             # warm-ups are never recorded


def test_the_spec_bench_preset_warms_up_as_spec_bench():
    from tests.conftest import compose_config

    cfg = compose_config("experiment=gpu_specbench_vicuna7b")
    assert cfg.warmup == 3 and cfg.warmup_tokens is None and cfg.context.limit == "auto"
