"""Speedup, τ and lossless against the matching vanilla run (../shared/DESIGN.md, "Metrics").

Every number comes from the glossary, harness/engine/metrics.py (its docstring defines each one); this
module only decides which runs are compared. The report shows three speedup definitions, `per_question`
(the mean of per-question ratios), `total` (total tokens / total time) and `spec_bench` (Spec-Bench's
evaluation/speed.py: the mean per-question tokens/s of the method over that of vanilla, a ratio of means),
each with its 95 % paired bootstrap interval (`speedup_<definition>_ci_low` / `_ci_high`: NaN below 2
questions). τ comes in two conventions: `tau` (prefill = 1 step, the harness's) and `tau_spec_bench` (decode
steps only, Spec-Bench's). harness/interleave.py's geometric mean of per-question ratios is in the glossary too.

Repeats (same method and settings, another `seed`) each get their own speedup against the vanilla run
with the same seed (else against all vanilla repeats pooled), then are shown as mean ± std.
A run is never compared with a vanilla run of other settings: that is a one-line HarnessError.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.engine import metrics as glossary
from harness.engine.lossless import classify, count, question_status
from harness.infra.errors import HarnessError
from reports.results import SETTINGS, Run, differences, task_of

# the definitions the report's tables show (the glossary names them all)
DEFINITIONS = {name: glossary.SPEEDUPS[name] for name in ("per_question", "total", "spec_bench")}


@dataclass
class Group:
    """Runs that may be compared with each other: the same settings (results.SETTINGS)."""
    settings: dict
    runs: list[Run]
    baselines: dict[str, list[Run]] = field(default_factory=dict)   # run_id -> its vanilla run(s)
    slug: str = ""

    @property
    def title(self) -> str:
        s = self.settings
        decoding = "greedy" if not s["temperature"] else f"T={s['temperature']}, top-p={s['top_p']}"
        extra = [f"{s['quantization']}" if s["quantization"] != "none" else "", f"dtype {s['dtype']}"
                 if s["dtype"] != "auto" else "", f"{s['threads']} threads" if s.get("threads") else "",
                 f"cpu_linear {s['linear']}" if s.get("linear") not in (None, "auto") else ""]
        return (f"{s['model']} · {s['bench']} · {s['device'].upper()} {s['hardware']} · {decoding} · "
                f"{s['max_new_tokens']} new tokens" + "".join(f" · {e}" for e in extra if e))


def _slug(settings: dict) -> str:
    text = f"{settings['model']}_{settings['bench']}_{settings['max_new_tokens']}tok"
    if settings["temperature"]:
        text += f"_T{settings['temperature']}"
    if settings.get("linear") not in (None, "auto"):
        text += f"_linear-{settings['linear']}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def question_totals(runs: list[Run]) -> dict[int, dict]:
    """Per question, summed over turns and over the given runs (repeats pool their time and tokens)."""
    return glossary.question_totals([record for run in runs for record in run.records])


def question_tasks(run: Run) -> dict[int, str]:
    bench = run.settings["bench"]
    return {record["question_id"]: task_of(record.get("category"), bench) for record in run.records}


def interval(method: dict[int, dict], vanilla: dict[int, dict], definition: str) -> tuple[float, float]:
    """The speedup's 95 % paired bootstrap interval as two floats; (NaN, NaN) below 2 paired questions."""
    bounds = glossary.speedup_interval(method, vanilla, definition)
    return bounds if bounds is not None else (math.nan, math.nan)


def group_runs(runs: list[Run], baseline: str = "vanilla") -> list[Group]:
    """Partition runs by settings and give every run its vanilla run(s); refuse what cannot be compared."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = tuple(str(run.settings.get(k)) for k in SETTINGS)
        groups.setdefault(key, Group(run.settings, [])).runs.append(run)
    vanillas = [r for r in runs if r.method == baseline]
    for group in groups.values():
        group.slug = _slug(group.settings)
        candidates = [r for r in group.runs if r.method == baseline]
        for run in group.runs:
            if not candidates:
                near = [v for v in vanillas if v.settings["model"] == run.settings["model"]
                        and v.settings["bench"] == run.settings["bench"]]
                if near:
                    closest = min(near, key=lambda v: len(differences(run.settings, v.settings)))
                    raise HarnessError(
                        f"cannot compute the speedup of {run.label} ({run.path}): the closest {baseline} run "
                        f"{closest.path} differs in {', '.join(differences(run.settings, closest.settings))}; "
                        f"run {baseline} with the same settings or leave one of them out of runs=")
                s = run.settings
                raise HarnessError(
                    f"no {baseline} run for {run.label} ({s['model']}, {s['bench']}, {s['max_new_tokens']} tokens, "
                    f"{s['device']}) in the report set; add one: specdec-bench method={baseline} model={s['model']} "
                    f"bench={s['bench']} max_new_tokens={s['max_new_tokens']} (same questions and decoding)")
            same_seed = [v for v in candidates if v.seed == run.seed]
            base = same_seed or candidates
            missing = run.questions() - set().union(*(v.questions() for v in base))
            if missing:
                shown = ", ".join(map(str, sorted(missing)[:5])) + (" ..." if len(missing) > 5 else "")
                raise HarnessError(
                    f"{run.path} answered questions its {baseline} run {base[0].path} lacks ({shown}); run "
                    f"{baseline} on the same questions (bench.limit / bench.question_ids)")
            group.baselines[run.run_id] = base
    if len({g.slug for g in groups.values()}) < len(groups):
        for index, group in enumerate(groups.values()):
            group.slug = f"{group.slug}_{index}"
    return list(groups.values())


def lossless(run: Run, base: list[Run], baseline: str = "vanilla") -> dict:
    """Questions per status (harness/engine/lossless.py: exact, near_tie, mismatch, compared) and `source`:
    `record` (the run's own check against `reference=`, divergences classified), `vanilla` (token ids
    compared here, greedy only: with no model at hand a divergence stays unclassified = mismatch;
    bench with reference=<vanilla run> to classify it), `reference` (the baseline itself) or `n/a`."""
    statuses = [question_status(r) for r in run.records]
    if any(s is not None for s in statuses):
        return {**count(statuses), "source": "record"}
    if run.method == baseline:
        return {**count([]), "source": "reference"}
    if not run.greedy:
        return {**count([]), "source": "n/a"}      # sampled runs are lossless in distribution, not token by token
    reference = {r["question_id"]: [t["token_ids"] for t in r["turns"]] for r in base[0].records}
    statuses = [classify([t["token_ids"] for t in r["turns"]], reference[r["question_id"]])["status"]
                for r in run.records if r["question_id"] in reference]
    return {**count(statuses), "source": "vanilla"}


def weight_mb(run: Run) -> float:
    """The target's weight memory as the run measured it after loading (MiB); NaN for runs that predate it."""
    measured = run.info.get("weight_memory_bytes")
    return measured / 2**20 if measured else math.nan


def run_metrics(group: Group, tasks: list[str], baseline: str = "vanilla") -> pd.DataFrame:
    """One row per run: tokens/s, τ, draft size, both speedups overall (with their 95 % intervals) and per
    task, lossless."""
    rows = []
    for run in group.runs:
        base = group.baselines[run.run_id]
        mine, theirs = question_totals([run]), question_totals(base)
        tasks_of = question_tasks(run)
        turns = glossary.turns_of(run.records)
        summed = glossary.totals(turns)
        wall = summed["wall_time"]
        checked = lossless(run, base, baseline)
        row = {"run_id": run.run_id, "label": run.label, "method": run.method, "seed": run.seed,
               "questions": len(run.records), "turns": len(turns), "new_tokens": summed["new_tokens"],
               "wall_time": wall, "tokens_per_s": glossary.tokens_per_s(summed["new_tokens"], wall),
               "tokens_per_s_mean": glossary.tokens_per_s_mean(mine),
               "tau": glossary.tau(summed["new_tokens"], summed["steps"]),
               "tau_spec_bench": glossary.tau_spec_bench(turns),
               "draft_tokens_per_step": glossary.draft_tokens_per_step(summed["draft_tokens"], summed["steps"]),
               "draft_share": glossary.stage_share(turns, "draft_time"),
               "verify_share": glossary.stage_share(turns, "verify_time"),
               **{f"lossless_{key}": value for key, value in checked.items()},
               "lossy": run.lossy, "untrained_head": run.untrained, "quantization": run.settings.get("quantization", "none"),
               "weight_mb": weight_mb(run),
               # the machine's speed when this run and its vanilla were timed (glossary: host step)
               "host_step_ms": glossary.host_step_ms(run.info.get("host_probes")),
               "host_spread": glossary.host_spread(run.info.get("host_probes")),
               "host_vs_baseline": glossary.host_ratio(run.info.get("host_probes"),
                                                       [p for b in base for p in b.info.get("host_probes", [])])}
        for definition in DEFINITIONS:
            row[f"speedup_{definition}"] = glossary.speedup(mine, theirs, definition)
            low, high = interval(mine, theirs, definition)
            row[f"speedup_{definition}_ci_low"], row[f"speedup_{definition}_ci_high"] = low, high
            for task in tasks:
                in_task = {qid: q for qid, q in mine.items() if tasks_of[qid] == task}
                row[f"{definition}:{task}"] = glossary.speedup(in_task, theirs, definition)
        rows.append(row)
    frame = pd.DataFrame(rows)
    # over repeats (seeds): every question's tokens and time pooled across the label's runs (and across their
    # vanilla runs), then the same paired bootstrap over questions: the interval of the pooled speedup
    for label in dict.fromkeys(run.label for run in group.runs):
        runs = [run for run in group.runs if run.label == label]
        if len(runs) < 2:
            continue
        bases = list({id(b): b for run in runs for b in group.baselines[run.run_id]}.values())
        mine, theirs = question_totals(runs), question_totals(bases)
        for definition in DEFINITIONS:
            low, high = interval(mine, theirs, definition)
            frame.loc[frame["label"] == label, f"speedup_{definition}_pooled_ci_low"] = low
            frame.loc[frame["label"] == label, f"speedup_{definition}_pooled_ci_high"] = high
    return frame


def mean_std(values) -> tuple[float, float, int]:
    array = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                       dtype=float)
    if array.size == 0:
        return math.nan, math.nan, 0
    # sample std (ddof=1) over repeats, as Spec-Bench reports its 3 runs; undefined for one run
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan, int(array.size)


def label_order(labels, metrics: pd.DataFrame, baseline: str = "vanilla") -> list[str]:
    """Best overall speedup first, the baseline last; `ours_no_trigram` right after `ours` (the ablation
    reads side by side)."""
    score = metrics.groupby("label")["speedup_per_question"].mean()
    ordered = sorted((l for l in labels if l != baseline), key=lambda l: (-score.get(l, -math.inf), l))
    for ablated in [l for l in ordered if l.startswith("ours_no_trigram")]:
        full = ablated.replace("ours_no_trigram", "ours", 1)
        if full in ordered:
            ordered.remove(ablated)
            ordered.insert(ordered.index(full) + 1, ablated)
    return ordered + [l for l in labels if l == baseline]


def check_baseline_run(baseline_dir: str, question_ids) -> Run:
    """`specdec-bench baseline_run=<folder>`, checked before the model loads: one finished vanilla run that
    answered some of this run's questions (speedups divide by vanilla, paired by question)."""
    from reports.results import load_runs

    found = load_runs([baseline_dir], include_unfinished=True)
    if len(found) != 1:
        raise HarnessError(f"baseline_run={baseline_dir} holds {len(found)} runs; point it at one finished run folder")
    base = found[0]
    if base.method != "vanilla":
        raise HarnessError(f"baseline_run={baseline_dir} is a {base.method} run; speedups divide by vanilla: point "
                           "it at a vanilla run with the same settings")
    if base.summary is None:
        raise HarnessError(f"baseline_run={baseline_dir} is unfinished (no summary.json); finish it (resume=true) or "
                           "point at a finished vanilla run")
    shared = base.questions() & set(question_ids)
    if not shared:
        raise HarnessError(f"baseline_run={baseline_dir} answered none of this run's {len(set(question_ids))} "
                           f"questions (it has {len(base.questions())}); point it at a vanilla run of the same "
                           "bench selection")
    return base


def check_baseline(baseline_dir: str, run_dir) -> Run:
    """`specdec-bench baseline_run=<folder>`: that run, after checking its settings match this run's."""
    from harness.infra.store import RUN_INFO, read_json
    from reports.results import load_runs, settings_of

    found = load_runs([baseline_dir])
    if len(found) != 1:
        raise HarnessError(f"baseline_run={baseline_dir} holds {len(found)} runs; point it at one finished run folder")
    base = found[0]
    mine = settings_of(read_json(Path(run_dir) / RUN_INFO) or {})
    if differences(mine, base.settings):
        raise HarnessError(f"baseline_run={baseline_dir} cannot be this run's baseline: it differs in "
                           f"{', '.join(differences(mine, base.settings))}; point it at a run with the same settings")
    return base


def sweep_vanilla(run_dir, sweep_dir=None) -> Run | None:
    """A finished vanilla job of the same sweep with this run's settings (model, bench, decoding, hardware,
    threads, ...), so a sweep's jobs get speedups and a lossless reference without `baseline_run=`: the jobs run
    in the order given, so list vanilla first (`method=vanilla,pld,...`). The same seed is preferred."""
    from harness.infra.store import RUN_INFO, SUMMARY, read_json
    from reports.results import find_run_dirs, load_runs, settings_of

    from harness.infra.app import sweep_dir as current_sweep

    sweep_dir = sweep_dir or current_sweep()
    if sweep_dir is None or not Path(sweep_dir).is_dir():
        return None
    mine_info = read_json(Path(run_dir) / RUN_INFO) or {}
    mine = settings_of(mine_info)
    try:
        folders = find_run_dirs([sweep_dir])
    except HarnessError:
        return None
    candidates = []
    for folder in folders:
        info = read_json(folder / RUN_INFO) or {}
        if folder.resolve() == Path(run_dir).resolve() or not (folder / SUMMARY).is_file():
            continue
        if (info.get("config", {}).get("method", {}).get("name")) != "vanilla" or differences(mine, settings_of(info)):
            continue
        candidates.extend(load_runs([folder]))
    seed = mine_info.get("config", {}).get("seed")
    candidates.sort(key=lambda run: run.seed != seed)
    return candidates[0] if candidates else None


def speedups_against(base: Run, records: list[dict]) -> dict:
    """Summary keys for a bench run with a known baseline (both definitions over shared questions; the
    interval is `speedup`'s, the mean of per-question ratios; None below 2 paired questions)."""
    mine, theirs = glossary.question_totals(records), question_totals([base])
    if not mine.keys() & theirs.keys():      # nothing paired: no speedup, never "nanx"
        return {"speedup": None, "speedup_total": None, "speedup_spec_bench": None, "speedup_ci_low": None,
                "speedup_ci_high": None, "speedup_questions": 0, "baseline_run": str(base.path),
                "baseline_method": base.method}
    bounds = glossary.speedup_interval(mine, theirs, "per_question")
    return {"speedup": glossary.speedup(mine, theirs, "per_question"),
            "speedup_total": glossary.speedup(mine, theirs, "total"),
            "speedup_spec_bench": glossary.speedup(mine, theirs, "spec_bench"),
            "speedup_ci_low": bounds[0] if bounds else None, "speedup_ci_high": bounds[1] if bounds else None,
            "speedup_questions": len(mine.keys() & theirs.keys()), "baseline_run": str(base.path),
            "baseline_method": base.method}


def host_notes(metrics: pd.DataFrame, baseline: str = "vanilla") -> list[str]:
    """One line per run whose host step is off its vanilla's (or whose own probes drift) by more than the
    glossary's HOST_TOLERANCE: its speedups carry the machine's change too."""
    notes = []
    for row in metrics.itertuples():
        ratio, spread = row.host_vs_baseline, row.host_spread
        if ratio == ratio and abs(ratio - 1) > glossary.HOST_TOLERANCE:
            notes.append(f"{row.label} ({row.run_id}): the 1-token target step was {100 * (ratio - 1):+.1f} % vs "
                         f"its {baseline}'s while each was timed (host step {row.host_step_ms:.2f} ms): the machine "
                         "was slower or faster, not only the method; rerun the two side by side, or read the "
                         "speedup with that in mind")
        if spread == spread and spread > 1 + glossary.HOST_TOLERANCE:
            notes.append(f"{row.label} ({row.run_id}): its host probes spread {100 * (spread - 1):.1f} % "
                         "(slowest / fastest probe): timed across changing machine speed")
    return notes
