"""Issue 18 item 2: the glossary (harness/engine/metrics.py) by hand-computed values on small records,
and the torn-last-line rule of run folders, the same for the store (writer) and the reports (reader)."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from harness.bench import format_summary
from harness.engine import metrics
from harness.infra.errors import HarnessError
from harness.infra.store import RunStore, read_records
from reports.compare import speedups_against
from reports.results import load_runs
from tests.test_reports import pld, turn, vanilla


def make_turn(tokens: int, wall: float, steps: int, drafts=None, attempted=(), accepted=(), **stages) -> dict:
    return {"new_tokens": tokens, "wall_time": wall, "steps": steps, "draft_sizes": drafts,
            "pos_attempted": list(attempted), "pos_accepted": list(accepted), **stages}


def two_questions() -> list[dict]:
    # q1: 16 tokens in 2 s (8 tok/s), 7 steps, 9 + 4 draft tokens; q2: 4 tokens in 1 s (4 tok/s), 4 steps, 3 drafted
    return [{"question_id": 1, "turns": [
                make_turn(10, 1.0, 4, [0, 3, 3, 3], [3, 3, 2], [3, 2, 1], draft_time=0.2, verify_time=0.6),
                make_turn(6, 1.0, 3, [0, 2, 2], [2, 2], [2, 1], draft_time=0.1, verify_time=0.7)]},
            {"question_id": 2, "turns": [
                make_turn(4, 1.0, 4, [0, 1, 1, 1], [3], [0], draft_time=0.3, verify_time=0.5)]}]


def test_rates_tau_and_draft_tokens_per_step_by_hand():
    records = two_questions()
    turns = metrics.turns_of(records)
    assert metrics.totals(turns) == {"new_tokens": 20, "wall_time": 3.0, "steps": 11, "draft_tokens": 16}
    assert metrics.tokens_per_s(20, 3.0) == pytest.approx(20 / 3)                 # total tokens / total time
    assert metrics.tokens_per_s_mean(metrics.question_totals(records)) == pytest.approx((8 + 4) / 2)
    assert metrics.tau(20, 11) == pytest.approx(20 / 11)
    assert metrics.draft_tokens_per_step(16, 11) == pytest.approx(16 / 11)
    assert metrics.stage_seconds(turns, "draft_time") == pytest.approx(0.6)
    assert metrics.stage_share(turns, "verify_time") == pytest.approx(1.8 / 3.0)
    # undefined is NaN (or None for a sum nobody recorded), never a made-up number
    assert math.isnan(metrics.tau(5, 0)) and math.isnan(metrics.tokens_per_s(5, 0.0))
    assert math.isnan(metrics.draft_tokens_per_step(None, 4))
    assert metrics.totals([make_turn(3, 1.0, 3)])["draft_tokens"] is None
    assert metrics.stage_seconds(turns, "prefill_time") is None
    # repeats of a question pool their tokens and time
    pooled = metrics.question_totals(records + [{"question_id": 2, "turns": [make_turn(6, 2.0, 2)]}])
    assert pooled[2]["new_tokens"] == 10 and pooled[2]["wall_time"] == 3.0 and pooled[2]["draft_tokens"] is None


def test_acceptance_per_position_by_hand():
    attempted, accepted = metrics.position_counts(metrics.turns_of(two_questions()))
    assert attempted == [3 + 2 + 3, 3 + 2, 2] and accepted == [3 + 2 + 0, 2 + 1, 1]
    assert metrics.acceptance_per_position(attempted, accepted) == pytest.approx([5 / 8, 3 / 5, 1 / 2])
    assert metrics.acceptance_per_position([2, 0], [1, 0]) == [0.5, None]     # never attempted: no rate


def test_summary_fields_are_the_glossary_values():
    summary = metrics.summarize(two_questions())
    assert summary["questions"] == 2 and summary["turns"] == 3 and summary["steps"] == 11
    assert summary["tokens_per_s"] == pytest.approx(20 / 3) and summary["tokens_per_s_mean"] == pytest.approx(6.0)
    assert summary["tau"] == pytest.approx(20 / 11) and summary["draft_tokens"] == 16
    assert summary["draft_time"] == pytest.approx(0.6) and summary["prefill_time"] is None
    assert summary["acceptance_per_position"] == pytest.approx([5 / 8, 3 / 5, 1 / 2])


def per_question(*pairs) -> dict[int, dict]:
    return {qid: {"new_tokens": tokens, "wall_time": wall} for qid, (tokens, wall) in enumerate(pairs, 1)}


# vanilla: every question 10 tok/s; method: q1 2x, q2 4x, q3 2x; the method's q4 has no vanilla answer
VANILLA = per_question((20, 2.0), (20, 2.0), (10, 1.0))
METHOD = {**per_question((20, 1.0), (20, 0.5), (10, 0.5)), 4: {"new_tokens": 50, "wall_time": 0.1}}


def test_every_speedup_definition_by_hand():
    assert metrics.speedup(METHOD, VANILLA, "per_question") == pytest.approx((2 + 4 + 2) / 3)
    assert metrics.speedup(METHOD, VANILLA, "total") == pytest.approx((50 / 2.0) / (50 / 5.0))
    assert metrics.speedup(METHOD, VANILLA, "geometric") == pytest.approx((2 * 4 * 2) ** (1 / 3))
    assert metrics.paired_questions(METHOD, VANILLA) == 3
    assert metrics.speedup(VANILLA, VANILLA, "geometric") == metrics.speedup(VANILLA, VANILLA, "total") == 1.0
    # a question with no tokens counts 0x in the mean but has no logarithm: left out of the geometric mean
    stalled = {**METHOD, 3: {"new_tokens": 0, "wall_time": 0.5}}
    assert metrics.speedup(stalled, VANILLA, "per_question") == pytest.approx((2 + 4 + 0) / 3)
    assert metrics.speedup(stalled, VANILLA, "geometric") == pytest.approx(math.sqrt(2 * 4))
    assert math.isnan(metrics.speedup({9: {"new_tokens": 1, "wall_time": 1.0}}, VANILLA, "total"))
    assert metrics.speedup(METHOD, VANILLA, "spec_bench") == pytest.approx(((20 + 40 + 20) / 3) / 10)
    with pytest.raises(ValueError, match="per_question, total, spec_bench, geometric"):
        metrics.speedup(METHOD, VANILLA, "median")
    assert set(metrics.SPEEDUPS) == {"per_question", "total", "spec_bench", "geometric"}


def test_spec_bench_speedup_is_a_ratio_of_mean_rates():
    """Spec-Bench's speed.py: mean(method tok/s) / mean(vanilla tok/s); differs from the mean of ratios
    as soon as vanilla's rate varies over questions."""
    vanilla = per_question((10, 1.0), (10, 2.0))            # 10 and 5 tok/s
    method = per_question((20, 1.0), (40, 2.0))             # 20 and 20 tok/s
    assert metrics.speedup(method, vanilla, "spec_bench") == pytest.approx(20 / 7.5)
    assert metrics.speedup(method, vanilla, "per_question") == pytest.approx((2 + 4) / 2)
    assert metrics.speedup(method, vanilla, "total") == pytest.approx((60 / 3) / (20 / 3))
    low, high = metrics.speedup_interval(method, vanilla, "spec_bench")
    assert 2.0 <= low <= 20 / 7.5 <= high <= 4.0


def test_tau_in_both_conventions_by_hand():
    turns = metrics.turns_of(two_questions())
    # harness: 20 tokens / 11 steps (3 prefills counted); Spec-Bench: (20 - 3) / (11 - 3) decode steps only
    assert metrics.tau(20, 11) == pytest.approx(20 / 11)
    assert metrics.tau_spec_bench(turns) == pytest.approx(17 / 8)
    assert metrics.summarize(two_questions())["tau_spec_bench"] == pytest.approx(17 / 8)
    # vanilla is 1.00 in both; a turn stopped after its prefill token has no decode step
    plain = [make_turn(5, 1.0, 5), make_turn(1, 0.1, 1)]
    assert metrics.tau(6, 6) == 1.0 and metrics.tau_spec_bench(plain) == 1.0
    assert math.isnan(metrics.tau_spec_bench([make_turn(1, 0.1, 1)]))


def test_bootstrap_interval_by_hand():
    point = metrics.speedup(METHOD, VANILLA, "per_question")
    low, high = metrics.speedup_interval(METHOD, VANILLA, "per_question", seed=7)
    assert metrics.speedup_interval(METHOD, VANILLA, "per_question", seed=7) == (low, high)   # seeded
    assert 2.0 <= low < point < high <= 4.0          # inside the range of the per-question ratios
    # two questions, ratios 2 and 4: a resample's mean is 2, 3 or 4 (p = 1/4, 1/2, 1/4), so the
    # 2.5th and 97.5th percentiles of 2000 resamples are the extremes
    two = {1: METHOD[1], 2: METHOD[2]}
    assert metrics.speedup_interval(two, VANILLA, "per_question") == pytest.approx((2.0, 4.0))
    assert metrics.speedup_interval(two, VANILLA, "total") == pytest.approx((2.0, 4.0))
    # every question 2x (different sizes): nothing to resample, the interval is the point
    even = per_question((40, 2.0), (10, 0.5), (30, 1.5))
    for definition in metrics.SPEEDUPS:
        assert metrics.speedup_interval(even, VANILLA, definition) == pytest.approx((2.0, 2.0))
    # one paired question says nothing about the spread
    assert metrics.speedup_interval({1: METHOD[1], 4: METHOD[4]}, VANILLA) is None
    assert metrics.speedup_interval({}, VANILLA) is None


def test_bench_summary_shows_the_interval_and_none_below_two_questions(tmp_path):
    base = load_runs([vanilla(tmp_path / "v")])[0]
    records = load_runs([pld(tmp_path / "p")])[0].records           # q81 2x, q82 4x
    fields = speedups_against(base, records)
    assert fields["speedup"] == pytest.approx(3.0) and fields["speedup_total"] == pytest.approx(40 / 1.5 / 10)
    assert (fields["speedup_ci_low"], fields["speedup_ci_high"]) == pytest.approx((2.0, 4.0))
    summary = {"method": "pld", "model": "tiny", "bench": "mt_bench", "questions": 2, "new_tokens": 40,
               "wall_time": 1.5, "tokens_per_s": 40 / 1.5, "tau": 2.5, "run_dir": "runs/p", **fields}
    assert f"speedup vs {base.path}: 3.00x [2.00, 4.00] (mean of per-question" in format_summary(summary)
    json.dumps(summary, allow_nan=False)                              # summary.json stays strict JSON
    one = speedups_against(base, records[:1])
    assert one["speedup_ci_low"] is None and one["speedup_ci_high"] is None and one["speedup_questions"] == 1
    assert "2.00x [no interval: 1 paired question(s)]" in format_summary({**summary, **one})


def torn_folder(tmp_path, tail: bytes):
    folder = vanilla(tmp_path / "run")                    # questions 81 and 82, each line ended by a newline
    answers = folder / "answers.jsonl"
    with open(answers, "ab") as handle:
        handle.write(tail)
    return folder, answers


@pytest.mark.parametrize("tail", [b'{"question_id": 83, "tur',
                                  # a whole record whose newline never reached the disk: still not a record
                                  json.dumps({"question_id": 83, "category": "math", "turns": [turn(0, 4, 1.0)]}
                                             ).encode()])
def test_the_torn_line_rule_is_the_same_for_the_reports_and_the_store(tmp_path, tail):
    folder, answers = torn_folder(tmp_path, tail)
    before = answers.read_bytes()
    # the reader: reports and the store's reader see the same finished questions and change nothing
    [run] = load_runs([folder])
    assert sorted(run.questions()) == [81, 82]
    assert [r["question_id"] for r in read_records(answers)] == [81, 82]
    assert [r["question_id"] for r in RunStore(folder).records()] == [81, 82]
    assert answers.read_bytes() == before
    # the writer: a resume that is refused leaves the folder alone; one that runs cuts the tail off
    cfg = OmegaConf.create(json.loads((folder / "run.json").read_text())["config"])
    store = RunStore(folder)
    with pytest.raises(HarnessError, match="different max_new_tokens"):
        store.open(OmegaConf.merge(cfg, {"max_new_tokens": 99}), resume=True)
    assert answers.read_bytes() == before
    assert store.open(cfg, resume=True) == {81, 82}
    assert answers.read_bytes() == before[: before.rindex(b"\n") + 1]
    store.append({"question_id": 83, "category": "math", "turns": [turn(0, 4, 1.0)]})
    assert [r["question_id"] for r in store.records()] == [81, 82, 83]
    # the resumed run is unfinished until it writes its summary: reports leave it out unless asked
    assert not (folder / "summary.json").exists()
    with pytest.raises(HarnessError, match="include_unfinished=true"):
        load_runs([folder])
    assert sorted(load_runs([folder], include_unfinished=True)[0].questions()) == [81, 82, 83]


def test_a_torn_line_alone_is_cut_when_a_new_run_opens_the_folder(tmp_path):
    folder = tmp_path / "fresh"
    folder.mkdir()
    (folder / "answers.jsonl").write_bytes(b'{"question_id": 81, "tu')
    cfg = OmegaConf.create({"model": {"name": "tiny"}, "method": {"name": "vanilla"}, "bench": {"name": "mt_bench"}})
    assert RunStore(folder).open(cfg, resume=False) == set()
    assert (folder / "answers.jsonl").read_bytes() == b""


def test_a_damaged_finished_line_is_one_error_for_writer_and_reader(tmp_path):
    folder = vanilla(tmp_path / "run")
    answers = folder / "answers.jsonl"
    lines = answers.read_bytes().split(b"\n")
    answers.write_bytes(b"\n".join([lines[0], b'{"question_id": 8', *lines[1:]]))
    for read in (lambda: load_runs([folder]), lambda: RunStore(folder).records()):
        with pytest.raises(HarnessError, match=r"line 2 is not a JSON record; delete that line") as info:
            read()
        assert "\n" not in str(info.value)
