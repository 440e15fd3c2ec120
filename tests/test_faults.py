"""Fault injection (issue 17), as a new user would try it: kill -9 at seeded random moments of bench, distill and
train (at least five kills each, then a resume), SIGTERM / SIGINT (once: finish the record, print the resume
command; twice: stop at once), a full disk and a read-only folder, online W&B without a network, resumes on other
hardware or question files, references and baselines that do not match, and a table of bad inputs. Every case
asserts that nothing finished is lost or duplicated and that a refusal is one line, before the model loads."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import compose_config, tiny_bench_overrides
from harness import REPO_ROOT
from harness.bench import run_bench
from harness.data.sharegpt import JsonlLog
from harness.infra.errors import HarnessError
from harness.infra.store import RunStore, read_json
from helpers import distill_overrides, sharegpt_input, toy_sharegpt, train_overrides
from reports.results import load_runs, settings_of
from tests.test_reports import pld, vanilla

APPS = {"bench": "harness.bench", "distill": "harness.distill", "train": "harness.train"}


def command(app: str, overrides: list[str], hydra_dir: Path) -> list[str]:
    return [sys.executable, "-m", APPS[app], *overrides, f"hydra.run.dir={hydra_dir}"]


def launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def wait_for(process: subprocess.Popen, progress, target: int, timeout: float = 240) -> bool:
    """Poll until progress() >= target; False when the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        if progress() >= target:
            return True
        time.sleep(0.01)
    raise AssertionError(f"no progress to {target} in {timeout} s")


def wait_for_output(process: subprocess.Popen, text: str, timeout: float = 120) -> str:
    """Read the job's stdout and stderr (the log and the bars) until `text` appears; returns what was read."""
    import select

    seen, deadline = "", time.time() + timeout
    streams = [process.stdout, process.stderr]
    while text not in seen:
        assert time.time() < deadline, f"no {text!r} in {timeout} s; read: {seen[-2000:]}"
        ready, _, _ = select.select(streams, [], [], 0.5)
        for stream in ready:
            chunk = os.read(stream.fileno(), 65536).decode(errors="replace")
            if not chunk:
                streams.remove(stream)
            seen += chunk
        assert streams, f"the job closed its output before {text!r}: {seen[-2000:]}"
    return seen


def kill_loop(args: list[str], progress, seed: int, kills: int = 5) -> list[int]:
    """Start the job, kill -9 it at a seeded random moment, start it again (the same command resumes), `kills`
    times: the first kill lands while it starts (model loading, lock, folder checks), the others a few records
    on, plus a random fraction of a second (inside a record or a checkpoint write). Returns the progress seen at
    each kill."""
    rng = random.Random(seed)
    seen = []
    for attempt in range(kills):
        process = launch(args)
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 2.5))
            alive = process.poll() is None
        else:
            alive = wait_for(process, progress, progress() + rng.randint(1, 2))
            time.sleep(rng.uniform(0.0, 0.15))
            alive = alive and process.poll() is None
        assert alive, (f"the job ended before kill {attempt + 1}; make it longer\n"
                       + (process.stderr.read()[-2000:] if process.stderr else ""))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
        process.stderr.close()
        seen.append(progress())
    return seen


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


# ---------------------------------------------------------------------------------------------- kill -9, 5 times


def test_bench_killed_five_times_resumes_to_the_uninterrupted_run(tiny_model_dir, questions_path, tmp_path):
    base = ["bench.limit=10", "max_new_tokens=24"]
    straight = tmp_path / "straight"
    finish(command("bench", tiny_bench_overrides(tiny_model_dir, straight, questions_path, *base), tmp_path / "h0"))
    run_dir = tmp_path / "killed"
    args = command("bench", tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, *base, "resume=true"),
                   tmp_path / "h1")
    seen = kill_loop(args, lambda: lines(run_dir / "answers.jsonl"), seed=17)
    assert seen[-1] < 10, seen
    finish(args)
    ids = [r["question_id"] for r in RunStore(run_dir).records()]
    assert sorted(ids) == list(range(81, 91)) and len(ids) == len(set(ids))     # nothing lost, nothing twice
    expected = {r["question_id"]: [t["token_ids"] for t in r["turns"]] for r in RunStore(straight).records()}
    assert {r["question_id"]: [t["token_ids"] for t in r["turns"]] for r in RunStore(run_dir).records()} == expected
    summary = read_json(run_dir / "summary.json")
    # every start after the first that reached the folder resumed it (the first kill lands before that)
    assert summary["questions"] == 10 and len(read_json(run_dir / "run.json")["resumes"]) >= 4


def test_distill_killed_five_times_resumes_to_the_uninterrupted_run(chat_model, questions_path, tmp_path):
    data = sharegpt_input(tmp_path / "in.json", count=14)
    base = [f"data_path={data}", "max_length=72", "max_new_tokens=24", "batch_size=1"]
    finish(command("distill", distill_overrides(chat_model, questions_path, tmp_path / "a", *base), tmp_path / "h0"))
    killed = tmp_path / "b"
    args = command("distill", distill_overrides(chat_model, questions_path, killed, *base), tmp_path / "h1")
    shard = killed / "out" / "shard-00000-of-00001.jsonl"
    seen = kill_loop(args, lambda: lines(shard), seed=23)
    assert seen[-1] < 14, seen
    finish(args)
    records = JsonlLog(shard).records()
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(f"c{i}" for i in range(14)) and len(ids) == len(set(ids))
    expected = {r["id"]: r["conversations"] for r in JsonlLog(tmp_path / "a" / "out" / shard.name).records()}
    assert {r["id"]: r["conversations"] for r in records} == expected


def checkpoint_steps(folder: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def test_train_killed_five_times_resumes_to_the_uninterrupted_run(chat_model, tmp_path):
    from safetensors.torch import load_file

    train, held = toy_sharegpt(tmp_path)
    # long enough that five kills land before the end on a fast machine too (a CI host wrote ~12 steps between a
    # checkpoint seen and the kill 0.15 s later, and the fifth kill of a 40-step run landed on the final save)
    base = ["training.max_steps=120", "training.save_steps=2", "training.eval_steps=30", "training.save_total_limit=2"]
    finish(command("train", train_overrides(chat_model, train, held, tmp_path / "straight", *base), tmp_path / "h0"))
    out = tmp_path / "killed"
    args = command("train", train_overrides(chat_model, train, held, out, *base), tmp_path / "h1")
    seen = kill_loop(args, lambda: checkpoint_steps(out) // 2, seed=29)
    assert seen[-1] < 60, seen
    finish(args)
    assert not (out / ".staging").exists() and not list(out.glob("incomplete-*"))   # saves are renamed whole
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 120 and summary["resumed_from"]


# ------------------------------------------------------------------------------------------- SIGTERM and SIGINT


def resume_hint(stderr: str) -> list[str]:
    found = re.search(r"(?:resume with|continue with): (specdec-\S+ .*resume=true)", stderr)
    assert found, stderr[-2000:]
    words = shlex.split(found.group(1))
    return words


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_question_in_flight_and_prints_the_resume_command(signum, tiny_model_dir,
                                                                                 questions_path, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "bench.limit=6", "max_new_tokens=32")
    process = launch(command("bench", overrides, tmp_path / "h"))
    assert wait_for(process, lambda: lines(run_dir / "answers.jsonl"), 1)
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "Traceback" not in stderr
    data = (run_dir / "answers.jsonl").read_bytes()
    assert data.endswith(b"\n")                          # the question in flight was finished, not torn
    assert not (run_dir / "summary.json").exists()       # an unfinished run has no summary
    words = resume_hint(stderr)
    assert words[0] == "specdec-bench" and f"run_dir={run_dir}" in words and "resume=true" in words
    # the printed command, run as printed (the module for the console script), finishes the run
    finish([sys.executable, "-m", "harness.bench", *words[1:], f"hydra.run.dir={tmp_path / 'h2'}"])
    ids = [r["question_id"] for r in RunStore(run_dir).records()]
    assert sorted(ids) == list(range(81, 87)) and len(ids) == len(set(ids))
    assert read_json(run_dir / "summary.json")["questions"] == 6


def test_a_second_signal_stops_at_once_and_keeps_every_finished_question(tiny_model_dir, questions_path, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "bench.limit=12", "max_new_tokens=600")
    process = launch(command("bench", overrides, tmp_path / "h"))
    assert wait_for(process, lambda: lines(run_dir / "answers.jsonl"), 1)
    os.killpg(process.pid, signal.SIGINT)
    # the second Ctrl-C once the job has logged the first, while the next question (2 x 600 tokens) runs
    seen = wait_for_output(process, "stopping after the question in flight")
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    stderr = seen + stdout + stderr
    assert process.returncode == 130 and "stopped at once by SIGINT" in stderr and "Traceback" not in stderr
    records = RunStore(run_dir).records()
    assert len(records) >= 1 and len({r["question_id"] for r in records}) == len(records)
    assert "resume=true" in stderr


def test_sigterm_stops_training_at_a_checkpoint_it_resumes_from(chat_model, tmp_path):
    train, held = toy_sharegpt(tmp_path)
    out = tmp_path / "out"
    base = ["training.max_steps=400", "training.save_steps=5", "training.eval_steps=1000"]
    process = launch(command("train", train_overrides(chat_model, train, held, out, *base), tmp_path / "h"))
    assert wait_for(process, lambda: checkpoint_steps(out), 5)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "stopped by SIGTERM at step" in stderr, stderr[-2000:]
    step = checkpoint_steps(out)
    assert 0 < step < 400 and not (out / "model.safetensors").exists()     # a checkpoint, no final head
    assert f"checkpoint-{step} saved" in stderr and f"output_dir={out}" in stderr


@pytest.mark.parametrize("backend, signum", [("hf", signal.SIGTERM), ("vllm", signal.SIGINT)])
def test_a_signal_stops_distillation_after_whole_conversations(chat_model, questions_path, tmp_path, monkeypatch,
                                                               backend, signum):
    """SIGTERM / Ctrl-C reach the whole process group; on vLLM the worker (a session of its own) keeps
    generating while the harness lets the conversations in flight finish and writes them whole."""
    extra = ["max_new_tokens=48", "batch_size=1"]
    if backend == "vllm":
        stub = Path(__file__).with_name("stub_vllm")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(stub), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        extra = ["max_new_tokens=24", "backend=vllm", f"vllm.python={sys.executable}", "in_flight=4",
                 "stop_grace_s=600"]
    data = sharegpt_input(tmp_path / "in.json", count=40)
    overrides = distill_overrides(chat_model, questions_path, tmp_path, f"data_path={data}", "max_length=72", *extra)
    shard = tmp_path / "out" / "shard-00000-of-00001.jsonl"
    process = launch(command("distill", overrides, tmp_path / "h"))
    assert wait_for(process, lambda: lines(shard), 2)
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=180)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum and f"stopped by {name}" in stderr, stderr[-2000:]
    assert "worker exited" not in stderr and "left unwritten" not in stderr
    assert shard.read_bytes().endswith(b"\n") and 2 <= lines(shard) < 40
    records = JsonlLog(shard).records()
    assert len({r["id"] for r in records}) == len(records) and all(r["new_tokens"] for r in records)
    assert f"out_dir={tmp_path / 'out'}" in resume_hint(stderr)


# ------------------------------------------------------------------------------ disks, folders and W&B offline


def test_a_full_disk_is_one_line_before_the_model_loads(tiny_model_dir, questions_path, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 9 * 2**20, 2**20))
    cfg = compose_config(*tiny_bench_overrides(tmp_path / "no-model", tmp_path / "run", questions_path))
    with pytest.raises(HarnessError, match=r"1.0 MiB free on its disk, under the 64 MiB a run needs") as caught:
        run_bench(cfg, tmp_path / "run")
    assert "\n" not in str(caught.value)


def test_a_disk_that_fills_mid_run_keeps_the_finished_questions(tiny_model_dir, questions_path, tmp_path,
                                                                 monkeypatch):
    import harness.infra.store as store

    run_dir = tmp_path / "run"
    real_append, calls = store.RunStore.append, []

    def disk_full_at_the_second_record(self, record):
        calls.append(record["question_id"])
        if len(calls) == 2:        # the next write goes to /dev/full: ENOSPC, as on a full disk
            full = self.dir / "full.jsonl"
            full.symlink_to("/dev/full")
            self.answers = full
        return real_append(self, record)

    monkeypatch.setattr(store.RunStore, "append", disk_full_at_the_second_record)
    base = tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "bench.limit=3", "max_new_tokens=8")
    with pytest.raises(HarnessError, match=r"cannot write question 82 to .*No space left on device.*"
                                           r"questions before it are kept.*resume=true") as caught:
        run_bench(compose_config(*base), run_dir)
    assert "\n" not in str(caught.value)
    assert [r["question_id"] for r in RunStore(run_dir).records()] == [81]
    monkeypatch.setattr(store.RunStore, "append", real_append)
    (run_dir / "full.jsonl").unlink()
    run_bench(compose_config(*base, "resume=true"), run_dir)          # space is back: the run completes
    assert [r["question_id"] for r in RunStore(run_dir).records()] == [81, 82, 83]


def test_a_folder_that_cannot_be_written_is_one_line_before_the_model_loads(questions_path, tmp_path):
    run_dir = Path("/proc/specdec-cannot-write/run")      # /proc takes no new folders, even from root
    cfg = compose_config(*tiny_bench_overrides(tmp_path / "no-model", run_dir, questions_path))
    with pytest.raises(HarnessError, match=r"cannot create the lock file .*choose a writable run_dir"):
        run_bench(cfg, run_dir)


def test_online_wandb_without_a_network_says_so_and_logs_offline(tmp_path, monkeypatch, caplog):
    import socket

    import wandb
    from omegaconf import OmegaConf

    from harness.infra.tracking import Tracker

    def unreachable(address, timeout=None):
        raise OSError("network is unreachable")

    seen = {}
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs) or object())
    cfg = OmegaConf.create({"logger": {"wandb": {"mode": "online", "project": "p"}}})
    started = time.perf_counter()
    with caplog.at_level("WARNING"):
        tracker = Tracker.start(cfg, tmp_path, "bench", [])
    assert time.perf_counter() - started < 5 and seen["mode"] == "offline" and tracker.run is not None
    assert "cannot be reached: logging offline" in caplog.text and "wandb sync" in caplog.text


# --------------------------------------------------------------------------------- resumes that must not mix


def test_a_resume_on_other_threads_or_questions_is_refused_unless_forced(tiny_model_dir, questions_path, tmp_path):
    run_dir = tmp_path / "run"
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(questions_path.read_bytes())
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1
    try:
        base = tiny_bench_overrides(tiny_model_dir, run_dir, questions, "max_new_tokens=8")
        run_bench(compose_config(*base, "bench.limit=1", f"threads={threads}"), run_dir)
        before = (run_dir / "run.json").read_bytes(), (run_dir / "answers.jsonl").read_bytes()
        with pytest.raises(HarnessError, match=rf"hardware.torch_threads \({threads} vs {other}\).*force_resume=true"):
            run_bench(compose_config(*base, "bench.limit=2", "resume=true", f"threads={other}"), run_dir)
        assert ((run_dir / "run.json").read_bytes(), (run_dir / "answers.jsonl").read_bytes()) == before
        assert (run_dir / "summary.json").exists()          # a refused resume changes nothing
        with open(questions, "a") as handle:               # the question file changes under the run
            handle.write(json.dumps({"question_id": 999, "category": "x", "turns": ["hello"]}) + "\n")
        torch.set_num_threads(threads)
        with pytest.raises(HarnessError, match=r"questions.sha256"):
            run_bench(compose_config(*base, "bench.limit=2", "resume=true", f"threads={threads}"), run_dir)
        summary = run_bench(compose_config(*base, "bench.limit=2", "resume=true", f"threads={other}",
                                           "force_resume=true"), run_dir)
        assert summary["questions"] == 2
        info = read_json(run_dir / "run.json")
        differences = " ".join(info["mixed_provenance"][0]["differences"])
        assert "hardware.torch_threads" in differences and "questions.sha256" in differences
        assert settings_of(info)["hardware"].startswith("mixed: ")     # the reports keep it apart
    finally:
        torch.set_num_threads(threads)


def test_an_extended_run_that_stops_has_no_old_summary_and_reports_leave_it_out(tiny_model_dir, questions_path,
                                                                               tmp_path, monkeypatch):
    import harness.bench as bench

    run_dir = tmp_path / "run"
    base = tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "max_new_tokens=8")
    run_bench(compose_config(*base, "bench.limit=2"), run_dir)
    real = bench.answer_question

    def killed_on_question_84(runner, question, seed):
        if question.question_id == 84:
            raise KeyboardInterrupt
        return real(runner, question, seed)

    monkeypatch.setattr(bench, "answer_question", killed_on_question_84)
    with pytest.raises(HarnessError, match="stopped at once"):
        run_bench(compose_config(*base, "bench.limit=4", "resume=true"), run_dir)
    assert len(RunStore(run_dir).records()) == 3 and not (run_dir / "summary.json").exists()
    with pytest.raises(HarnessError, match="include_unfinished=true"):
        load_runs([run_dir])
    assert len(load_runs([run_dir], include_unfinished=True)[0].records) == 3


# ---------------------------------------------------------------- references and baselines: like with like only


@pytest.fixture(scope="module")
def tiny_reference(tiny_model_dir, questions_path, tmp_path_factory):
    """A vanilla run of questions 81-82 at max_new_tokens=8."""
    folder = tmp_path_factory.mktemp("reference") / "vanilla"
    run_bench(compose_config(*tiny_bench_overrides(tiny_model_dir, folder, questions_path, "bench.limit=2",
                                                   "max_new_tokens=8")), folder)
    return folder


@pytest.mark.parametrize("overrides, words", [
    (["max_new_tokens=9"], r"max_new_tokens \(8 vs 9\)"),
    (["model.dtype=bf16"], r"model.dtype \(float32 vs bfloat16\)"),
    (["model.quantization=int8"], r"model.quantization \(none vs int8\)"),
    (["bench.max_turns=1"], r"bench.max_turns \(None vs 1\)"),
    (["bench.question_ids=[90,91]"], r"answered none of this run's 2 questions"),
])
def test_a_reference_that_is_not_like_for_like_is_refused(overrides, words, tiny_reference, tiny_model_dir,
                                                           questions_path, tmp_path):
    cfg = compose_config(*tiny_bench_overrides(tiny_model_dir, tmp_path / "run", questions_path,
                                               "max_new_tokens=8", f"reference={tiny_reference}", *overrides))
    with pytest.raises(HarnessError, match=words) as caught:
        run_bench(cfg, tmp_path / "run")
    assert "\n" not in str(caught.value) and not (tmp_path / "run").exists()   # before the folder or the model


def test_partial_reference_coverage_is_reported(tiny_reference, tiny_model_dir, questions_path, tmp_path):
    from harness.bench import format_summary

    summary = run_bench(compose_config(*tiny_bench_overrides(tiny_model_dir, tmp_path / "run", questions_path,
                                                             "bench.limit=3", "max_new_tokens=8",
                                                             f"reference={tiny_reference}")), tmp_path / "run")
    assert summary["lossless_compared"] == 2 and summary["questions"] == 3
    assert "(compared 2 of 3; the others are not in the reference;" in format_summary(summary)


@pytest.mark.parametrize("make, words", [
    (lambda folder: pld(folder), "is a pld run; speedups divide by vanilla"),
    (lambda folder: vanilla(folder), "answered none of this run's 1 questions"),
])
def test_a_baseline_that_cannot_pair_is_refused_before_the_model_loads(make, words, questions_path, tmp_path):
    baseline = make(tmp_path / "base")           # questions 81 and 82
    cfg = compose_config(*tiny_bench_overrides(tmp_path / "no-model", tmp_path / "run", questions_path,
                                               "bench.question_ids=[90]", f"baseline_run={baseline}"))
    with pytest.raises(HarnessError, match=words):
        run_bench(cfg, tmp_path / "run")


def test_an_unfinished_baseline_is_refused(questions_path, tmp_path):
    baseline = vanilla(tmp_path / "base")
    (baseline / "summary.json").unlink()
    cfg = compose_config(*tiny_bench_overrides(tmp_path / "no-model", tmp_path / "run", questions_path,
                                               "bench.limit=2", f"baseline_run={baseline}"))
    with pytest.raises(HarnessError, match="is unfinished"):
        run_bench(cfg, tmp_path / "run")


def test_a_run_dir_call_keeps_its_log_inside_the_run_folder(tiny_model_dir, questions_path, tmp_path):
    """No stray runs/<time> folder per call; Hydra's files and a non-empty bench.log (one line per question
    with rate and ETA, for job logs) under <run_dir>/logs/<time>/."""
    work = tmp_path / "cwd"
    work.mkdir()
    run_dir = tmp_path / "run"
    overrides = tiny_bench_overrides(tiny_model_dir, run_dir, questions_path, "bench.limit=2", "max_new_tokens=4")
    done = subprocess.run([sys.executable, "-m", "harness.bench", *overrides], cwd=work, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(work.iterdir()) == []                      # nothing written where the command ran
    [log_dir] = (run_dir / "logs").iterdir()
    text = (log_dir / "bench.log").read_text()
    assert (log_dir / ".hydra" / "overrides.yaml").is_file()
    assert "question 81 done (1/2)" in text and "question 82 done (2/2)" in text and "ETA" in text
