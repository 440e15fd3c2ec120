"""A run folder as the answer files other tools read: Spec-Bench's (its evaluation/speed.py computes speedups
and mean accepted tokens from them) and FastChat's MT-Bench (`fastchat.llm_judge` judges them: the lossy
methods, e.g. medusa_typical, need a quality score, not a token match).

    python -m reports.export runs/<run> --format spec_bench --out answers/<model>-<method>.jsonl
    python -m reports.export runs/<run> --format fastchat --out data/mt_bench/model_answer/<model_id>.jsonl

One line per question, sorted by id. Both carry `question_id`, `answer_id`, `model_id`, `tstamp` and
`choices[0].turns` (the answer texts). Spec-Bench's lines add `category` and, in `choices[0]`, per turn
`new_tokens`, `wall_time` and `decoding_steps`, and `accept_lengths` over the run's decode steps: Spec-Bench's
convention, which leaves each turn's prefill step out (our τ counts it as a step; `tau_spec_bench` matches the
mean of these). The counts are our token ids, never re-tokenised text. An unfinished run is refused unless
`--include-unfinished`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from harness.infra.errors import HarnessError
from reports.results import load_runs

FORMATS = ("spec_bench", "fastchat")


def answer_id(run_id: str, question_id: int) -> str:
    """Stable per run and question (FastChat uses a random shortuuid; a stable id keeps exports diffable)."""
    return hashlib.sha1(f"{run_id}:{question_id}".encode()).hexdigest()[:22]


def decode_accept_lengths(turn: dict) -> list[int]:
    """A turn's accepted tokens per decode step (the prefill step, the first entry, left out)."""
    return [int(n) for n in (turn.get("accepted_lengths") or [])[1:]]


def answer_line(record: dict, model_id: str, run_id: str, stamp: float, fmt: str) -> dict:
    turns = record["turns"]
    choice = {"index": 0, "turns": [t.get("text", "") for t in turns]}
    if fmt == "spec_bench":
        choice.update(decoding_steps=[max(int(t["steps"]) - 1, 0) for t in turns],
                      new_tokens=[int(t["new_tokens"]) for t in turns],
                      wall_time=[float(t["wall_time"]) for t in turns],
                      accept_lengths=[n for t in turns for n in decode_accept_lengths(t)])
    line = {"question_id": record["question_id"], "answer_id": answer_id(run_id, record["question_id"]),
            "model_id": model_id, "choices": [choice], "tstamp": stamp}
    if fmt == "spec_bench":
        line["category"] = record.get("category")
    return line


def export_run(run_dir: str | Path, out: str | Path, fmt: str, model_id: str | None = None,
               include_unfinished: bool = False) -> Path:
    """Write `run_dir`'s answers as `fmt` lines into `out` (replaced atomically); returns the path."""
    if fmt not in FORMATS:
        raise HarnessError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    runs = load_runs([run_dir], include_unfinished=include_unfinished)
    if len(runs) != 1:
        raise HarnessError(f"{run_dir} holds {len(runs)} runs; export one run folder at a time")
    run = runs[0]
    model_id = model_id or f"{run.settings['model']}-{run.method}"
    created = (run.summary or {}).get("created") or run.info.get("created")
    stamp = _timestamp(created)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in sorted(run.records, key=lambda r: r["question_id"]):
            handle.write(json.dumps(answer_line(record, model_id, run.run_id, stamp, fmt), ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


def _timestamp(created: str | None) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(created).timestamp() if created else 0.0
    except ValueError:
        return 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reports.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run folder (holds run.json and answers.jsonl)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="the answer file to write (.jsonl)")
    parser.add_argument("--model-id", default=None, help="model_id in every line (default: <model>-<method>)")
    parser.add_argument("--include-unfinished", action="store_true", help="export a run without summary.json")
    args = parser.parse_args(argv)
    try:
        path = export_run(args.run_dir, args.out, args.format, args.model_id, args.include_unfinished)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
