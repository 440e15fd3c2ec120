"""Run folders -> pandas DataFrames.

A source is a run folder (holds run.json), a folder holding run folders anywhere below it (a multirun
sweep), or a glob of either. Every run reads `run.json` (resolved config, hardware),
`answers.jsonl` (one record per question) and, when the run finished, `summary.json`, through
harness/infra/store.py (the file names and the torn-last-line rule live there, shared with the writer).
Every number is computed by the glossary, harness/engine/metrics.py.

Frames:
- `turns_frame(runs)`: one row per run x question x turn (tokens, time, steps, draft tokens, ...);
- `run_frame(runs)`: one row per run (its settings and totals).

Two runs are comparable (a speedup may divide one by the other) only when their `settings` agree:
model, bench (and its turn limit), max_new_tokens, temperature, top_p, quantization, dtype, device
type, the CPU/GPU, and on a CPU the torch thread count.

Top-k accuracy (written by runs with trained heads) is read from `summary.json`, else `run.json`,
key `topk_accuracy`: a flat dict `{"pos1_top1": 0.71, "pos1_top5": 0.93, "pos2_top1": ...}`, position
k = the k-th draft token (teacher-forced: the target's greedy token at t+k is in the draft's top-j).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.engine import metrics as glossary
from harness.engine.lossless import question_status
from harness.infra.errors import HarnessError
from harness.infra.store import ANSWERS, RUN_INFO, SUMMARY, read_json, read_records

log = logging.getLogger(__name__)

SETTINGS = ("model", "bench", "max_turns", "max_new_tokens", "temperature", "top_p", "quantization", "dtype",
            "device", "hardware", "threads", "linear")
TOPK_KEY = re.compile(r"^pos(\d+)_top(\d+)$")

# Spec-Bench's leaderboard columns (github.com/hemingkx/Spec-Bench, Leaderboard.md)
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_TASKS = {"translation": "Translation", "summarization": "Summarization", "qa": "Question Answering",
                    "math_reasoning": "Mathematical Reasoning", "rag": "Retrieval-aug. Generation"}
MULTI_TURN = "Multi-turn Conversation"


def task_of(category: str, bench: str) -> str:
    """The leaderboard column of a question: MT-Bench's own category, or for spec_bench its task group."""
    if bench == "spec_bench":
        return MULTI_TURN if category in MT_BENCH_CATEGORIES else SPEC_BENCH_TASKS.get(category, category)
    return category


def task_order(tasks, bench: str) -> list[str]:
    canonical = ([MULTI_TURN, *SPEC_BENCH_TASKS.values()] if bench == "spec_bench" else list(MT_BENCH_CATEGORIES))
    present = set(tasks)
    return [t for t in canonical if t in present] + sorted(present - set(canonical))


@dataclass
class Run:
    path: Path
    info: dict                      # run.json
    records: list[dict]             # answers.jsonl
    summary: dict | None            # summary.json; None while unfinished
    run_id: str = ""
    label: str = ""                 # the method as the tables name it
    settings: dict = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.info.get("config", {})

    @property
    def method(self) -> str:
        return self.config.get("method", {}).get("name") or self.info.get("method", "?")

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def lossy(self) -> bool:
        """The method config declares a lossy acceptance rule (e.g. Medusa's typical acceptance)."""
        return bool(self.config.get("method", {}).get("lossy", False))

    @property
    def untrained(self) -> bool:
        """The run drafted with a random head (allow_untrained=true): run.json's `head`, else (runs from before it
        was recorded) a head method's config with head_path null."""
        head = self.info.get("head")
        if head is not None:
            return bool(head.get("untrained"))
        method = self.config.get("method", {})
        return "head_path" in method and not method.get("head_path")

    @property
    def greedy(self) -> bool:
        return float(self.settings.get("temperature") or 0.0) == 0.0

    @property
    def topk_accuracy(self) -> dict[str, float]:
        found = (self.summary or {}).get("topk_accuracy") or self.info.get("topk_accuracy") or {}
        return {k: float(v) for k, v in found.items() if TOPK_KEY.match(k) and v is not None}

    def questions(self) -> set[int]:
        return {r["question_id"] for r in self.records}


def settings_of(info: dict) -> dict:
    cfg = info.get("config", {})
    hardware = info.get("hardware", {}) or {}
    device = str(hardware.get("device") or cfg.get("device") or "cpu").split(":")[0]
    name = hardware.get("gpu") if device == "cuda" else hardware.get("cpu")
    if device == "cpu" and hardware.get("cpu_count"):
        name = f"{name} ({hardware['cpu_count']} cores)"
    if info.get("mixed_provenance"):          # a forced resume: its timings come from more than one setting
        name = f"mixed: {name} + earlier ({'; '.join(d for m in info['mixed_provenance'] for d in m['differences'])})"
    decoding = cfg.get("decoding", {})
    return {"model": cfg.get("model", {}).get("name"), "bench": cfg.get("bench", {}).get("name"),
            "max_turns": cfg.get("bench", {}).get("max_turns"), "max_new_tokens": cfg.get("max_new_tokens"),
            "temperature": float(decoding.get("temperature", 0.0)), "top_p": float(decoding.get("top_p", 1.0)),
            "quantization": info.get("quantization") or cfg.get("model", {}).get("quantization") or "none",
            "dtype": cfg.get("model", {}).get("dtype", "auto"), "device": device, "hardware": name,
            "threads": hardware.get("torch_threads") if device == "cpu" else None,
            # the runtime under the model (model.cpu_linear: auto | onednn | off): timings with packed oneDNN
            # linears are not a baseline for plain ones (None: a run from before the option)
            "linear": cfg.get("model", {}).get("cpu_linear")}


def differences(a: dict, b: dict) -> list[str]:
    return [f"{key} ({a.get(key)} vs {b.get(key)})" for key in SETTINGS if a.get(key) != b.get(key)]


def _natural(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_run_dirs(sources) -> list[Path]:
    if isinstance(sources, (str, Path)):
        sources = [sources]
    found: list[Path] = []
    for source in sources or []:
        source = str(Path(str(source)).expanduser())
        matches = sorted(glob.glob(source)) if glob.has_magic(source) else [source]
        if not matches or not Path(matches[0]).exists():
            raise HarnessError(f"runs: '{source}' matches no folder; pass a run folder, a sweep folder or a glob")
        for match in map(Path, matches):
            if (match / RUN_INFO).is_file():
                found.append(match)
            elif match.is_dir():
                found.extend(sorted((p.parent for p in match.rglob(RUN_INFO)), key=_natural))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise HarnessError(f"no run folders (with {RUN_INFO}) in {', '.join(map(str, sources or []))}; "
                           "point runs= at a specdec-bench run or sweep folder")
    return unique


def failed_jobs(sources) -> list[dict]:
    """The sweep jobs that stopped on bad input under `sources`: their `failed.json` markers (harness/infra/app.py),
    each with its folder."""
    found = []
    for source in _source_list(sources):
        for match in map(Path, sorted(glob.glob(source)) if glob.has_magic(source) else [source]):
            markers = [match / "failed.json"] if (match / "failed.json").is_file() else sorted(match.rglob("failed.json"))
            for marker in markers:
                try:
                    info = json.loads(marker.read_text())
                except (OSError, ValueError):
                    info = {"error": "unreadable failed.json"}
                found.append({"folder": str(marker.parent), "error": info.get("error"),
                              "overrides": " ".join(info.get("overrides") or [])})
    return found


def _source_list(sources) -> list[str]:
    if isinstance(sources, (str, Path)):
        sources = [sources]
    return [str(Path(str(source)).expanduser()) for source in sources or []]


def _flat(value, prefix="") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _label_runs(runs: list[Run]) -> None:
    """A label is the method's name, plus the method parameters that differ between runs of that name
    (`pld[max_draft=5]`), so a sweep over a method's parameters gives one row per setting, plus
    ` (lossy)` when the method config declares `lossy: true` and ` (UNTRAINED head)` when it drafted with a random
    head (allow_untrained=true), so no table shows such a row as the method's number."""
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.method, []).append(run)
    for name, group in by_name.items():
        params = [_flat({k: v for k, v in r.config.get("method", {}).items() if k != "name"}) for r in group]
        keys = sorted({k for p in params for k in p})
        varying = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in params}) > 1]
        for run, p in zip(group, params):
            run.label = name + (f"[{','.join(f'{k}={p.get(k)}' for k in varying)}]" if varying else "")
            run.label += " (lossy)" if run.lossy else ""
            run.label += " (UNTRAINED head)" if run.untrained else ""


def load_runs(sources, include_unfinished: bool = False) -> list[Run]:
    """The run folders under `sources` with answers. A run without summary.json (still running, killed, or
    extended and not finished) is left out with one warning unless `include_unfinished` (then its finished
    questions count): a half run averaged in as a repeat would skew a method's mean."""
    runs = []
    for path in find_run_dirs(sources):
        info = read_json(path / RUN_INFO)
        if info is None:
            raise HarnessError(f"{path / RUN_INFO} is not valid JSON; remove that folder from runs=")
        records = read_records(path / ANSWERS)
        if not records:
            log.warning("skipping %s: no answers yet", path)
            continue
        run = Run(path, info, records, read_json(path / SUMMARY))
        if run.summary is None:
            if not include_unfinished:
                log.warning("leaving out %s: unfinished (no summary.json; %d questions answered); resume it or pass "
                            "include_unfinished=true", path, len(records))
                continue
            log.warning("%s has no summary.json (unfinished): using its %d finished questions", path, len(records))
        run.settings = settings_of(info)
        runs.append(run)
    if not runs:
        raise HarnessError(f"none of the run folders in {sources} is finished with answers; finish a run first "
                           "(or include_unfinished=true)")
    _label_runs(runs)
    names = [r.path.name for r in runs]
    for run in runs:
        # the folder name, unless two runs share it (runs from different sweeps)
        run.run_id = run.path.name if names.count(run.path.name) == 1 else f"{run.path.parent.name}/{run.path.name}"
    return runs


def turns_frame(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        bench = run.settings["bench"]
        for record in run.records:
            lossless = record.get("lossless")     # per question; its status repeats on every turn row
            for turn in record["turns"]:
                draft_tokens = glossary.totals([turn])["draft_tokens"]
                rows.append({
                    "run_id": run.run_id, "label": run.label, "method": run.method, "seed": run.seed,
                    "question_id": record["question_id"], "category": record.get("category"),
                    "task": task_of(record.get("category"), bench), "turn": turn["turn"],
                    "new_tokens": turn["new_tokens"], "wall_time": turn["wall_time"], "steps": turn["steps"],
                    "tokens_per_s": glossary.tokens_per_s(turn["new_tokens"], turn["wall_time"]),
                    "tau": glossary.tau(turn["new_tokens"], turn["steps"]),
                    "draft_tokens": math.nan if draft_tokens is None else draft_tokens,
                    "prefill_time": turn.get("prefill_time"), "draft_time": turn.get("draft_time"),
                    "verify_time": turn.get("verify_time"), "bookkeeping_time": turn.get("bookkeeping_time"),
                    "stop_reason": turn.get("stop_reason"),
                    "lossless": None if lossless is None else bool(lossless.get("match")),
                    "lossless_status": question_status(record),
                })
    return pd.DataFrame(rows)


def run_frame(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        turns = glossary.turns_of(run.records)
        summed = glossary.totals(turns)
        rows.append({"run_id": run.run_id, "label": run.label, "method": run.method, "seed": run.seed,
                     **run.settings, "questions": len(run.records), "turns": len(turns),
                     "new_tokens": summed["new_tokens"], "wall_time": summed["wall_time"], "steps": summed["steps"],
                     "tokens_per_s": glossary.tokens_per_s(summed["new_tokens"], summed["wall_time"]),
                     "tau": glossary.tau(summed["new_tokens"], summed["steps"]),
                     "draft_tokens_per_step": glossary.draft_tokens_per_step(summed["draft_tokens"], summed["steps"]),
                     "finished": run.summary is not None, "path": str(run.path),
                     **run.topk_accuracy})
    return pd.DataFrame(rows)
