"""The metric glossary (shared DESIGN.md, "Metrics - one glossary"): every number a run summary, W&B, a
report table or an interleaved timing shows is computed here, from plain records (answers.jsonl dicts)
or plain numbers. Undefined values (a zero denominator, a method that does not report its drafts) are NaN.

- tokens/s (total): generated token ids (never re-tokenised text) / wall time (prefill + decode), every turn.
- tokens/s (mean): mean over questions of (the question's tokens over all turns / its wall time over all turns).
- τ (mean accepted length) = generated tokens / verify steps, bonus included, prefill = one step (vanilla 1.00).
  This convention is stated next to every τ the harness prints ("τ (prefill = 1 step)").
- τ, Spec-Bench's convention (`tau_spec_bench`) = tokens of the decode steps / decode steps: the prefill's token
  and step are left out of every turn (Spec-Bench's evaluation/speed.py averages the accept lengths the
  decoding loop records after the prefill). The same for vanilla (1.00); above τ for any method that drafts
  (the left-out prefill step commits 1 token, below the average).
- draft tokens per step = draft tokens proposed / verify steps (unknown when a turn lacks `draft_sizes`).
- acceptance at position k = P(draft token k accepted | tokens 1..k-1 accepted) = accepted at k / attempted at k.
- stage seconds: prefill / draft / verify / bookkeeping time summed over turns (unknown when a turn lacks it);
  a stage's share = its seconds / wall time.
- speedup `per_question` = mean over shared questions of (method tokens/s on q) / (vanilla tokens/s on q)
  (summary.json `speedup`, the report's default).
- speedup `total` = (method's total tokens / total time) / (vanilla's total tokens / total time), shared questions
  (summary.json `speedup_total`).
- speedup `spec_bench` = (mean over shared questions of method tokens/s) / (the same mean for vanilla): Spec-Bench's
  evaluation/speed.py, a ratio of means, between `per_question` and `total` (report column "Speedup (Spec-Bench)").
- speedup `geometric` = exp(mean over shared questions of log(per-question ratio)), zero ratios left out
  (harness/interleave.py `ratio_paired`).
- speedup 95 % interval: paired bootstrap over questions - draw the shared questions with replacement (each
  draw keeps that question's method and vanilla numbers together), recompute the speedup, take the 2.5th and
  97.5th percentiles of 2000 draws (seed 0: the same records give the same interval); None below 2 paired
  questions (summary.json `speedup_ci_low` / `speedup_ci_high`, report `speedup_<definition>_ci_low/high`).
- lossless: exact / near_tie / mismatch per question (harness/engine/lossless.py); rate = (exact + near_tie) / compared.
- host step (ms) = median over a run's host probes of one 1-token target step over the bench's first prompt
  (harness/engine/timing.py `host_probe`: after the warm-up, every `host_probe_every` questions and at the end of
  every sitting, the same input for every method), run.json `host_probes`. host vs baseline = the run's host step / its vanilla's: the
  machine's own speed, apart from any method, when each was timed. Speedups are not corrected by it; a ratio off
  1 by more than HOST_TOLERANCE (a sweep resumed on a slower or busier host) is reported beside them.
"""

from __future__ import annotations

import math
import random

from harness.engine import lossless

HOST_TOLERANCE = 0.05      # host step off its vanilla's by more than 5 %: the report says so beside the speedups
STAGES = ("prefill_time", "draft_time", "verify_time", "bookkeeping_time")
SPEEDUPS = {"per_question": "mean of per-question speedups",
            "total": "total tokens / total time, method over vanilla",
            "spec_bench": "mean per-question tokens/s, method over vanilla (Spec-Bench's speed.py)",
            "geometric": "geometric mean of per-question speedups"}
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


# ---- plain numbers -------------------------------------------------------------------------------------

def tokens_per_s(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds else math.nan


def tau(tokens: float, steps: float) -> float:
    return tokens / steps if steps else math.nan


def tau_spec_bench(turns: list[dict]) -> float:
    """τ with Spec-Bench's convention: the prefill step and its token left out of every turn."""
    started = [t for t in turns if t["steps"] > 0]
    tokens = sum(max(t["new_tokens"] - 1, 0) for t in started)
    steps = sum(t["steps"] - 1 for t in started)
    return tokens / steps if steps else math.nan


def draft_tokens_per_step(draft_tokens: float | None, steps: float) -> float:
    return draft_tokens / steps if steps and draft_tokens is not None else math.nan


def acceptance_per_position(attempted: list[int], accepted: list[int]) -> list[float | None]:
    """Rate per position; None where nothing was attempted (no draft ever reached that far)."""
    return [took / tried if tried else None for took, tried in zip(accepted, attempted)]


# ---- records -------------------------------------------------------------------------------------------

def turns_of(records: list[dict]) -> list[dict]:
    return [turn for record in records for turn in record["turns"]]


def totals(turns: list[dict]) -> dict:
    """Sums over turns: new_tokens, wall_time, steps, and draft_tokens (None when a turn lacks draft_sizes)."""
    return {"new_tokens": sum(t["new_tokens"] for t in turns), "wall_time": sum(t["wall_time"] for t in turns),
            "steps": sum(t["steps"] for t in turns),
            "draft_tokens": (sum(sum(t["draft_sizes"]) for t in turns)
                             if all(t.get("draft_sizes") is not None for t in turns) else None)}


def stage_seconds(turns: list[dict], stage: str) -> float | None:
    values = [t.get(stage) for t in turns]
    return sum(values) if values and all(v is not None for v in values) else None


def stage_share(turns: list[dict], stage: str) -> float:
    seconds = stage_seconds(turns, stage)
    wall = sum(t["wall_time"] for t in turns)
    return seconds / wall if wall and seconds is not None else math.nan


def position_counts(turns: list[dict]) -> tuple[list[int], list[int]]:
    """(attempted, accepted) draft tokens per position, summed over turns."""
    depth = max((len(t.get("pos_attempted") or []) for t in turns), default=0)
    attempted, accepted = [0] * depth, [0] * depth
    for turn in turns:
        for k, n in enumerate((turn.get("pos_attempted") or [])[:depth]):
            attempted[k] += n
        for k, n in enumerate((turn.get("pos_accepted") or [])[:depth]):
            accepted[k] += n
    return attempted, accepted


def question_totals(records: list[dict]) -> dict[int, dict]:
    """question id -> totals() over its turns; records of several runs (repeats) pool per question."""
    turns: dict[int, list[dict]] = {}
    for record in records:
        turns.setdefault(record["question_id"], []).extend(record["turns"])
    return {qid: totals(turns[qid]) for qid in sorted(turns)}


def tokens_per_s_mean(per_question: dict[int, dict]) -> float:
    """Mean of per-question tokens/s (questions with no measured time are left out)."""
    rates = [tokens_per_s(q["new_tokens"], q["wall_time"]) for q in per_question.values() if q["wall_time"]]
    return sum(rates) / len(rates) if rates else math.nan


# ---- speedups ------------------------------------------------------------------------------------------

def _pairs(method: dict[int, dict], vanilla: dict[int, dict]) -> list[tuple[dict, dict]]:
    return [(method[qid], vanilla[qid]) for qid in sorted(method) if qid in vanilla]


def _ratio(mine: dict, theirs: dict) -> float:
    """One question's speedup; NaN when either side has no rate or vanilla's rate is zero."""
    base = tokens_per_s(theirs["new_tokens"], theirs["wall_time"])
    rate = tokens_per_s(mine["new_tokens"], mine["wall_time"])
    return rate / base if base and not (math.isnan(base) or math.isnan(rate)) else math.nan


def _mean_of_ratios(pairs: list[tuple[dict, dict]]) -> float:
    ratios = [r for r in (_ratio(m, v) for m, v in pairs) if not math.isnan(r)]
    return sum(ratios) / len(ratios) if ratios else math.nan


def _total_over_total(pairs: list[tuple[dict, dict]]) -> float:
    if not pairs:
        return math.nan
    method = tokens_per_s(sum(m["new_tokens"] for m, _ in pairs), sum(m["wall_time"] for m, _ in pairs))
    base = tokens_per_s(sum(v["new_tokens"] for _, v in pairs), sum(v["wall_time"] for _, v in pairs))
    return method / base if base and not math.isnan(base) else math.nan


def _ratio_of_mean_rates(pairs: list[tuple[dict, dict]]) -> float:
    rates = [(tokens_per_s(m["new_tokens"], m["wall_time"]), tokens_per_s(v["new_tokens"], v["wall_time"]))
             for m, v in pairs]
    rates = [(a, b) for a, b in rates if not (math.isnan(a) or math.isnan(b))]
    if not rates:
        return math.nan
    base = sum(b for _, b in rates) / len(rates)
    return (sum(a for a, _ in rates) / len(rates)) / base if base else math.nan


def _geometric_mean_of_ratios(pairs: list[tuple[dict, dict]]) -> float:
    # a zero ratio (no tokens) has no logarithm: such questions are left out, as undefined ones are
    logs = [math.log(r) for r in (_ratio(m, v) for m, v in pairs) if r > 0]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


_DEFINED_BY = {"per_question": _mean_of_ratios, "total": _total_over_total, "spec_bench": _ratio_of_mean_rates,
               "geometric": _geometric_mean_of_ratios}


def _definition(definition: str):
    if definition not in _DEFINED_BY:
        # a caller's bug, not user input (the report checks `speedup=` itself): the glossary imports no infra
        raise ValueError(f"unknown speedup definition '{definition}'; use one of {', '.join(SPEEDUPS)}")
    return _DEFINED_BY[definition]


def speedup(method: dict[int, dict], vanilla: dict[int, dict], definition: str = "per_question") -> float:
    """`method` and `vanilla` from question_totals; over the questions both answered."""
    return _definition(definition)(_pairs(method, vanilla))


def paired_questions(method: dict[int, dict], vanilla: dict[int, dict]) -> int:
    """Shared questions with a defined per-question ratio: what the bootstrap resamples."""
    return sum(not math.isnan(_ratio(m, v)) for m, v in _pairs(method, vanilla))


def _percentile(ordered: list[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), on a sorted list."""
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def speedup_interval(method: dict[int, dict], vanilla: dict[int, dict], definition: str = "per_question",
                     seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95
                     ) -> tuple[float, float] | None:
    """The paired bootstrap interval of speedup(method, vanilla, definition); None below 2 paired questions
    (one question says nothing about the spread)."""
    compute = _definition(definition)
    pairs = [(m, v) for m, v in _pairs(method, vanilla) if not math.isnan(_ratio(m, v))]
    if len(pairs) < 2:
        return None
    rng = random.Random(seed)
    draws = [compute(rng.choices(pairs, k=len(pairs))) for _ in range(resamples)]
    ordered = sorted(d for d in draws if not math.isnan(d))
    if not ordered:
        return None
    tail = (1.0 - level) / 2
    return _percentile(ordered, tail), _percentile(ordered, 1.0 - tail)


# ---- a run ---------------------------------------------------------------------------------------------

def summarize(records: list[dict]) -> dict:
    """summary.json of a bench run (field names are a stable contract: run folders are read later)."""
    turns = turns_of(records)
    summed = totals(turns)
    summary = {
        "questions": len(records),
        "turns": len(turns),
        "new_tokens": summed["new_tokens"],
        "wall_time": summed["wall_time"],
        "tokens_per_s": tokens_per_s(summed["new_tokens"], summed["wall_time"]),
        "tokens_per_s_mean": tokens_per_s_mean(question_totals(records)),
        "tau": tau(summed["new_tokens"], summed["steps"]),
        "tau_spec_bench": tau_spec_bench(turns),
        "steps": summed["steps"],
        "draft_tokens": summed["draft_tokens"],
    }
    for stage in STAGES:
        summary[stage] = stage_seconds(turns, stage)
    summary["acceptance_per_position"] = acceptance_per_position(*position_counts(turns))
    summary.update(lossless.summary_fields(records))
    return summary


def host_step_ms(probes: list[dict] | None) -> float:
    """Median of the probes' `step_ms` (NaN without probes: runs from before them)."""
    values = sorted(float(p["step_ms"]) for p in probes or [] if p.get("step_ms") is not None)
    if not values:
        return math.nan
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def host_spread(probes: list[dict] | None) -> float:
    """Slowest over fastest probe of one run (1.0 = steady; NaN below 2 probes): the drift inside a run."""
    values = [float(p["step_ms"]) for p in probes or [] if p.get("step_ms") is not None]
    return max(values) / min(values) if len(values) >= 2 and min(values) > 0 else math.nan


def host_ratio(probes: list[dict] | None, baseline_probes: list[dict] | None) -> float:
    """host step of a run / host step of its baseline (NaN when either has no probes)."""
    mine, theirs = host_step_ms(probes), host_step_ms(baseline_probes)
    return mine / theirs if theirs > 0 and not math.isnan(mine) else math.nan
