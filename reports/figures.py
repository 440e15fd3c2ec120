"""Report figures (matplotlib, Agg): each as PNG (200 dpi) and PDF (vector, for papers) beside it, titled with
the group's settings. Error bars on speedups are 95 % paired bootstrap intervals over questions (pooled
over repeats), never a zero-width cap where there is no interval."""

from __future__ import annotations

import math
import re
import textwrap
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harness.engine import metrics as glossary  # noqa: E402
from reports.compare import DEFINITIONS, Group, mean_std  # noqa: E402
from reports.tables import interval_of, topk_columns  # noqa: E402

MAX_ACCEPTED = 10   # histogram bins 1..9 and "10+"
MARKERS = "osD^v<>phP*X"


def _colors(labels: list[str]) -> dict[str, tuple]:
    """One colour per label: tab10, or tab20 past ten labels (a 12-method sweep must not reuse a colour)."""
    cmap, count = (plt.get_cmap("tab10"), 10) if len(labels) <= 10 else (plt.get_cmap("tab20"), 20)
    return {label: cmap(i % count) for i, label in enumerate(labels)}


def _title(ax, head: str, settings: str) -> None:
    """The figure's subject, then the group's settings wrapped to the figure's width so nothing clips."""
    width = max(40, int(ax.figure.get_figwidth() * 10.5))    # ~10 characters per inch of axes at 8.5 pt
    lines = [*textwrap.wrap(head, width), *textwrap.wrap(settings, width)]
    ax.set_title("\n".join(lines), fontsize=8.5)


def _save(fig, path: Path) -> Path:
    """`path` (.png) and the same figure as .pdf beside it; returns the PNG's path."""
    if fig.get_layout_engine() is None:    # a figure laid out by constrained layout keeps it
        fig.tight_layout()
    fig.savefig(path, dpi=200)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)
    return path



def speedup_per_category(metrics: pd.DataFrame, labels: list[str], tasks: list[str], definition: str,
                         title: str, path: Path, baseline: str = "vanilla") -> Path | None:
    methods = [l for l in labels if l != baseline]
    if not methods:
        return None
    columns = tasks + ["Overall"]
    width = 0.8 / len(methods)
    x = np.arange(len(columns))
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(columns) + 0.4 * len(methods)), 4.2))
    # a bar narrower than a "1.23" label at 7 pt (~18 pt) takes its label upright (axes ~80 % of the figure)
    bar_points = 72 * 0.8 * fig.get_figwidth() * width / len(columns)
    top, crowded = 1.0, bar_points < 20
    for i, label in enumerate(methods):
        rows = metrics[metrics["label"] == label]
        stats = [mean_std(rows[f"{definition}:{c}" if c != "Overall" else f"speedup_{definition}"]) for c in columns]
        means = [s[0] for s in stats]
        # Overall: the 95 % interval; a category: the spread over repeats (± std) where there are repeats
        low, high = interval_of(rows, f"speedup_{definition}")
        # the bar is the mean over repeats, the interval the pooled speedup's: the mean may sit just outside it
        below = [s[1] for s in stats[:-1]] + [max(means[-1] - low, 0.0)]
        above = [s[1] for s in stats[:-1]] + [max(high - means[-1], 0.0)]
        positions = x - 0.4 + width * (i + 0.5)
        ax.bar(positions, means, width, label=label, color=colors[label])
        for position, mean, down, up in zip(positions, means, below, above):
            if not (math.isnan(mean) or math.isnan(down) or math.isnan(up)):
                ax.errorbar(position, mean, yerr=[[down], [up]], capsize=2, elinewidth=0.8, ecolor="0.3")
                top = max(top, mean + up)
        # each value above its bar's error bar, never struck through by it; upright when the bars are narrow
        for position, mean, up in zip(positions, means, above):
            if not math.isnan(mean):
                ax.annotate(f"{mean:.2f}", (position, mean + (0.0 if math.isnan(up) else up)), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=6.5 if crowded else 7,
                            rotation=90 if crowded else 0)
        top = max([top, *[m for m in means if not math.isnan(m)]])
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8, label=f"{baseline} = 1")
    ax.set_xticks(x, columns, rotation=20 if len(columns) > 4 else 0, ha="right" if len(columns) > 4 else "center")
    ax.set_ylabel(f"speedup over {baseline} (×)")
    ax.text(1.0, -0.22 if len(columns) > 4 else -0.12, "bars: Overall 95 % interval over questions; categories "
            "± std over repeats", transform=ax.transAxes, ha="right", fontsize=6.5, color="0.35")
    ax.set_ylim(0, top * (1.45 if crowded else 1.3))   # room for the labels and the legend above the tallest bar
    _title(ax, f"Speedup per category — {DEFINITIONS[definition]}", title)
    ax.legend(fontsize=8, ncol=min(len(methods) + 1, 4), loc="upper left")
    return _save(fig, path)


def accepted_length_histogram(group: Group, labels: list[str], title: str, path: Path) -> Path | None:
    """Fraction of verify steps that committed 1, 2, ... tokens (bonus token included)."""
    counts, taus = {}, {}
    for label in labels:
        lengths = [n for run in group.runs if run.label == label for record in run.records
                   for turn in record["turns"] for n in turn["accepted_lengths"]]
        if lengths:
            counts[label] = Counter(min(n, MAX_ACCEPTED) for n in lengths)
            taus[label] = glossary.tau(sum(lengths), len(lengths))   # one length per verify step
    if not counts:
        return None
    longest = max(max(c) for c in counts.values())
    bins = np.arange(1, longest + 1)
    width = 0.8 / len(counts)
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(bins) + 3), 4.2))
    for i, (label, counter) in enumerate(counts.items()):
        total = sum(counter.values())
        ax.bar(bins - 0.4 + width * (i + 0.5), [counter.get(b, 0) / total for b in bins], width,
               label=f"{label} (τ = {taus[label]:.2f})", color=colors[label])
    ax.set_xticks(bins, [str(b) if b < MAX_ACCEPTED else f"{MAX_ACCEPTED}+" for b in bins])
    ax.set_xlabel("tokens committed per verify step\n(accepted draft tokens + the bonus token; prefill = one step of 1)")
    # log scale: the long accepted runs that make a method fast are a few percent of its steps
    ax.set_yscale("log")
    smallest = min(n / sum(c.values()) for c in counts.values() for n in c.values())
    ax.set_ylim(smallest / 2, 1.5)
    ax.set_ylabel("fraction of steps (log scale)")
    _title(ax, "Accepted length per step", title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def acceptance_per_position(accept: pd.DataFrame, accuracy: pd.DataFrame, labels: list[str], title: str,
                            path: Path) -> Path | None:
    """Left: P(draft token k accepted | 1..k-1 accepted), with the attempts behind each rate in a panel below it
    (a rate over 3 attempts says little). Right (when runs carry it): draft top-1/top-5 accuracy at position k
    (teacher-forced)."""
    if not len(accept) and not len(accuracy):
        return None
    panels = 2 if len(accuracy) else 1
    positions = [c for c in accept.columns if re.fullmatch(r"pos\d+", c)]
    attempts = accept[[f"{c}_n" for c in positions if f"{c}_n" in accept]].apply(pd.to_numeric, errors="coerce")
    counted = bool((attempts > 0).to_numpy().any())    # else no attempts panel (nothing drafted, or not recorded)
    fig = plt.figure(figsize=(5.4 * panels, 5.2 if counted else 4.2), layout="constrained")
    grid = fig.add_gridspec(2 if counted else 1, panels, height_ratios=(2.6, 1.0) if counted else None)
    colors = _colors(labels)
    ax = fig.add_subplot(grid[0, 0])
    counts = fig.add_subplot(grid[1, 0], sharex=ax) if counted else None
    for i, (_, row) in enumerate(accept.iterrows()):
        values = [row[c] for c in positions]
        ks = range(1, len(values) + 1)
        style = dict(marker=MARKERS[i % len(MARKERS)], color=colors[row["method"]], alpha=0.85)
        # distinct markers: methods with equal rates would otherwise hide each other
        ax.plot(ks, values, markersize=7 - i % 3, label=row["method"], **style)
        if counts is not None:
            tried = [pd.to_numeric(row.get(f"{c}_n"), errors="coerce") for c in positions]
            counts.plot(ks, [n if n > 0 else math.nan for n in tried], markersize=4, **style)   # log: 0 not drawn
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance per position (given 1..k-1 accepted)", fontsize=9)
    if counts is not None:
        ax.tick_params(labelbottom=False)
        counts.set_yscale("log")
        counts.set_ylabel("attempts", fontsize=8)
        counts.set_xlabel("draft position k")
        counts.tick_params(labelsize=7)
    else:
        ax.set_xlabel("draft position k")
    if len(accept):
        ax.legend(fontsize=7, ncol=2 if len(accept) > 4 else 1)
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax.text(0.5, 0.5, "no drafting method in this group", ha="center", transform=ax.transAxes)
    if panels == 2:
        ax = fig.add_subplot(grid[:, 1])   # both rows (or the one)
        columns = topk_columns(accuracy.columns)
        ks = sorted({int(c.split("_")[1][3:]) for c in columns})
        styles = {k: s for k, s in zip(ks, ["-", "--", ":", "-."])}
        for _, row in accuracy.iterrows():
            for k in ks:
                positions = [int(c.split("_")[0][3:]) for c in columns if c.endswith(f"_top{k}")]
                ax.plot(positions, [row[f"pos{p}_top{k}"] for p in positions], marker="o", linestyle=styles.get(k, "-"),
                        color=colors[row["method"]], label=f"{row['method']} top-{k}")
        ax.set_xlabel("draft position k")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title("Draft top-k accuracy per position\n(teacher-forced)", fontsize=9)
        ax.legend(fontsize=7, ncol=2 if len(accuracy) > 3 else 1)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("\n".join(textwrap.wrap(title, 75 * panels)), fontsize=8)   # fits the figure width
    return _save(fig, path)


def tokens_per_s_vs_draft(metrics: pd.DataFrame, labels: list[str], title: str, path: Path,
                          baseline: str = "vanilla") -> Path | None:
    """Each run is a point: x = mean draft tokens verified per step, y = tokens/s (the cost of drafting)."""
    known = metrics[~metrics["draft_tokens_per_step"].isna()]
    if not len(known):
        return None
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for label in labels:
        rows = known[known["label"] == label]
        if len(rows):
            ax.scatter(rows["draft_tokens_per_step"], rows["tokens_per_s"], s=40, color=colors[label], label=label)
            for _, row in rows.iterrows():
                ax.annotate(f"τ={row['tau']:.2f}", (row["draft_tokens_per_step"], row["tokens_per_s"]),
                            fontsize=7, xytext=(4, 3), textcoords="offset points")
    unknown = sorted(set(metrics.loc[metrics["draft_tokens_per_step"].isna(), "label"]))
    note = f"\n(not plotted, draft size not observable: {', '.join(unknown)})" if unknown else ""
    ax.set_xlabel("mean draft tokens per verify step (τ: prefill = 1 step)")
    ax.set_ylabel("tokens/s (total tokens / total time)")
    ax.set_ylim(0, max(float(metrics["tokens_per_s"].max()), 1e-9) * 1.15)
    ax.set_xlim(-0.1, max(1.0, float(known["draft_tokens_per_step"].max()) * 1.15))
    base = metrics[metrics["label"] == baseline]["tokens_per_s"]
    if len(base):
        ax.axhline(float(base.mean()), color="black", linestyle="--", linewidth=0.8)
        ax.text(ax.get_xlim()[1], float(base.mean()), f"{baseline} ", va="bottom", ha="right", fontsize=7)
    _title(ax, f"Throughput against draft size{note}", title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def speedup_vs_tau(metrics: pd.DataFrame, labels: list[str], definition: str, title: str, path: Path,
                   baseline: str = "vanilla") -> Path | None:
    """Each run a point: x = τ (prefill = 1 step), y = its speedup with the 95 % interval. At equal τ, a lower
    point pays more for drafting or verifying; vanilla sits at (1, 1)."""
    rows = metrics[(metrics["label"] != baseline) & ~metrics[f"speedup_{definition}"].isna()]
    if not len(rows):
        return None
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    for i, label in enumerate(l for l in labels if l != baseline):
        mine = rows[rows["label"] == label]
        if not len(mine):
            continue
        for _, row in mine.iterrows():
            value = row[f"speedup_{definition}"]
            low, high = row.get(f"speedup_{definition}_ci_low", math.nan), row.get(f"speedup_{definition}_ci_high",
                                                                                    math.nan)
            error = None if math.isnan(low) or math.isnan(high) else [[max(value - low, 0.0)], [max(high - value, 0.0)]]
            ax.errorbar(row["tau"], value, yerr=error, fmt=MARKERS[i % len(MARKERS)], color=colors[label],
                        capsize=2, elinewidth=0.8, markersize=6)
        ax.scatter([], [], marker=MARKERS[i % len(MARKERS)], color=colors[label], label=label)
    ax.set_xlim(0.9, max(1.1, float(rows["tau"].max()) * 1.1 + 0.1))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.text(ax.get_xlim()[1], 1.0, f"{baseline} = 1 ", va="bottom", ha="right", fontsize=7)
    ax.set_xlabel("τ, mean accepted tokens per verify step (prefill = 1 step)")
    ax.set_ylabel(f"speedup over {baseline} (×)")
    ax.text(1.0, -0.2, "bars: 95 % interval over questions", transform=ax.transAxes, ha="right", fontsize=6.5,
            color="0.35")
    _title(ax, f"Speedup against τ — {DEFINITIONS[definition]}", title)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


STAGES = (("prefill_time", "prefill"), ("draft_time", "draft"), ("verify_time", "verify"),
          ("bookkeeping_time", "bookkeeping"))


def stage_breakdown(turns: pd.DataFrame, labels: list[str], title: str, path: Path) -> Path | None:
    """Where each method's time per generated token goes: prefill, drafting, verifying and bookkeeping, in
    milliseconds per token (every run of the label pooled); the bar's length is 1000 / tokens/s."""
    if not len(turns) or "draft_time" not in turns:
        return None
    columns = [column for column, _ in STAGES]
    timed = [l for l in labels if float(turns.loc[turns["label"] == l, columns].fillna(0).to_numpy().sum()) > 0]
    missing = [l for l in labels if l not in timed]        # peers that time only the whole turn (hf_generate)
    labels = timed
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 0.55 * len(labels) + 2.0))
    cmap = plt.get_cmap("Set2")
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    tokens = np.array([max(float(turns.loc[turns["label"] == l, "new_tokens"].sum()), 1.0) for l in labels])
    for k, (column, name) in enumerate(STAGES):
        ms = np.array([float(turns.loc[turns["label"] == l, column].fillna(0).sum()) for l in labels]) * 1e3 / tokens
        ax.barh(y, ms, left=left, color=cmap(k), label=name, height=0.6)
        left += ms
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:.1f} ms", va="center", fontsize=7)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per generated token")
    ax.set_xlim(0, max(float(left.max()), 1e-9) * 1.2)
    note = f" (stages not recorded: {', '.join(missing)})" if missing else ""
    _title(ax, f"Time per token by stage{note}", title)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    return _save(fig, path)


def tokens_per_s_by_turn(turns: pd.DataFrame, labels: list[str], title: str, path: Path) -> Path | None:
    """Turn 1 against turn 2 (MT-Bench's second turn carries the first answer: longer prompts, other
    acceptance): tokens/s per turn index, every run of the label pooled."""
    if not len(turns) or turns["turn"].nunique() < 2:
        return None
    indices = sorted(turns["turn"].unique())
    colors = _colors(labels)
    width = 0.8 / len(labels)
    x = np.arange(len(indices))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(indices) + 0.5 * len(labels)), 3.8))
    for i, label in enumerate(labels):
        mine = turns[turns["label"] == label]
        rates = [glossary.tokens_per_s(float(mine.loc[mine["turn"] == t, "new_tokens"].sum()),
                                       float(mine.loc[mine["turn"] == t, "wall_time"].sum())) for t in indices]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), rates, width, color=colors[label], label=label)
        ax.bar_label(bars, labels=[f"{r:.1f}" for r in rates], fontsize=6.5, padding=1)
    ax.set_xticks(x, [f"turn {t + 1}" for t in indices])
    ax.set_ylabel("tokens/s (total tokens / total time)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    _title(ax, "Throughput per turn", title)
    ax.legend(fontsize=7, ncol=min(len(labels), 4), loc="upper left")
    return _save(fig, path)
