"""reports.export: a run folder as Spec-Bench and FastChat answer files, read back the way those tools read
them (Spec-Bench's evaluation/speed.py fields; FastChat's own loader, fastchat.llm_judge.common)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from harness import REPO_ROOT
from harness.engine import metrics as glossary
from harness.infra.errors import HarnessError
from reports.export import export_run
from reports.results import load_runs
from tests.test_reports import pld, vanilla


def speed_py_view(path, task="mt_bench"):
    """What Spec-Bench's speed.py takes from an answer file: per question sum(new_tokens) / sum(wall_time) over
    the MT-Bench categories, and every entry of accept_lengths."""
    mt_bench = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
    speeds, accepted = [], []
    for line in open(path, encoding="utf-8"):
        item = json.loads(line)
        if task == "mt_bench" and item["category"] not in mt_bench:
            continue
        choice = item["choices"][0]
        speeds.append(sum(choice["new_tokens"]) / sum(choice["wall_time"]))
        accepted.extend(choice["accept_lengths"])
    return np.array(speeds), accepted


def test_spec_bench_answers_give_our_spec_bench_speedup_and_tau(tmp_path):
    base, method = vanilla(tmp_path / "v"), pld(tmp_path / "p")
    out_base = export_run(base, tmp_path / "answers" / "tiny-vanilla.jsonl", "spec_bench")
    out = export_run(method, tmp_path / "answers" / "tiny-pld.jsonl", "spec_bench")
    speeds, accepted = speed_py_view(out)
    speeds0, _ = speed_py_view(out_base)
    [run], [run0] = load_runs([method]), load_runs([base])
    ours = glossary.speedup(glossary.question_totals(run.records), glossary.question_totals(run0.records), "spec_bench")
    assert speeds.mean() / speeds0.mean() == pytest.approx(ours)
    summary = glossary.summarize(run.records)
    assert np.mean(accepted) == pytest.approx(summary["tau_spec_bench"]) == pytest.approx(3.0)   # [1, 3, 3, 3]
    line = json.loads(out.read_text().splitlines()[0])
    assert line["question_id"] == 81 and line["category"] == "writing" and line["model_id"] == "tiny-pld"
    choice = line["choices"][0]
    assert choice["turns"] == ["x", "x"] and choice["new_tokens"] == [10, 10] and choice["decoding_steps"] == [3, 3]


def test_fastchat_answers_load_with_fastchats_own_reader(tmp_path, monkeypatch):
    for name in ("openai", "anthropic"):       # imported by fastchat.llm_judge.common for the judges' API calls
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    from fastchat.llm_judge.common import load_model_answers

    run = pld(tmp_path / "p")
    export_run(run, tmp_path / "model_answer" / "tiny-pld.jsonl", "fastchat")
    answers = load_model_answers(str(tmp_path / "model_answer"))
    assert sorted(answers["tiny-pld"]) == [81, 82]
    record = answers["tiny-pld"][82]
    assert record["choices"][0]["turns"] == ["x", "x"] and record["model_id"] == "tiny-pld"   # what the judge reads
    assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}


def test_export_refuses_an_unfinished_run_and_the_cli_writes_the_file(tmp_path):
    run = pld(tmp_path / "p")
    (run / "summary.json").unlink()
    with pytest.raises(HarnessError, match="include_unfinished=true"):
        export_run(run, tmp_path / "a.jsonl", "spec_bench")
    done = subprocess.run([sys.executable, "-m", "reports.export", str(run), "--format", "spec_bench", "--out",
                           str(tmp_path / "a.jsonl"), "--include-unfinished"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2
