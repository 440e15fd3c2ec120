"""The lossless check (harness/engine/lossless.py): exact / near_tie / mismatch per question, the margin
recomputed by one target forward, the counts in the summary, W&B rows and reports."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import harness.engine.acceptance
from harness.engine.acceptance import Acceptance
from harness.bench import format_summary, run_bench
from harness.data.questions import load_questions
from harness.infra.errors import HarnessError
from harness.engine.lossless import classify, count, format_counts, question_status, summary_fields, tolerance_for
from harness.model.loading import load_model
from harness.infra.store import RunStore
from harness.engine.target import Target
from harness.infra.tracking import flat_metrics, question_row
from reports.report import build_report
from tests.conftest import compose_config
from helpers import tiny_bench, tiny_bench_config

BASE = ("bench.limit=2", "max_new_tokens=10")


# ---------------------------------------------------------------------------------------------
# the classification itself, with a stand-in forward

def fake_logits(values: dict[int, float], vocab: int = 8, seen: list | None = None):
    def logits_at(prefix: list[int]) -> torch.Tensor:
        if seen is not None:
            seen.append(list(prefix))
        logits = torch.full((vocab,), -10.0)
        for token, value in values.items():
            logits[token] = value
        return logits
    return logits_at


def test_identical_turns_are_exact_and_need_no_forward():
    def no_forward(prefix):
        raise AssertionError("an exact question needs no margin")
    result = classify([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]], lambda i: [0], no_forward, 1e-3)
    assert result["status"] == "exact" and result["match"] is True
    assert [t["status"] for t in result["turns"]] == ["exact", "exact"]
    assert all(t["position"] is None and t["margin"] is None for t in result["turns"])


def test_a_divergence_at_a_tie_is_near_tie_and_the_next_turn_follows_it():
    seen = []
    # the reference chose 3, this run 5: logits 2.0 vs 1.9, a 0.1 margin
    logits_at = fake_logits({3: 2.0, 5: 1.9}, seen=seen)
    result = classify([[1, 2, 5, 7], [4, 6]], [[1, 2, 3, 7], [4, 5]], lambda i: [100 + i, 101], logits_at, 0.2)
    first, second = result["turns"]
    assert result["status"] == "near_tie" and result["match"] is False
    assert first["status"] == "near_tie" and first["position"] == 2
    assert first["margin"] == pytest.approx(0.1) and first["token"] == 5 and first["reference_token"] == 3
    assert first["top2"] == [3, 5]
    assert seen == [[100, 101, 1, 2]]                  # the reference's prompt + the shared tokens, one forward
    # turn 2's prompt carries the diverged answer: it takes turn 1's status instead of its own check
    assert second["status"] == "near_tie" and second["follows_turn"] == 0 and second["position"] == 1
    assert len(seen) == 1
    # the same divergence under a tolerance below its margin is a mismatch
    assert classify([[1, 2, 5]], [[1, 2, 3]], lambda i: [0], logits_at, 0.05)["status"] == "mismatch"


def test_a_choice_far_from_the_best_logit_is_a_mismatch_even_when_the_top_two_tie():
    # top-2 (3 and 4) tie, but this run chose 5, 3 logits below them
    result = classify([[5]], [[3]], lambda i: [0], fake_logits({3: 2.0, 4: 2.0, 5: -1.0}), 0.5)
    entry = result["turns"][0]
    assert result["status"] == "mismatch" and entry["margin"] == 0.0 and entry["token_gap"] == pytest.approx(3.0)


def test_length_differences_missing_turns_and_missing_models_are_mismatches():
    logits_at = fake_logits({3: 1.0})
    stopped = classify([[1, 2]], [[1, 2, 3]], lambda i: [0], logits_at, 10.0)["turns"][0]
    assert stopped["status"] == "mismatch" and stopped["position"] == 2 and stopped["token"] is None
    assert "stopped" in stopped["reason"]
    assert classify([[1], [2]], [[1]], lambda i: [0], logits_at, 10.0)["turns"][1]["status"] == "mismatch"
    unclassified = classify([[1, 2]], [[1, 3]])                   # token ids only (reports): not cleared
    assert unclassified["status"] == "mismatch" and "not classified" in unclassified["turns"][0]["reason"]
    # a later turn can only make a question worse
    assert classify([[1], [5]], [[1], [3]], lambda i: [0], logits_at, 10.0)["status"] == "mismatch"


def test_tolerance_defaults_by_dtype_and_overrides():
    assert tolerance_for("auto", torch.float32) == 1e-3
    assert tolerance_for("auto", torch.bfloat16) == 0.5
    assert tolerance_for(None, torch.float16) == 0.1
    assert tolerance_for("0.25", torch.float32) == 0.25 and tolerance_for(0, torch.bfloat16) == 0.0
    for bad in ("loose", -1, "nan"):
        with pytest.raises(HarnessError, match="lossless.tolerance"):
            tolerance_for(bad, torch.float32)
    with pytest.raises(HarnessError, match="set lossless.tolerance"):
        tolerance_for("auto", torch.float64)


def test_counts_and_strings():
    assert format_counts({"exact": 18, "near_tie": 2, "mismatch": 0, "compared": 20}) == "18 exact + 2 near-tie / 20"
    assert format_counts({"exact": 17, "near_tie": 2, "mismatch": 1, "compared": 20}) == \
        "MISMATCH 1/20; 17 exact + 2 near-tie / 20"
    old = [{"question_id": 1, "lossless": {"match": True}}, {"question_id": 2, "lossless": {"match": False}},
           {"question_id": 3}]                       # records from before the classification; one unchecked
    assert [question_status(r) for r in old] == ["exact", "mismatch", None]
    assert count(question_status(r) for r in old) == {"exact": 1, "near_tie": 0, "mismatch": 1, "compared": 2}
    fields = summary_fields(old)
    assert fields["lossless"] == "MISMATCH 1/2; 1 exact + 0 near-tie / 2"
    assert fields["lossless_rate"] == 0.5 and fields["lossless_mismatch_questions"] == [2]
    assert summary_fields([{"question_id": 3}])["lossless_rate"] is None


# ---------------------------------------------------------------------------------------------
# through the bench, on the tiny SmolLM2-shaped model

def bench(tiny_model_dir, questions_path, folder, *extra):
    return tiny_bench(tiny_model_dir, folder, questions_path, *BASE, *extra)


@pytest.fixture(scope="module")
def vanilla_run(tiny_model_dir, questions_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lossless") / "vanilla"
    bench(tiny_model_dir, questions_path, folder)
    return folder


def plant_wrong_token(monkeypatch, at_call: int = 3) -> dict:
    """A bug in the greedy acceptance: on one verify step the emitted token is the target's WORST one.
    Planted in the one greedy implementation itself, so it holds however the loop picks its rule."""
    real, calls = harness.engine.acceptance.greedy_accept, {"n": 0, "token": None}

    def buggy(parents, tokens, logits):
        acceptance = real(parents, tokens, logits)
        calls["n"] += 1
        if calls["n"] != at_call:
            return acceptance
        wrong = int(logits[acceptance.path[-1]].argmin())
        calls["token"] = wrong
        return Acceptance(acceptance.path, acceptance.tokens[:-1] + [wrong], acceptance.accepted_draft)

    monkeypatch.setattr(harness.engine.acceptance, "greedy_accept", buggy)
    return calls


def test_identical_runs_are_exact(vanilla_run, tiny_model_dir, questions_path, tmp_path):
    again = tmp_path / "again"
    summary = bench(tiny_model_dir, questions_path, again, f"reference={vanilla_run}")
    records = RunStore(again).records()
    assert [r["lossless"]["status"] for r in records] == ["exact", "exact"]
    assert all(t["status"] == "exact" and t["position"] is None for r in records for t in r["lossless"]["turns"])
    assert records[0]["lossless"]["tolerance"] == 1e-3               # auto, fp32
    assert summary["lossless"] == "2 exact + 0 near-tie / 2" and summary["lossless_mismatch"] == 0
    assert summary["lossless_rate"] == 1.0
    text = format_summary(summary)
    assert "2 exact + 0 near-tie / 2" in text and "MISMATCH" not in text


def test_a_planted_acceptance_bug_is_a_loud_mismatch(vanilla_run, tiny_model_dir, questions_path, tmp_path,
                                                     monkeypatch, caplog):
    planted = plant_wrong_token(monkeypatch)
    buggy = tmp_path / "buggy"
    with caplog.at_level(logging.WARNING, logger="harness.bench"):
        summary = bench(tiny_model_dir, questions_path, buggy, "method=pld", f"reference={vanilla_run}")
    reference = RunStore(vanilla_run).records()
    records = RunStore(buggy).records()
    first = records[0]["lossless"]
    assert first["status"] == "mismatch" and records[1]["lossless"]["status"] == "exact"
    entry = first["turns"][0]
    assert entry["status"] == "mismatch" and entry["token"] == planted["token"]
    assert entry["reference_token"] == reference[0]["turns"][0]["token_ids"][entry["position"]]
    assert entry["margin"] > 0 and entry["token_gap"] > 1.0      # the worst token: far from any tie
    assert summary["lossless"] == "MISMATCH 1/2; 1 exact + 0 near-tie / 2"
    assert summary["lossless_mismatch_questions"] == [records[0]["question_id"]]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "MISMATCH" in r.getMessage()]
    assert len(warning) == 1 and f"q{records[0]['question_id']} (turn 0, position {entry['position']}" in warning[0]
    text = format_summary(summary)
    assert "MISMATCH 1/2" in text and f"WARNING: LOSSLESS MISMATCH in questions {records[0]['question_id']}" in text
    # W&B: the summary counts and the per-question table
    flat = flat_metrics(summary)
    assert flat["lossless_mismatch"] == 1 and flat["lossless_exact"] == 1 and flat["lossless_compared"] == 2
    assert flat["lossless_mismatch_questions"] == str(records[0]["question_id"])
    assert [question_row(r)["lossless"] for r in records] == ["mismatch", "exact"]
    # the report: summary and leaderboard both carry the flag
    build_report([str(vanilla_run), str(buggy)], tmp_path / "report", make_figures=False)
    for name in ("summary", "leaderboard"):
        md = (tmp_path / "report" / f"{name}.md").read_text()
        row = next(line for line in md.splitlines() if line.startswith("| pld"))
        assert "MISMATCH 1/2; 1 exact + 0 near-tie / 2" in row, name


def reference_with_a_tie(vanilla_run, tiny_model_dir, questions_path, folder):
    """A copy of the vanilla run whose first question's turn 0 takes, at its closest call (the smallest
    gap between the target's best and runner-up logits), the runner-up: a drift at a near-tie."""
    shutil.copytree(vanilla_run, folder, ignore=shutil.ignore_patterns("*.lock", "wandb"))
    cfg = tiny_bench_config(tiny_model_dir, folder, questions_path, *BASE)
    loaded = load_model(cfg.model, "cpu")
    records = RunStore(folder).records()
    question = next(q for q in load_questions(cfg.bench) if q.question_id == records[0]["question_id"])
    prompt = loaded.template.turn_prompt(question.turns, [])
    turn = records[0]["turns"][0]
    ids = turn["token_ids"]
    best = None
    with torch.inference_mode():
        for position in range(len(ids)):
            logits = Target(loaded.model).prefill(prompt + ids[:position])[1].float()
            assert int(logits.argmax()) == ids[position]
            runner_up = logits.clone()
            runner_up[ids[position]] = -torch.inf
            gap = float(logits.max() - runner_up.max())
            if gap > 1e-3 and (best is None or gap < best[0]):
                best = (gap, position, int(runner_up.argmax()))
    gap, position, token = best
    original = ids[position]
    turn["token_ids"] = ids[:position] + [token] + ids[position + 1:]
    turn["text"] = loaded.tokenizer.decode(turn["token_ids"], skip_special_tokens=True)
    (folder / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return gap, position, token, original


def test_drift_at_a_near_tie_is_near_tie_and_a_tighter_tolerance_calls_it_a_mismatch(
        vanilla_run, tiny_model_dir, questions_path, tmp_path):
    gap, position, reference_token, token = reference_with_a_tie(vanilla_run, tiny_model_dir, questions_path,
                                                                 tmp_path / "tie_ref")
    near = tmp_path / "near"
    summary = bench(tiny_model_dir, questions_path, near, "method=pld", f"reference={tmp_path / 'tie_ref'}",
                    f"lossless.tolerance={gap * 1.01 + 1e-4}")
    records = RunStore(near).records()
    entry = records[0]["lossless"]["turns"][0]
    assert records[0]["lossless"]["status"] == "near_tie" and records[1]["lossless"]["status"] == "exact"
    assert entry["position"] == position and entry["token"] == token and entry["reference_token"] == reference_token
    assert entry["margin"] == pytest.approx(gap, abs=1e-4)
    assert summary["lossless"] == "1 exact + 1 near-tie / 2" and summary["lossless_rate"] == 1.0
    assert "MISMATCH" not in format_summary(summary)
    build_report([str(tmp_path / "tie_ref"), str(near)], tmp_path / "report", make_figures=False)
    assert "1 exact + 1 near-tie / 2" in (tmp_path / "report" / "summary.md").read_text()
    # the same drift is a mismatch under a tolerance below its margin
    tight = tmp_path / "tight"
    summary = bench(tiny_model_dir, questions_path, tight, "method=pld", f"reference={tmp_path / 'tie_ref'}",
                    f"lossless.tolerance={gap / 2}")
    assert [r["lossless"]["status"] for r in RunStore(tight).records()] == ["mismatch", "exact"]
    assert summary["lossless"] == "MISMATCH 1/2; 1 exact + 0 near-tie / 2"


def test_a_bad_tolerance_fails_before_the_model_loads(tiny_model_dir, questions_path, tmp_path):
    with pytest.raises(HarnessError, match="lossless.tolerance=loose"):
        bench(tiny_model_dir, questions_path, tmp_path / "bad", "lossless.tolerance=loose")


@pytest.mark.integration
def test_bf16_drift_on_the_default_model_is_never_a_mismatch(questions_path, tmp_path):
    """bf16 rounds a tree verify and a one-token step differently (DESIGN.md: up to 0.375 logits):
    pld against vanilla may drift at near-ties, but with the auto tolerance never reads as a bug."""
    from tests.conftest import real_bench_overrides

    extra = ("bench.limit=2", "max_new_tokens=32", "model.dtype=bf16")
    vanilla = tmp_path / "vanilla"
    run_bench(compose_config(*real_bench_overrides(questions_path, vanilla, *extra)), vanilla)
    pld = tmp_path / "pld"
    summary = run_bench(compose_config(*real_bench_overrides(questions_path, pld, *extra, "method=pld",
                                                             f"reference={vanilla}")), pld)
    records = RunStore(pld).records()
    assert summary["lossless_mismatch"] == 0, [r["lossless"] for r in records]
    assert summary["lossless_tolerance"] == 0.5 and summary["lossless_compared"] == 2
    for turn in (t for r in records for t in r["lossless"]["turns"] if t["status"] == "near_tie"):
        assert "follows_turn" in turn or turn["margin"] <= 0.5
