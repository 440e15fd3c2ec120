"""Run summaries, with the definitions of shared DESIGN.md ("Metrics - one glossary").

- tokens/s: generated token ids (never re-tokenised text) / wall time (prefill + decode), every turn.
- τ (mean accepted length) = generated tokens / verify steps, bonus included, prefill = one step.
- acceptance at position k = P(draft token k accepted | tokens 1..k-1 accepted).
- lossless: exact / near_tie / mismatch per question (harness/engine/lossless.py); rate = (exact + near_tie) / compared.
"""

from __future__ import annotations

import math

from harness.engine import lossless


def _turns(records: list[dict]) -> list[dict]:
    return [turn for record in records for turn in record["turns"]]


def summarize(records: list[dict]) -> dict:
    turns = _turns(records)
    tokens = sum(t["new_tokens"] for t in turns)
    wall = sum(t["wall_time"] for t in turns)
    steps = sum(t["steps"] for t in turns)
    per_question = [sum(t["new_tokens"] for t in r["turns"]) / sum(t["wall_time"] for t in r["turns"])
                    for r in records if sum(t["wall_time"] for t in r["turns"]) > 0]
    summary = {
        "questions": len(records),
        "turns": len(turns),
        "new_tokens": tokens,
        "wall_time": wall,
        "tokens_per_s": tokens / wall if wall else math.nan,             # total tokens / total time
        "tokens_per_s_mean": sum(per_question) / len(per_question) if per_question else math.nan,
        "tau": tokens / steps if steps else math.nan,
        "steps": steps,
        "draft_tokens": (sum(sum(t["draft_sizes"]) for t in turns)
                         if all(t.get("draft_sizes") is not None for t in turns) else None),
    }
    for stage in ("prefill_time", "draft_time", "verify_time", "bookkeeping_time"):
        values = [t.get(stage) for t in turns]
        summary[stage] = sum(values) if values and all(v is not None for v in values) else None
    depth = max((len(t.get("pos_attempted") or []) for t in turns), default=0)
    attempted = [sum((t.get("pos_attempted") or [])[k] if k < len(t.get("pos_attempted") or []) else 0
                     for t in turns) for k in range(depth)]
    accepted = [sum((t.get("pos_accepted") or [])[k] if k < len(t.get("pos_accepted") or []) else 0
                    for t in turns) for k in range(depth)]
    summary["acceptance_per_position"] = [a / n if n else None for a, n in zip(accepted, attempted)]
    summary.update(lossless.summary_fields(records))
    return summary
