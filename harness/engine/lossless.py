"""The lossless check, implemented once: each question of a run against a reference run of the same
model, dtype and settings (shared DESIGN.md, "Metrics - one glossary").

- `exact`: every turn token-identical to the reference.
- `near_tie`: at the first divergence, the reference's own logits under the shared prefix (prompt +
  the tokens both runs generated) put the token each side chose within `tolerance` of the best logit:
  the two runs rounded a (near-)tie differently - a tree verify and a one-token step do not compute
  bit-identical logits - which is rounding, not the method.
- `mismatch`: anything else (a divergence between clearly separated logits, one run stopping where
  the other goes on, a turn the reference lacks): a bug until shown otherwise.

The reference stores no logits, so the margin is recomputed here: one forward of the target over the
shared prefix, top-2 of the logits at the divergent position. A turn after a divergent turn has a
different prompt (it carries the diverged answer): it cannot be compared on its own and takes the
status of the turn it follows (`follows_turn`). Old records (`match` only, no `status`) and token-id
comparisons without a model count a divergence as `mismatch`: unclassified is not cleared.

Everything that classifies, counts or spells a lossless result lives here: bench, summary, W&B and
reports all call these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from harness.infra.errors import HarnessError

STATUSES = ("exact", "near_tie", "mismatch")      # best to worst

# logit units. A near-tie is two tokens whose logits differ by less than the rounding noise of two
# mathematically equal forwards (a tree verify of n tokens vs a one-token step: other GEMM shapes,
# other accumulation orders). Measured on SmolLM2-135M on CPU (shared DESIGN.md): bf16 up to 0.375,
# fp32 5e-5.
# - bf16 (8-bit mantissa): logits of magnitude 16-32 are spaced 0.125-0.25 apart, so 0.375 is 2-3 ulp;
#   0.5 covers the measured worst case with a little room and is still a small gap between two logits.
# - fp16 (11-bit mantissa, 8x finer than bf16 at the same magnitude): 0.375 / 8 ≈ 0.05, doubled: 0.1.
# - fp32: 20x the measured 5e-5; a real argmax change (a bug) moves logits by far more than 1e-3.
AUTO_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.1}


def parse_tolerance(setting) -> float | None:
    """`lossless.tolerance`: "auto" (None here: resolved from the dtype once the model loads) or a float >= 0."""
    if setting is None or str(setting).strip().lower() == "auto":
        return None
    try:
        value = float(setting)
    except (TypeError, ValueError):
        value = -1.0
    if not value >= 0:
        raise HarnessError(f"lossless.tolerance={setting} is not valid; use auto or a logit gap >= 0 (e.g. 0.5)")
    return value


def tolerance_for(setting, dtype: torch.dtype) -> float:
    value = parse_tolerance(setting)
    if value is not None:
        return value
    if dtype not in AUTO_TOLERANCE:
        raise HarnessError(f"lossless.tolerance=auto has no value for dtype {dtype}; set lossless.tolerance=<float>")
    return AUTO_TOLERANCE[dtype]


def first_divergence(ids: Sequence[int], ref: Sequence[int]) -> int | None:
    """First position where the two token lists differ (a length difference counts), None if equal."""
    position = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), None)
    if position is None and len(ids) != len(ref):
        position = min(len(ids), len(ref))
    return position


# (reference prefix ids: prompt + shared tokens) -> the target's next-token logits [vocab]
LogitsFn = Callable[[list[int]], torch.Tensor]


def _divergence(ids: list[int], ref: list[int], position: int, prefix: list[int] | None,
                logits_at: LogitsFn | None, tolerance: float) -> dict:
    token = ids[position] if position < len(ids) else None
    ref_token = ref[position] if position < len(ref) else None
    entry = {"status": "mismatch", "position": position, "margin": None, "token": token,
             "reference_token": ref_token}
    if token is None or ref_token is None:
        entry["reason"] = "this run stopped where the reference went on" if token is None else \
            "the reference stopped where this run went on"
        return entry
    if logits_at is None or prefix is None:
        entry["reason"] = "not classified (no model to recompute the reference's logits)"
        return entry
    logits = logits_at(prefix + ref[:position]).float()
    top = logits.topk(2)
    best = float(top.values[0])
    gaps = {side: best - float(logits[t]) for side, t in (("token_gap", token), ("reference_gap", ref_token))}
    entry.update(margin=float(top.values[0] - top.values[1]), top2=[int(i) for i in top.indices], **gaps)
    # near-tie: both choices within rounding noise of the best logit (for the usual case, the two
    # sides picked the reference's top-2 and the margin between them is below the tolerance)
    if max(gaps.values()) <= tolerance:
        entry["status"] = "near_tie"
    return entry


def classify(turns: list[list[int]], reference_turns: list[list[int]],
             reference_prompt: Callable[[int], list[int]] | None = None, logits_at: LogitsFn | None = None,
             tolerance: float = 0.0) -> dict:
    """One question: token ids per turn of this run vs the reference's. `reference_prompt(i)` gives
    the prompt ids of the reference's turn i; `logits_at` one forward of the target (both None: a
    divergence stays unclassified = mismatch). Returns the record's `lossless` entry."""
    result, status, follows = [], "exact", None
    for index, ids in enumerate(turns):
        if index >= len(reference_turns):
            entry = {"status": "mismatch", "position": 0, "margin": None, "reason": "the reference has no such turn"}
        else:
            ref = reference_turns[index]
            position = first_divergence(ids, ref)
            if position is None:
                entry = {"status": "exact", "position": None, "margin": None}
            elif follows is not None:
                # this turn's prompt carries a diverged answer: not comparable, explained by that turn
                entry = {"status": status, "position": position, "margin": None, "follows_turn": follows}
            else:
                prefix = reference_prompt(index) if reference_prompt is not None else None
                entry = _divergence(ids, ref, position, prefix, logits_at, tolerance)
        entry = {"turn": index, **entry, "match": entry["status"] == "exact"}
        if entry["status"] != "exact" and follows is None:
            follows, status = index, entry["status"]
        elif STATUSES.index(entry["status"]) > STATUSES.index(status):
            status = entry["status"]
        result.append(entry)
    return {"status": status, "match": status == "exact", "tolerance": tolerance, "turns": result}


def question_status(record: dict) -> str | None:
    """The lossless status of one answers.jsonl record; None when it was not checked."""
    lossless = record.get("lossless")
    if lossless is None:
        return None
    if lossless.get("status") in STATUSES:
        return lossless["status"]
    return "exact" if lossless.get("match") else "mismatch"     # a record from before the classification


def count(statuses) -> dict:
    """{exact, near_tie, mismatch, compared} over the given statuses (None = not checked, skipped)."""
    checked = [s for s in statuses if s is not None]
    counts = {s: checked.count(s) for s in STATUSES}
    counts["compared"] = len(checked)
    return counts


def rate(counts: dict) -> float | None:
    """lossless rate = (exact + near_tie) / compared: not a mismatch (token-identical or a rounding near-tie);
    None when nothing was compared."""
    return (counts["exact"] + counts["near_tie"]) / counts["compared"] if counts["compared"] else None


def summary_fields(records: list[dict]) -> dict:
    """The run summary's lossless keys (all None when no question was checked against a reference)."""
    counts = count(question_status(r) for r in records)
    compared = counts["compared"]
    if not compared:
        return {"lossless": None, "lossless_rate": None, "lossless_exact": None, "lossless_near_tie": None,
                "lossless_mismatch": None, "lossless_compared": None, "lossless_mismatch_questions": None,
                "lossless_tolerance": None}
    tolerances = [r["lossless"].get("tolerance") for r in records if r.get("lossless")]
    tolerances = [t for t in tolerances if t is not None]
    return {"lossless": format_counts(counts),
            "lossless_tolerance": max(tolerances) if tolerances else None,
            "lossless_rate": rate(counts),
            "lossless_exact": counts["exact"], "lossless_near_tie": counts["near_tie"],
            "lossless_mismatch": counts["mismatch"], "lossless_compared": compared,
            "lossless_mismatch_questions": [r["question_id"] for r in records if question_status(r) == "mismatch"]}


def format_counts(counts: dict) -> str:
    """"18 exact + 2 near-tie / 20"; a mismatch leads, in capitals: "MISMATCH 1/20; 17 exact + 2 near-tie / 20"."""
    compared = counts["compared"]
    if not compared:
        return "—"
    text = f"{counts['exact']} exact + {counts['near_tie']} near-tie / {compared}"
    if counts["mismatch"]:
        text = f"MISMATCH {counts['mismatch']}/{compared}; {text}"
    return text


def mismatch_details(records: list[dict]) -> str:
    """`q84 (turn 0, position 12: token 31 vs reference 17, margin 2.41)`, for every mismatched question."""
    parts = []
    for record in records:
        if question_status(record) != "mismatch":
            continue
        turns = [t for t in record["lossless"].get("turns", []) if "follows_turn" not in t
                 and t.get("status", "exact" if t.get("match") else "mismatch") == "mismatch"]
        where = ""
        if turns:
            t = turns[0]
            where = f"turn {t.get('turn', '?')}, position {t.get('position', t.get('first_diff'))}"
            if t.get("token") is not None or t.get("reference_token") is not None:
                where += f": token {t.get('token')} vs reference {t.get('reference_token')}"
            if t.get("margin") is not None:
                where += f", reference top-2 margin {t['margin']:.4g}"
            where = f" ({where})"
        parts.append(f"q{record['question_id']}{where}")
    return ", ".join(parts)


class LosslessCheck:
    """The bench's check against `reference=`: classifies each question as it finishes. The margin
    forward runs on its own Target (its own KV cache), after the question's timed turns."""

    def __init__(self, loaded, tolerance_setting):
        from harness.engine.target import Target

        self.template = loaded.template
        self.target = Target(loaded.model)
        self.tolerance = tolerance_for(tolerance_setting, loaded.dtype)

    @torch.inference_mode()
    def logits_at(self, prefix: list[int]) -> torch.Tensor:
        _, logits = self.target.prefill(prefix)
        self.target.cache = None     # free the cache: it is not needed again
        return logits

    def __call__(self, question, turns: list[dict], reference: dict) -> dict:
        ref_turns = reference["turns"]

        def reference_prompt(index: int) -> list[int]:
            return self.template.turn_prompt(question.turns, [t["text"] for t in ref_turns[:index]])

        return classify([t["token_ids"] for t in turns], [t["token_ids"] for t in ref_turns], reference_prompt,
                        self.logits_at, self.tolerance)
