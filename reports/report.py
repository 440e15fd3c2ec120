"""`specdec-report`: run folders -> one DataFrame -> leaderboard, tables and figures.

    specdec-report runs=multirun/2026-01-01_12-00-00           # a sweep folder
    specdec-report "runs='runs/*_smollm2-135m_*'"              # a glob
    specdec-report "runs=[runs/a,runs/b]" out_dir=report/ab    # a list
    specdec-report runs=... speedup=spec_bench                 # leaderboard with Spec-Bench's definition and τ

Writes into out_dir: report.md (everything, with the figures), leaderboard.{md,csv,tex} (the three speedup
definitions: per_question, total, spec_bench; the chosen one first), summary / acceptance / topk_accuracy / ablation .{md,csv,tex},
turns.csv (one row per run x question x turn), runs.csv (one row per run), figures/*.png.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from harness.infra.app import hydra_app
from harness.infra.errors import HarnessError
from reports import figures, tables
from reports.compare import DEFINITIONS, Group, group_runs, host_notes, label_order, run_metrics
from reports.results import failed_jobs, load_runs, run_frame, task_of, task_order, turns_frame

log = logging.getLogger(__name__)


@dataclass
class Report:
    out_dir: Path
    leaderboard: str                                       # Markdown of the chosen definition, every group
    files: list[Path] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)  # "<group>/<name>" -> PNG
    turns: pd.DataFrame | None = None
    runs: pd.DataFrame | None = None
    metrics: pd.DataFrame | None = None                    # one row per run: speedups, τ, lossless, ...
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)   # numeric tables, `group` column added


class _Writer:
    """Collects one table (Markdown, CSV, LaTeX) over all groups, then writes the three files."""

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.markdown, self.latex, self.numbers = [], [], []

    def add(self, group: Group, display: pd.DataFrame, numbers: pd.DataFrame, note: str = "", heading: str = ""):
        if display is None or not len(display):
            return
        heading = heading or self.title
        self.markdown.append(f"### {heading}\n{group.title}" + (f"  \n{note}" if note else "") + "\n\n"
                             + tables.to_markdown(display) + "\n")
        self.latex.append(tables.to_latex(display, f"{heading}. {group.title}. {note}".strip(" .")))
        numbers = numbers.copy()
        numbers.insert(0, "group", group.slug)
        self.numbers.append(numbers)

    def write(self, out_dir: Path) -> list[Path]:
        if not self.numbers:
            return []
        paths = [out_dir / f"{self.name}.{ext}" for ext in ("md", "csv", "tex")]
        paths[0].write_text("\n".join(self.markdown))
        pd.concat(self.numbers, ignore_index=True).to_csv(paths[1], index=False)
        paths[2].write_text("\n".join(self.latex))
        return paths


def group_turns(turns: pd.DataFrame, group) -> pd.DataFrame:
    """The turn rows of one comparable group's runs."""
    return turns[turns["run_id"].isin([run.run_id for run in group.runs])]


def build_report(sources, out_dir: str | Path, definition: str = "per_question", baseline: str = "vanilla",
                 make_figures: bool = True, include_unfinished: bool = False) -> Report:
    if definition not in DEFINITIONS:
        raise HarnessError(f"speedup={definition} is not a definition; use one of {', '.join(DEFINITIONS)}")
    runs = load_runs(sources, include_unfinished)
    groups = group_runs(runs, baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    definitions = [definition] + [d for d in DEFINITIONS if d != definition]
    writers = {"leaderboard": _Writer("leaderboard", "Leaderboard"),
               "summary": _Writer("summary", "Summary"),
               "acceptance": _Writer("acceptance", "Acceptance per draft position"),
               "topk_accuracy": _Writer("topk_accuracy", "Draft top-k accuracy per position"),
               "ablation": _Writer("ablation", "Trigram ablation")}
    report = Report(out, "", turns=turns_frame(runs), runs=run_frame(runs))
    all_metrics, primary, figure_md = [], [], []
    for group in groups:
        bench = group.settings["bench"]
        tasks = task_order({task_of(r.get("category"), bench) for run in group.runs for r in run.records}, bench)
        metrics = run_metrics(group, tasks, baseline)
        labels = label_order(list(dict.fromkeys(r.label for r in group.runs)), metrics, baseline)
        for index, name in enumerate(definitions):
            display, numbers = tables.leaderboard(metrics, labels, tasks, name)
            numbers.insert(0, "definition", name)
            note = tables.definition_note(name) + ("" if index else " (the report's chosen definition)")
            writers["leaderboard"].add(group, display, numbers, note, f"Leaderboard — {DEFINITIONS[name]}")
            if index == 0:
                primary.append(f"### {group.title}\n{note}\n\n{tables.to_markdown(display)}\n")
        host = host_notes(metrics, baseline)
        for line in host:
            log.warning("host speed: %s", line)
        writers["summary"].add(group, *tables.summary(metrics, labels),
                               "tokens/s = total tokens / total time; lossless = questions token-identical "
                               f"to {baseline} (exact) or diverging first at a near-tie of the reference's "
                               "logits (rounding); MISMATCH = anything else, a bug until shown otherwise; host vs "
                               f"{baseline} = the 1-token target step while the run was timed over its "
                               f"{baseline}'s (the machine's own speed; – where a run has no probes)"
                               + "".join(f"\n- HOST: {line}" for line in host))
        accept, accuracy = tables.acceptance(group, labels), tables.topk(group, labels)
        writers["acceptance"].add(group, *accept, "P(draft token k accepted | tokens 1..k-1 accepted)")
        writers["topk_accuracy"].add(group, *accuracy, "teacher-forced: the target's greedy token at t+k in "
                                                       "the draft's top-j (`pos{k}_top{j}`)")
        ablation = tables.ablation(group, metrics)
        if ablation:
            writers["ablation"].add(group, *ablation, "ours vs ours_no_trigram; Δ = ours − ours_no_trigram")
        metrics.insert(0, "group", group.slug)
        all_metrics.append(metrics)
        if make_figures:
            folder = out / "figures" / (group.slug if len(groups) > 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            made = {
                "speedup_per_category": figures.speedup_per_category(
                    metrics, labels, tasks, definition, group.title, folder / "speedup_per_category.png", baseline),
                "accepted_length_histogram": figures.accepted_length_histogram(
                    group, labels, group.title, folder / "accepted_length_histogram.png"),
                "acceptance_per_position": figures.acceptance_per_position(
                    accept[1], accuracy[1], labels, group.title, folder / "acceptance_per_position.png"),
                "tokens_per_s_vs_draft_size": figures.tokens_per_s_vs_draft(
                    metrics, labels, group.title, folder / "tokens_per_s_vs_draft_size.png", baseline),
                "speedup_vs_tau": figures.speedup_vs_tau(
                    metrics, labels, definition, group.title, folder / "speedup_vs_tau.png", baseline),
                "stage_breakdown": figures.stage_breakdown(
                    group_turns(report.turns, group), labels, group.title, folder / "stage_breakdown.png"),
                "tokens_per_s_by_turn": figures.tokens_per_s_by_turn(
                    group_turns(report.turns, group), labels, group.title, folder / "tokens_per_s_by_turn.png"),
            }
            for name, path in made.items():
                if path is not None:
                    key = f"{group.slug}/{name}" if len(groups) > 1 else name
                    report.figures[key] = path
                    figure_md.append(f"![{key}]({path.relative_to(out)})")
    report.metrics = pd.concat(all_metrics, ignore_index=True)
    report.leaderboard = "\n".join(primary)
    for name, writer in writers.items():
        report.files += writer.write(out)
        if writer.numbers:
            report.tables[name] = pd.concat(writer.numbers, ignore_index=True)
    for name, frame in (("turns", report.turns), ("runs", report.runs), ("metrics", report.metrics)):
        frame.to_csv(out / f"{name}.csv", index=False)
        report.files.append(out / f"{name}.csv")
    sections = ["# specdec-harness report", f"{len(runs)} runs from {', '.join(map(str, _as_list(sources)))}", ""]
    sections += ["\n".join(w.markdown) for w in writers.values() if w.markdown]
    failed = failed_jobs(sources)
    if failed:
        sections += [f"## Failed jobs ({len(failed)}: stopped on bad input, no results)",
                     tables.to_markdown(pd.DataFrame(failed))]
        log.warning("%d sweep job(s) failed: %s", len(failed), "; ".join(f["folder"] for f in failed))
    sections += ["## Figures", *figure_md]
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    report.files.insert(0, out / "report.md")
    return report


def _as_list(sources) -> list:
    if isinstance(sources, (str, Path)):
        return [sources]
    return list(sources)


def default_out_dir(sources) -> Path:
    """One folder given: <folder>/report; else report_<time> in the current folder."""
    listed = _as_list(sources)
    if len(listed) == 1 and Path(str(listed[0])).is_dir():
        return Path(str(listed[0])) / "report"
    return Path("outputs") / f"report_{datetime.now():%Y-%m-%d_%H-%M-%S}"


def log_to_wandb(cfg: DictConfig, report: Report, sources) -> str | None:
    """The tables and figures as one W&B run (job_type report); returns its local folder."""
    from harness.infra.tracking import Tracker

    listed = _as_list(sources)
    group = Path(str(listed[0])).name if len(listed) == 1 else None
    models = sorted(set(report.runs["model"])) if report.runs is not None else []
    # one report run per report folder (per sweep): a second specdec-report call updates it in place
    import hashlib

    run_id = "report-" + hashlib.sha1(str(Path(report.out_dir).resolve()).encode()).hexdigest()[:16]
    tracker = Tracker.start(cfg, report.out_dir, "report", [*models, "report"],
                            name=f"report-{group or report.out_dir.name}", group=group, run_id=run_id)
    failed = True
    try:
        for name, frame in report.tables.items():
            tracker.table(name, frame.astype(object).where(frame.notna(), None).to_dict("records"))
        tracker.table("runs", report.metrics.astype(object).where(report.metrics.notna(), None).to_dict("records"))
        tracker.images({f"figures/{key}": path for key, path in report.figures.items()})
        failed = False
        return tracker.folder
    finally:
        tracker.finish(failed=failed)


def run_report(cfg: DictConfig) -> Report:
    sources = OmegaConf.to_container(cfg.runs, resolve=True) if OmegaConf.is_list(cfg.runs) else cfg.runs
    if not sources:
        raise HarnessError("runs= is empty; pass a sweep folder, a run folder, a glob or a list: "
                           "specdec-report runs=multirun/<time>")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(sources)
    report = build_report(sources, out_dir, cfg.speedup, cfg.baseline, bool(cfg.figures),
                          bool(cfg.get("include_unfinished")))
    folder = log_to_wandb(cfg, report, sources)
    if cfg.print:
        print(report.leaderboard)
        print("figures:")
        for path in report.figures.values():
            print(f"  {path}")
        print(f"tables: {report.out_dir}/report.md (+ .csv / .tex)")
        if folder:
            print(f"W&B report run: {folder}")
    return report


main = hydra_app("report", run_report)


if __name__ == "__main__":
    main()
