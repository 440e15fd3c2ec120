"""Training curves of specdec-train runs: loss and eval top-1 / top-5 per head position against the step, read
from each run's trainer state (the newest checkpoint's `trainer_state.json`, or the final folder's log).

    python -m reports.training_curves runs/train/a runs/train/b --out docs/figures/training_curves

writes `<out>.png` and `<out>.pdf` and prints each run's eval points as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from harness.infra.errors import HarnessError  # noqa: E402


def log_history(run: str | Path) -> list[dict]:
    """The run's log history: the newest checkpoint's trainer_state.json (Trainer writes it there)."""
    run = Path(run)
    states = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    if (run / "trainer_state.json").is_file():
        states.append(run / "trainer_state.json")
    if not states:
        raise HarnessError(f"{run} holds no trainer_state.json (no checkpoint-*); point at a specdec-train output_dir")
    return json.loads(states[-1].read_text())["log_history"]


def frames(run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training steps: step, loss, medusa{i}_top{k}...; eval points: step, eval_loss, eval_pos{k}_top{j}...)."""
    history = log_history(run)
    train = pd.DataFrame([e for e in history if "loss" in e and "eval_loss" not in e])
    evals = pd.DataFrame([e for e in history if "eval_loss" in e])
    return train, evals


def plot(runs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> list[Path]:
    labels = labels or [Path(r).name for r in runs]
    fig, (loss_ax, top1_ax, top5_ax) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for run, label in zip(runs, labels):
        train, evals = frames(run)
        if not train.empty:
            smooth = train["loss"].rolling(10, min_periods=1).mean()
            loss_ax.plot(train["step"], smooth, label=f"{label} train (10-step mean)", alpha=0.6)
        if not evals.empty:
            loss_ax.plot(evals["step"], evals["eval_loss"], marker="o", label=f"{label} eval")
            for ax, top in ((top1_ax, 1), (top5_ax, 5)):
                for column in sorted(c for c in evals if re.fullmatch(rf"eval_pos\d+_top{top}", c)):
                    position = int(re.findall(r"\d+", column)[0])
                    ax.plot(evals["step"], evals[column], marker="o", markersize=3,
                            label=f"{label} t+{position + 1}")
    for ax, title in ((loss_ax, "loss"), (top1_ax, "eval top-1 per position"), (top5_ax, "eval top-5 per position")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".pdf"):
        path = out.with_suffix(suffix)
        fig.savefig(path, dpi=200)
        written.append(path)
    plt.close(fig)
    return written


def eval_table(runs: list[str | Path], labels: list[str] | None = None) -> str:
    labels = labels or [Path(r).name for r in runs]
    rows = []
    for run, label in zip(runs, labels):
        _, evals = frames(run)
        for _, entry in evals.iterrows():
            row = {"head": label, "step": int(entry["step"]), "eval_loss": round(float(entry["eval_loss"]), 4)}
            row.update({c.replace("eval_", ""): round(float(entry[c]), 3) for c in evals
                        if re.fullmatch(r"eval_pos\d+_top\d", c) and pd.notna(entry[c])})
            rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False) if rows else "(no eval points)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--labels", help="comma-separated, one per run")
    parser.add_argument("--out", default="training_curves")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    try:
        for path in plot(args.runs, args.out, labels):
            print(path)
        print(eval_table(args.runs, labels))
    except HarnessError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
