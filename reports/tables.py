"""Report tables: each builder returns (display, numbers): display = strings for Markdown/LaTeX
(mean ± std over repeats), numbers = the same as floats for CSV (`<column>` and `<column>_std`).
A speedup also shows its 95 % paired bootstrap interval over questions (`1.23x [1.10, 1.35]`; numbers
`<column>_ci_low` / `_ci_high`): for one run over its questions, for repeats (seeds) over the questions with
each question's tokens and time pooled across the runs; over repeats the ± std is the spread between runs."""

from __future__ import annotations

import math

import pandas as pd

from harness.engine import metrics as glossary
from harness.engine import lossless
from harness.engine.lossless import format_counts
from reports.compare import DEFINITIONS, Group, mean_std
from reports.results import TOPK_KEY

TAU = "#Mean Accepted Tokens"
# the τ convention rides in every τ header (harness/engine/metrics.py defines both)
PREFILL_COUNTED = "prefill = 1 step"
SPEC_BENCH_CONVENTION = "Spec-Bench: decode steps only"
TAU_OURS = f"τ ({PREFILL_COUNTED})"
TAU_SPEC_BENCH = f"τ ({SPEC_BENCH_CONVENTION})"
OVERALL = "Overall"


def cell(mean: float, std: float, digits: int = 2, suffix: str = "") -> str:
    if mean is None or math.isnan(mean):
        return "—"
    text = f"{mean:.{digits}f}{suffix}"
    return text if std is None or math.isnan(std) else f"{text} ± {std:.{digits}f}"


def _stat(metrics: pd.DataFrame, label: str, column: str) -> tuple[float, float, int]:
    return mean_std(metrics.loc[metrics["label"] == label, column].tolist())


def interval_of(rows: pd.DataFrame, column: str) -> tuple[float, float]:
    """The 95 % interval of a speedup column: for one run compare.run_metrics' `<column>_ci_low/high` (paired
    bootstrap over its questions); for repeats `<column>_pooled_ci_low/high` (each question pooled over the
    runs, then the same bootstrap); NaN below 2 paired questions or for a column without one."""
    key = f"{column}_ci" if len(rows) == 1 else f"{column}_pooled_ci"
    if not len(rows) or f"{key}_low" not in rows:
        return math.nan, math.nan
    return float(rows[f"{key}_low"].iloc[0]), float(rows[f"{key}_high"].iloc[0])


def with_interval(text: str, low: float, high: float, digits: int = 2) -> str:
    if text == "—" or math.isnan(low) or math.isnan(high):
        return text
    return f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def leaderboard(metrics: pd.DataFrame, labels: list[str], tasks: list[str], definition: str
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spec-Bench's leaderboard: rows = methods, columns = categories, τ, Overall (speedup: `definition`).
    τ follows the definition's convention: Spec-Bench's (decode steps only) on the spec_bench leaderboard,
    the harness's (prefill = 1 step) on the others; the header says which."""
    display, numbers = [], []
    convention, tau_column = ((SPEC_BENCH_CONVENTION, "tau_spec_bench") if definition == "spec_bench"
                              else (PREFILL_COUNTED, "tau"))
    for label in labels:
        shown, values = {"Method": label}, {"method": label}
        for name, column, suffix in ([(t, f"{definition}:{t}", "x") for t in tasks]
                                     + [(TAU, tau_column, ""), (OVERALL, f"speedup_{definition}", "x")]):
            mean, std, runs = _stat(metrics, label, column)
            shown[f"{name} ({convention})" if name == TAU else name] = cell(mean, std, suffix=suffix)
            values[name], values[f"{name}_std"] = mean, std
        values["tau_convention"] = convention
        rows = metrics[metrics["label"] == label]
        low, high = interval_of(rows, f"speedup_{definition}")
        shown[OVERALL] = with_interval(shown[OVERALL], low, high)
        values[f"{OVERALL}_ci_low"], values[f"{OVERALL}_ci_high"] = low, high
        values["runs"] = runs
        host_column(rows, shown, values)
        # a leaderboard row never hides a mismatch: the lossless column rides along
        shown["Lossless"] = lossless_cell(rows)
        values.update(_lossless_numbers(rows))
        display.append(shown)
        numbers.append(values)
    return pd.DataFrame(display), pd.DataFrame(numbers)


LOSSLESS_COUNTS = ("exact", "near_tie", "mismatch", "compared")


def lossless_counts(rows: pd.DataFrame) -> dict:
    """A method's questions per lossless status, summed over its runs (repeats)."""
    return {key: int(rows[f"lossless_{key}"].sum()) for key in LOSSLESS_COUNTS}


def lossless_cell(rows: pd.DataFrame) -> str:
    """"18 exact + 2 near-tie / 20", or "MISMATCH 1/20; ..." (harness/engine/lossless.py spells both)."""
    sources = set(rows["lossless_source"])
    prefix = "LOSSY by design; " if rows["lossy"].any() else ""
    if sources == {"reference"}:
        return "reference"
    if sources == {"n/a"}:
        return "n/a (sampling)"
    text = format_counts(lossless_counts(rows))
    if "vanilla" in sources and int(rows["lossless_mismatch"].sum()):
        text += " (ids only, unclassified)"      # no margins: bench with reference=<vanilla run> to classify
    return prefix + text


def _lossless_numbers(rows: pd.DataFrame) -> dict:
    counts = lossless_counts(rows)
    rate = lossless.rate(counts)
    return {"lossless_rate": math.nan if rate is None else rate,
            **{f"lossless_{key}": value for key, value in counts.items()}}


def summary(metrics: pd.DataFrame, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    columns = [("Tokens/s", "tokens_per_s", 2, ""),
               ("Speedup (per-question)", "speedup_per_question", 2, "x"),
               ("Speedup (total)", "speedup_total", 2, "x"),
               ("Speedup (Spec-Bench)", "speedup_spec_bench", 2, "x"),
               (TAU_OURS, "tau", 2, ""), (TAU_SPEC_BENCH, "tau_spec_bench", 2, ""),
               ("Draft tokens/step", "draft_tokens_per_step", 2, ""),
               ("Draft time %", "draft_share", 1, ""), ("Verify time %", "verify_share", 1, ""),
               ("Weights MiB", "weight_mb", 1, "")]
    display, numbers = [], []
    for label in labels:
        rows = metrics[metrics["label"] == label]
        quantization = ", ".join(sorted(set(rows["quantization"])))
        shown = {"Method": label, "Runs": len(rows), "Questions": int(rows["questions"].iloc[0]),
                 "Quantization": quantization}
        values = {"method": label, "runs": len(rows), "questions": int(rows["questions"].iloc[0]),
                  "quantization": quantization}
        for name, column, digits, suffix in columns:
            scale = 100.0 if column.endswith("_share") else 1.0
            mean, std, _ = mean_std((rows[column] * scale).tolist())
            shown[name] = cell(mean, std, digits, suffix)
            values[column], values[f"{column}_std"] = mean, std
            if column.startswith("speedup_"):
                low, high = interval_of(rows, column)
                shown[name] = with_interval(shown[name], low, high, digits)
                values[f"{column}_ci_low"], values[f"{column}_ci_high"] = low, high
        host_column(rows, shown, values)
        shown["Lossless"] = lossless_cell(rows)
        values.update(_lossless_numbers(rows))
        display.append(shown)
        numbers.append(values)
    return pd.DataFrame(display), pd.DataFrame(numbers)


def host_column(rows: pd.DataFrame, shown: dict, values: dict) -> None:
    """The machine's speed beside the speedups: the runs' host step over their vanilla's (glossary), as
    "+3.1 %" (slower host) or "–" for runs without probes."""
    host = rows["host_vs_baseline"].dropna() if "host_vs_baseline" in rows else rows.iloc[:0]
    shown["Host vs vanilla"] = f"{100 * (host.mean() - 1):+.1f} %" if len(host) else "–"
    values["host_vs_baseline"] = float(host.mean()) if len(host) else math.nan


def acceptance(group: Group, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """P(draft token k accepted | tokens 1..k-1 accepted), pooled over a method's repeats."""
    rates = {}
    for label in labels:
        turns = glossary.turns_of([record for run in group.runs if run.label == label for record in run.records])
        attempted, accepted = glossary.position_counts(turns)
        if any(attempted):
            rate = glossary.acceptance_per_position(attempted, accepted)
            rates[label] = ([math.nan if r is None else r for r in rate], attempted)
    depth = max((len(v) for v, _ in rates.values()), default=0)
    rows = []
    for label, (rate, tried) in rates.items():
        row = {"method": label}
        for k in range(depth):
            row[f"pos{k + 1}"] = rate[k] if k < len(rate) else math.nan
            row[f"pos{k + 1}_n"] = tried[k] if k < len(tried) else 0     # attempts: how much a rate is worth
        rows.append(row)
    numbers = pd.DataFrame(rows)
    display = pd.DataFrame({"Method": numbers["method"]} if len(numbers) else {})
    for k in range(depth):
        display[f"pos{k + 1}"] = [f"{cell(r, math.nan)} ({n})" if n else "—"
                                  for r, n in zip(numbers[f"pos{k + 1}"], numbers[f"pos{k + 1}_n"])]
    return display, numbers


def topk_columns(keys) -> list[str]:
    return sorted({k for k in keys if TOPK_KEY.match(k)},
                  key=lambda k: tuple(int(x) for x in TOPK_KEY.match(k).groups()))


def topk(group: Group, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Draft top-k accuracy per position (`pos{k}_top{j}`, from the runs' `topk_accuracy`)."""
    columns = topk_columns(k for run in group.runs for k in run.topk_accuracy)
    display, numbers = [], []
    for label in labels:
        runs = [r for r in group.runs if r.label == label and r.topk_accuracy]
        if not runs:
            continue
        shown, values = {"Method": label}, {"method": label}
        for column in columns:
            mean, std, _ = mean_std([r.topk_accuracy.get(column, math.nan) for r in runs])
            shown[column], values[column], values[f"{column}_std"] = cell(mean, std, 3), mean, std
        display.append(shown)
        numbers.append(values)
    return pd.DataFrame(display), pd.DataFrame(numbers)


def ablation(group: Group, metrics: pd.DataFrame, full: str = "ours", ablated: str = "ours_no_trigram"
             ) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The trigram ablation side by side, with the difference the trigram makes."""
    labels = set(metrics["label"])
    if full not in labels or ablated not in labels:
        return None
    accept_display, accept = acceptance(group, [full, ablated])
    _, accuracy = topk(group, [full, ablated])
    numbers = []
    for label in (full, ablated):
        values = {"method": label}
        for name, column in (("speedup (per-question)", "speedup_per_question"),
                             ("speedup (total)", "speedup_total"), (TAU_OURS, "tau"),
                             ("tokens/s", "tokens_per_s")):
            values[name] = _stat(metrics, label, column)[0]
        for frame in (accept, accuracy):
            if len(frame) and label in set(frame["method"]):
                row = frame[frame["method"] == label].iloc[0]
                values.update({k: row[k] for k in frame.columns
                               if k != "method" and not k.endswith(("_std", "_n"))})
        numbers.append(values)
    numbers = pd.DataFrame(numbers)
    delta = {"method": "Δ trigram"}
    delta.update({k: numbers[k].iloc[0] - numbers[k].iloc[1] for k in numbers.columns if k != "method"})
    numbers = pd.concat([numbers, pd.DataFrame([delta])], ignore_index=True)
    display = numbers.rename(columns={"method": "Method"}).copy()
    for column in display.columns[1:]:
        display[column] = [cell(v, math.nan, 3) for v in numbers[column]]
    return display, numbers


def to_markdown(display: pd.DataFrame) -> str:
    return display.to_markdown(index=False, disable_numparse=True)


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
LATEX_SYMBOLS = {"±": r"$\pm$", "τ": r"$\tau$", "Δ": r"$\Delta$", "—": "--", "·": r"$\cdot$", "−": "-",
                 "×": r"$\times$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(char, char) for char in text)


def to_latex(display: pd.DataFrame, caption: str) -> str:
    text = display.to_latex(index=False, escape=True, caption=latex_escape(caption),
                            column_format="l" + "c" * (display.shape[1] - 1))
    for symbol, command in LATEX_SYMBOLS.items():
        text = text.replace(symbol, command)
    return text


def definition_note(definition: str) -> str:
    return f"speedup = {DEFINITIONS[definition]}; [low, high] = 95 % paired bootstrap interval over questions"
