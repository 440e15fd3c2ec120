"""Issue 6: the report's numbers on a synthetic results folder, checked against hand-computed values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness import REPO_ROOT
from harness.infra.errors import HarnessError
from reports.report import build_report

HARDWARE = {"cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2, "gpu": None, "device": "cpu"}


def turn(index: int, tokens: int, wall: float, accepted: list[int] | None = None, drafts: list[int] | None = None,
         attempted=(), took=(), ids: list[int] | None = None) -> dict:
    accepted = accepted or [1] * tokens
    assert sum(accepted) == tokens
    return {"turn": index, "new_tokens": tokens, "prompt_tokens": 10, "wall_time": wall,
            "tokens_per_s": tokens / wall, "prefill_time": 0.0, "draft_time": 0.0, "verify_time": wall,
            "bookkeeping_time": 0.0, "steps": len(accepted), "tau": tokens / len(accepted),
            "accepted_lengths": accepted, "draft_sizes": drafts if drafts is not None else [0] * len(accepted),
            "pos_attempted": list(attempted), "pos_accepted": list(took), "stop_reason": "max_new_tokens",
            "token_ids": ids if ids is not None else list(range(tokens)), "text": "x"}


def write_run(folder: Path, method: str, questions: dict, seed: int = 0, bench: str = "mt_bench",
              max_new_tokens: int = 32, temperature: float = 0.0, topk: dict | None = None,
              quantization: str = "none", weight_bytes: int | None = None, **method_params) -> Path:
    """questions: {question_id: (category, [turn, ...])}."""
    folder.mkdir(parents=True)
    config = {"model": {"name": "tiny", "dtype": "auto", "quantization": quantization},
              "method": {"name": method, "_target_": f"x.{method}", **method_params},
              "bench": {"name": bench, "max_turns": None}, "seed": seed, "max_new_tokens": max_new_tokens,
              "decoding": {"temperature": temperature, "top_p": 1.0}, "device": "auto"}
    info = {"config": config, "hardware": HARDWARE, "quantization": quantization, "method": method}
    if weight_bytes is not None:
        info["weight_memory_bytes"] = weight_bytes
    (folder / "run.json").write_text(json.dumps(info))
    with open(folder / "answers.jsonl", "w") as handle:
        for qid, (category, turns) in questions.items():
            handle.write(json.dumps({"question_id": qid, "category": category, "model": "tiny", "method": method,
                                     "turns": turns}) + "\n")
    summary = {"method": method}
    if topk:
        summary["topk_accuracy"] = topk
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def vanilla(folder: Path, seed: int = 0, **kwargs) -> Path:
    # q81 (writing): 20 tokens in 2 s = 10 tok/s; q82 (roleplay): 20 tokens in 2 s = 10 tok/s
    return write_run(folder, "vanilla", {81: ("writing", [turn(0, 10, 1.0), turn(1, 10, 1.0)]),
                                         82: ("roleplay", [turn(0, 10, 1.0), turn(1, 10, 1.0)])}, seed, **kwargs)


def pld(folder: Path, seed: int = 0, q82_wall: float = 0.25, diverge: bool = False, **kwargs) -> Path:
    # q81: 20 tokens in 1 s = 20 tok/s (2x); q82: 20 tokens in 2 * q82_wall s
    # steps: each turn 10 tokens in 4 steps = [1 (prefill), 3, 3, 3], draft 3 tokens per decode step
    accepted, drafts = [1, 3, 3, 3], [0, 3, 3, 3]
    ids = list(range(10))
    wrong = ids[:5] + [99] + ids[6:]
    return write_run(folder, "pld", {
        81: ("writing", [turn(0, 10, 0.5, accepted, drafts, [3, 3, 3], [3, 3, 3]),
                         turn(1, 10, 0.5, accepted, drafts, [3, 3, 3], [3, 3, 3])]),
        82: ("roleplay", [turn(0, 10, q82_wall, accepted, drafts, [3, 3, 3], [3, 3, 3], ids=wrong if diverge else None),
                          turn(1, 10, q82_wall, accepted, drafts, [3, 3, 3], [3, 3, 3])])}, seed, **kwargs)


def test_leaderboard_speedups_tau_and_lossless_by_hand(tmp_path):
    sweep = tmp_path / "sweep"
    vanilla(sweep / "0_vanilla")
    pld(sweep / "1_pld", diverge=True)
    report = build_report(sweep, tmp_path / "out")
    board = report.tables["leaderboard"]
    per_question = board[(board["definition"] == "per_question")].set_index("method")
    total = board[(board["definition"] == "total")].set_index("method")
    # per question: q81 20/10 = 2x, q82 40/10 = 4x -> mean 3x; total: (40 tok / 1.5 s) / (40 tok / 4 s) = 2.667x
    assert per_question.loc["pld", "writing"] == pytest.approx(2.0)
    assert per_question.loc["pld", "roleplay"] == pytest.approx(4.0)
    assert per_question.loc["pld", "Overall"] == pytest.approx(3.0)
    assert total.loc["pld", "Overall"] == pytest.approx((40 / 1.5) / (40 / 4))
    assert per_question.loc["vanilla", "Overall"] == pytest.approx(1.0)
    # 95 % paired bootstrap over the 2 questions: resampled means are 2x, 3x or 4x -> [2, 4], both definitions
    for board_of in (per_question, total):
        assert (board_of.loc["pld", "Overall_ci_low"], board_of.loc["pld", "Overall_ci_high"]) == pytest.approx((2, 4))
    assert (per_question.loc["vanilla", "Overall_ci_low"], per_question.loc["vanilla", "Overall_ci_high"]) == (1, 1)
    run_metrics = report.metrics.set_index("label")
    assert run_metrics.loc["pld", "speedup_per_question_ci_low"] == pytest.approx(2.0)
    assert run_metrics.loc["pld", "speedup_total_ci_high"] == pytest.approx(4.0)
    # τ = 40 tokens / 16 steps; vanilla 1.00
    assert per_question.loc["pld", "#Mean Accepted Tokens"] == pytest.approx(2.5)
    assert per_question.loc["vanilla", "#Mean Accepted Tokens"] == pytest.approx(1.0)
    # column order: Spec-Bench's (MT-Bench categories in their order, then τ, then Overall)
    assert list(per_question.columns[2:7]) == ["writing", "writing_std", "roleplay", "roleplay_std",
                                                "#Mean Accepted Tokens"]
    summary = report.tables["summary"].set_index("method")
    assert summary.loc["pld", "lossless_rate"] == pytest.approx(0.5)    # q82 diverged at token 5
    assert summary.loc["pld", "draft_tokens_per_step"] == pytest.approx(36 / 16)
    assert summary.loc["pld", "tokens_per_s"] == pytest.approx(40 / 1.5)
    accept = report.tables["acceptance"].set_index("method")
    assert list(accept.index) == ["pld"] and accept.loc["pld", "pos1"] == 1.0
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "mean of per-question speedups" in md and "3.00x [2.00, 4.00]" in md and "2.67x [2.00, 4.00]" in md
    assert "3.00x [2.00, 4.00]" in (tmp_path / "out" / "summary.md").read_text()
    assert md.index("mean of per-question") < md.index("total tokens / total time")   # chosen definition first
    for name in ("leaderboard", "summary", "acceptance"):
        for ext in ("md", "csv", "tex"):
            assert (tmp_path / "out" / f"{name}.{ext}").stat().st_size > 0
    assert r"\pm" not in (tmp_path / "out" / "leaderboard.tex").read_text()   # one run each: no ± shown
    turns = pd.read_csv(tmp_path / "out" / "turns.csv")
    assert len(turns) == 8 and set(turns["label"]) == {"vanilla", "pld"}
    assert set(report.figures) == {"speedup_per_category", "accepted_length_histogram",
                                   "acceptance_per_position", "tokens_per_s_vs_draft_size", "speedup_vs_tau",
                                   "stage_breakdown", "tokens_per_s_by_turn"}
    for path in map(Path, report.figures.values()):           # PNG for the page, PDF beside it for a paper
        assert path.stat().st_size > 10_000 and path.with_suffix(".pdf").stat().st_size > 1_000


def test_total_definition_can_lead_and_repeats_are_mean_and_std(tmp_path):
    runs = tmp_path / "runs"
    vanilla(runs / "v0", seed=0)
    vanilla(runs / "v1", seed=1)
    pld(runs / "p0", seed=0, q82_wall=0.25)   # per-question 3.0x
    pld(runs / "p1", seed=1, q82_wall=0.5)    # q82 20/1 s = 2x -> per-question 2.0x
    report = build_report([str(runs / "*")], tmp_path / "out", definition="total")
    board = report.tables["leaderboard"]
    row = board[(board["definition"] == "per_question") & (board["method"] == "pld")].iloc[0]
    assert row["Overall"] == pytest.approx(2.5) and row["Overall_std"] == pytest.approx(math.sqrt(0.5))
    assert row["runs"] == 2
    # repeats show their spread as ± std, and the interval of the pooled speedup: each question's tokens and
    # time pooled over both seeds (q81 40 tok / 2 s vs 40 / 4 s = 2x; q82 40 / 1.5 s vs 40 / 4 s = 2.67x), then
    # the paired bootstrap over the two questions, whose 2.5th / 97.5th percentiles are the extremes
    assert (row["Overall_ci_low"], row["Overall_ci_high"]) == pytest.approx((2.0, 40 / 1.5 / 10))
    assert not report.metrics["speedup_per_question_ci_low"].isna().any()     # each run still has its own
    assert board["definition"].iloc[0] == "total"
    assert "2.50x ± 0.71 [2.00, 2.67]" in (tmp_path / "out" / "leaderboard.md").read_text()
    assert report.leaderboard.count("total tokens / total time") == 1


def test_runs_that_do_not_match_are_refused_in_one_line(tmp_path):
    vanilla(tmp_path / "v", max_new_tokens=64)
    pld(tmp_path / "p", max_new_tokens=32)
    with pytest.raises(HarnessError, match=r"differs in max_new_tokens \(32 vs 64\)") as info:
        build_report([str(tmp_path / "v"), str(tmp_path / "p")], tmp_path / "out")
    assert "\n" not in str(info.value)
    with pytest.raises(HarnessError, match="no vanilla run"):
        build_report([str(tmp_path / "p")], tmp_path / "out")
    # a vanilla run that lacks some of the method's questions is not a baseline for them
    write_run(tmp_path / "v81", "vanilla", {81: ("writing", [turn(0, 10, 1.0)])}, max_new_tokens=32)
    with pytest.raises(HarnessError, match=r"lacks \(82\)"):
        build_report([str(tmp_path / "v81"), str(tmp_path / "p")], tmp_path / "out")
    # sampling runs: the lossless column does not claim token identity
    vanilla(tmp_path / "vs", temperature=0.7)
    pld(tmp_path / "ps", temperature=0.7, diverge=True)
    build_report([str(tmp_path / "vs"), str(tmp_path / "ps")], tmp_path / "out2")
    assert "n/a (sampling)" in (tmp_path / "out2" / "summary.md").read_text()


def test_spec_bench_task_groups_topk_and_trigram_ablation(tmp_path):
    questions = {81: ("writing", [turn(0, 10, 1.0)]), 200: ("translation", [turn(0, 10, 1.0)]),
                 300: ("summarization", [turn(0, 10, 1.0)])}
    write_run(tmp_path / "v", "vanilla", questions, bench="spec_bench")
    fast = {q: (c, [turn(0, 10, 0.5, [1, 3, 3, 3], [0, 4, 4, 4], [3, 3, 3, 1], [3, 3, 3, 0])])
            for q, (c, _) in questions.items()}
    slow = {q: (c, [turn(0, 10, 0.8, [1, 2, 2, 2, 3], [0, 4, 4, 4, 4], [4, 4, 4, 1], [4, 4, 1, 0])])
            for q, (c, _) in questions.items()}
    write_run(tmp_path / "o", "ours", fast, bench="spec_bench", topk={"pos1_top1": 0.8, "pos1_top5": 0.95,
                                                                      "pos2_top1": 0.6, "pos2_top5": 0.85})
    write_run(tmp_path / "n", "ours_no_trigram", slow, bench="spec_bench",
              topk={"pos1_top1": 0.7, "pos1_top5": 0.9, "pos2_top1": 0.5, "pos2_top5": 0.8})
    write_run(tmp_path / "m", "medusa", slow, bench="spec_bench")
    report = build_report([str(tmp_path / d) for d in "vonm"], tmp_path / "out")
    board = report.tables["leaderboard"]
    board = board[board["definition"] == "per_question"]
    assert [c for c in board.columns if not c.endswith("_std")][3:] == [
        "Multi-turn Conversation", "Translation", "Summarization", "#Mean Accepted Tokens", "Overall",
        "tau_convention", "Overall_ci_low", "Overall_ci_high", "runs", "host_vs_baseline",
        "lossless_rate", "lossless_exact", "lossless_near_tie", "lossless_mismatch", "lossless_compared"]
    assert list(board["method"]) == ["ours", "ours_no_trigram", "medusa", "vanilla"]   # ablation side by side
    assert board.set_index("method").loc["ours", "Translation"] == pytest.approx(2.0)
    assert board.set_index("method").loc["medusa", "Overall"] == pytest.approx(1.25)
    # the τ convention is said beside τ; Spec-Bench's leaderboard uses Spec-Bench's τ (decode steps only)
    assert set(board["tau_convention"]) == {"prefill = 1 step"}
    spec = report.tables["leaderboard"]
    spec = spec[spec["definition"] == "spec_bench"].set_index("method")
    assert set(spec["tau_convention"]) == {"Spec-Bench: decode steps only"}
    # medusa's turn: 10 tokens in 5 steps, one of them the prefill -> τ 2.0 here, 9 / 4 in Spec-Bench's count
    assert board.set_index("method").loc["medusa", "#Mean Accepted Tokens"] == pytest.approx(10 / 5)
    assert spec.loc["medusa", "#Mean Accepted Tokens"] == pytest.approx(9 / 4)
    assert "#Mean Accepted Tokens (prefill = 1 step)" in report.leaderboard
    written = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "#Mean Accepted Tokens (Spec-Bench: decode steps only)" in written
    summary = report.tables["summary"].set_index("method")
    assert summary.loc["medusa", "tau_spec_bench"] == pytest.approx(9 / 4)
    assert summary.loc["medusa", "speedup_spec_bench"] == pytest.approx(1.25)   # same tok/s on every question
    assert "τ (Spec-Bench: decode steps only)" in (tmp_path / "out" / "summary.md").read_text()
    topk = report.tables["topk_accuracy"].set_index("method")
    assert list(c for c in topk.columns if not c.endswith("_std"))[1:] == ["pos1_top1", "pos1_top5", "pos2_top1",
                                                                            "pos2_top5"]
    assert topk.loc["ours", "pos2_top5"] == pytest.approx(0.85) and "medusa" not in topk.index
    ablation = report.tables["ablation"].set_index("method")
    assert ablation.loc["Δ trigram", "speedup (per-question)"] == pytest.approx(2.0 - 1.25)
    assert ablation.loc["Δ trigram", "pos1_top1"] == pytest.approx(0.1)
    # acceptance at position 4: ours 0/1, no_trigram 0/1; position 3: 9/9 vs 3/12
    assert ablation.loc["ours_no_trigram", "pos3"] == pytest.approx(3 / 12)
    assert ablation.loc["ours", "pos3"] == pytest.approx(1.0)
    assert set(report.figures) >= {"acceptance_per_position", "speedup_per_category"}


def test_method_parameter_sweeps_get_their_own_rows_and_lossy_methods_are_marked(tmp_path):
    vanilla(tmp_path / "v")
    pld(tmp_path / "p3", max_draft=3)
    pld(tmp_path / "p5", max_draft=5)
    write_run(tmp_path / "t", "medusa_typical", {81: ("writing", [turn(0, 10, 1.0), turn(1, 10, 1.0)]),
                                                 82: ("roleplay", [turn(0, 10, 1.0), turn(1, 10, 1.0)])}, lossy=True)
    report = build_report([str(tmp_path / d) for d in ("v", "p3", "p5", "t")], tmp_path / "out", make_figures=False)
    assert set(report.metrics["label"]) == {"vanilla", "pld[max_draft=3]", "pld[max_draft=5]",
                                            "medusa_typical (lossy)"}
    assert "| medusa_typical (lossy) |" in (tmp_path / "out" / "summary.md").read_text().replace("  ", " ")
    assert "LOSSY by design; 2 exact + 0 near-tie / 2" in (tmp_path / "out" / "summary.md").read_text()


def test_report_run_logs_tables_and_figures_to_offline_wandb(tmp_path):
    from reports.report import run_report
    from tests.conftest import compose_config

    vanilla(tmp_path / "sweep" / "0_vanilla")
    pld(tmp_path / "sweep" / "1_pld")
    cfg = compose_config(f"runs={tmp_path / 'sweep'}", f"out_dir={tmp_path / 'out'}", "print=false",
                         config_name="report")
    report = run_report(cfg)
    [offline] = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    run_report(cfg)                # one report run per report folder: the second call resumes the same run id
    folders = list((tmp_path / "out" / "wandb").glob("offline-run-*"))      # offline-run-<time>-<run id>
    ids = {p.name.split("-", 3)[3] for p in folders}
    assert folders and len(ids) == 1 and next(iter(ids)).startswith("report-")    # a random id would make two
    images = list((offline / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == len(report.figures) == 7
    tables = {p.name.split("_")[0] for p in (offline / "files" / "media" / "table").rglob("*.table.json")}
    assert {"leaderboard", "summary", "acceptance", "runs"} <= tables
    assert b"report" in next(offline.glob("run-*.wandb")).read_bytes()     # job_type


def test_report_cli_refuses_with_one_line_and_writes_a_report(tmp_path):
    out = subprocess.run([sys.executable, "-m", "reports.report", f"runs={tmp_path}/nothing*"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "matches no folder" in lines[0]
    vanilla(tmp_path / "sweep" / "0_vanilla")
    pld(tmp_path / "sweep" / "1_pld")
    out = subprocess.run([sys.executable, "-m", "reports.report", f"runs={tmp_path / 'sweep'}", "logger=none"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| pld" in out.stdout and "speedup_per_category.png" in out.stdout
    assert (tmp_path / "sweep" / "report" / "report.md").is_file()


def test_summary_shows_quantization_and_measured_weight_memory(tmp_path):
    """fp32 and int8 runs of one sweep: two groups (never compared with each other), each summary row names
    its quantization and the weight memory its run measured; a run without the record shows a dash."""
    sweep = tmp_path / "sweep"
    vanilla(sweep / "0_vanilla", weight_bytes=538 * 2**20)
    pld(sweep / "1_pld", weight_bytes=538 * 2**20)
    vanilla(sweep / "2_vanilla", quantization="int8", weight_bytes=220 * 2**20)
    pld(sweep / "3_pld", quantization="int8")
    report = build_report(sweep, tmp_path / "out")
    summary = report.tables["summary"]
    rows = {(r.quantization, r.method): r for r in summary.itertuples()}
    assert set(rows) == {("none", "vanilla"), ("none", "pld"), ("int8", "vanilla"), ("int8", "pld")}
    assert rows["none", "vanilla"].weight_mb == pytest.approx(538.0)
    assert rows["int8", "vanilla"].weight_mb == pytest.approx(220.0)
    assert math.isnan(rows["int8", "pld"].weight_mb)
    text = (tmp_path / "out" / "summary.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")][3:4] == ["Quantization"] and "Weights MiB" in header
    assert "538.0" in text and "220.0" in text
    pld_rows = [line for line in text.splitlines() if line.startswith("| pld")]
    column = [c.strip() for c in header.strip("|").split("|")].index("Weights MiB")
    assert len(pld_rows) == 2 and pld_rows[1].strip("|").split("|")[column].strip() == "—"   # int8 pld: no record


def test_figures_stay_legible_with_many_methods(monkeypatch, tmp_path):
    """Seven methods, as in the demo sweep: the attempts behind each acceptance rate sit in their own log panel
    (not as labels on the points), and no speedup label overlaps another label, leaves the axes or sits under its
    error bar, also with few methods over many categories."""
    import matplotlib.text

    from reports import figures

    kept = []

    def keep(fig, path):       # _save without the files: the figure laid out as it would be saved
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        fig.canvas.draw()
        kept.append(fig)
        return path

    monkeypatch.setattr(figures, "_save", keep)
    methods = [f"m{i}" for i in range(7)]
    accept = pd.DataFrame([{"method": m, "pos1": 0.5 - 0.05 * i, "pos1_n": 200 + i, "pos2": 0.3, "pos2_n": 90,
                            "pos3": 0.2, "pos3_n": 20 + i} for i, m in enumerate(methods)])
    figures.acceptance_per_position(accept, pd.DataFrame(), methods, "settings", tmp_path / "a.png")
    rates, attempts = kept[-1].axes
    assert attempts.get_yscale() == "log" and len(attempts.lines) == len(methods)
    assert list(attempts.lines[3].get_ydata()) == [203, 90, 23]
    # runs that recorded no attempts: one panel of rates, no empty log panel
    figures.acceptance_per_position(accept.drop(columns=["pos1_n", "pos2_n", "pos3_n"]), pd.DataFrame(), methods,
                                    "settings", tmp_path / "b.png")
    assert len(kept[-1].axes) == 1

    for names, tasks in ((methods, ["writing"]), (methods[:5], [f"task{j}" for j in range(8)])):
        metrics = pd.DataFrame([{"label": m, "speedup_per_question": 1.0 + 0.02 * i,
                                 **{f"per_question:{t}": 1.0 + 0.02 * i for t in tasks},
                                 "speedup_per_question_ci_low": 0.8, "speedup_per_question_ci_high": 1.4 + 0.01 * i}
                                for i, m in enumerate(["vanilla", *names])])
        figures.speedup_per_category(metrics, ["vanilla", *names], tasks, "per_question", "settings",
                                     tmp_path / "s.png")
        fig = kept[-1]
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        labels = [t for t in ax.texts if isinstance(t, matplotlib.text.Annotation)]
        assert len(labels) == (len(tasks) + 1) * len(names)
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        inside = ax.get_window_extent(renderer)
        assert all(inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes)      # none cut by the axes' top
        overall = [t for t in labels if t.xy[0] > len(tasks) - 0.5]
        assert len(overall) == len(names) and all(t.xy[1] >= 1.4 for t in overall)   # at the interval's top


def test_runs_on_other_cpu_linears_are_not_each_others_baseline():
    """model.cpu_linear changes the timings (packed oneDNN linears vs plain ones): a sweep over it must pair each
    job with the vanilla job of its own runtime, and reports keep the two apart."""
    from reports.results import differences, settings_of

    def info(linear):
        return {"config": {"model": {"name": "m", "dtype": "auto", "cpu_linear": linear}, "bench": {"name": "b"},
                           "max_new_tokens": 8, "decoding": {}}, "hardware": HARDWARE}

    assert differences(settings_of(info("off")), settings_of(info("auto"))) == ["linear (off vs auto)"]
    assert not differences(settings_of(info("auto")), settings_of(info("auto")))


def with_probes(folder: Path, *step_ms: float) -> Path:
    info = json.loads((folder / "run.json").read_text())
    info["host_probes"] = [{"at": "t", "done": i, "step_ms": ms, "repeats": 20} for i, ms in enumerate(step_ms)]
    (folder / "run.json").write_text(json.dumps(info))
    return folder


def test_a_method_timed_on_a_slower_host_than_its_vanilla_is_reported_beside_its_speedup(tmp_path, caplog):
    sweep = tmp_path / "sweep"
    with_probes(vanilla(sweep / "0_vanilla"), 40.0, 42.0)            # median 41 ms
    with_probes(pld(sweep / "1_pld"), 45.0, 47.1)                    # median 46.05: +12.3 %; spread 4.7 %
    report = build_report(sweep, tmp_path / "out", make_figures=False)
    row = report.metrics.set_index("method").loc["pld"]
    assert row["host_step_ms"] == pytest.approx(46.05) and row["host_vs_baseline"] == pytest.approx(46.05 / 41)
    assert row["host_spread"] == pytest.approx(47.1 / 45.0)
    table = report.tables["summary"].set_index("method")
    assert table.loc["pld", "host_vs_baseline"] == pytest.approx(46.05 / 41)
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "+12.3 %" in text and "HOST: pld" in text and "HOST: vanilla" not in text
    assert "spread" not in text                                       # 4.7 % inside one run is under 5 %
    assert any("host speed" in r.getMessage() for r in caplog.records)
    # within 5 %: no note; a run without probes (older runs) shows a dash and no note
    calm = tmp_path / "calm"
    with_probes(vanilla(calm / "0_vanilla"), 41.0)
    with_probes(pld(calm / "1_pld"), 42.0)
    old = tmp_path / "old"
    vanilla(old / "0_vanilla")
    pld(old / "1_pld")
    for sweep_dir, shown in ((calm, "+2.4 %"), (old, "–")):
        build_report(sweep_dir, tmp_path / f"out_{sweep_dir.name}", make_figures=False)
        text = (tmp_path / f"out_{sweep_dir.name}" / "summary.md").read_text()
        assert "HOST:" not in text and shown in text
