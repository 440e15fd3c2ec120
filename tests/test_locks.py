"""One writer per run folder (harness.infra.locks): a second holder is refused with one line naming the holder's pid
and host, in this process or another; a killed holder's lock is taken over; a lock from another host is not;
bench, distill and train refuse a second writer before they load a model."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import compose_config
from harness import REPO_ROOT
from harness.infra import locks
from harness.infra.errors import HarnessError
from harness.infra.locks import hold
from helpers import tiny_bench, tiny_bench_config

HOST = socket.gethostname()
CHILD_HOLDS = textwrap.dedent("""
    import sys
    from harness.infra.locks import hold
    with hold(sys.argv[1], "run_dir"):
        print("held", flush=True)
        sys.stdin.read()      # until the test closes stdin (clean release) or kills this process
""")
CHILD_TRIES = textwrap.dedent("""
    import sys
    from harness.infra.errors import HarnessError
    from harness.infra.locks import hold
    try:
        with hold(sys.argv[1], "run_dir"):
            print("acquired")
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
""")


def python(script: str, *args: str, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return [sys.executable, "-c", script, *args], dict(cwd=REPO_ROOT, env=env, text=True, **kwargs)


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def lock_text(folder, name=".lock") -> str:
    return (folder / name).read_text()


def test_a_second_holder_in_this_process_is_refused_and_the_lock_is_released(tmp_path):
    run_dir = tmp_path / "run"
    with hold(run_dir, "run_dir") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(HarnessError) as refused:     # a second open file description: flock conflicts
            with hold(run_dir, "run_dir"):
                pytest.fail("two holders of one folder")
        message = str(refused.value)
        assert "\n" not in message
        assert f"{run_dir} is being written by pid {os.getpid()} on host {HOST} since " in message
        assert message.endswith("wait for it, or choose another run_dir")
        assert json.loads(path.read_text())["pid"] == os.getpid()     # the refusal left the holder's record alone
    assert lock_text(run_dir) == ""          # released cleanly: emptied
    for interrupt in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(interrupt)):
            with hold(run_dir, "run_dir"):
                raise interrupt
        assert lock_text(run_dir) == ""
    with hold(run_dir, "run_dir"):           # free again
        pass


def test_a_second_writer_in_another_process_is_refused_with_one_line_naming_the_pid(tmp_path):
    run_dir = tmp_path / "run"
    with hold(run_dir, "run_dir"):
        command, options = python(CHILD_TRIES, str(run_dir), capture_output=True, timeout=120)
        child = subprocess.run(command, **options)
    assert child.returncode == 2 and "acquired" not in child.stdout
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1, child.stderr
    assert lines[0].startswith(f"error: {run_dir} is being written by pid {os.getpid()} on host {HOST} since ")
    assert "choose another run_dir" in lines[0]
    child = subprocess.run(command, **options)      # released: the next writer gets it
    assert child.returncode == 0 and child.stdout.strip() == "acquired"


def test_a_lock_left_by_a_killed_process_is_taken_over_with_one_log_line(tmp_path, caplog):
    run_dir = tmp_path / "run"
    command, options = python(CHILD_HOLDS, str(run_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    holder = subprocess.Popen(command, **options)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HarnessError, match=f"is being written by pid {holder.pid} on host {HOST}"):
            with hold(run_dir, "run_dir"):
                pass
    finally:
        holder.kill()        # SIGKILL: no cleanup, the lock file keeps its pid; the OS drops the flock
        holder.wait()
    assert json.loads(lock_text(run_dir))["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="harness.infra.locks"):
        with hold(run_dir, "run_dir") as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    taken = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(taken) == 1 and f"pid {holder.pid}" in taken[0] and str(run_dir) in taken[0]

    caplog.clear()           # a cleanly released lock is taken without a word
    with caplog.at_level(logging.WARNING, logger="harness.infra.locks"):
        with hold(run_dir, "run_dir"):
            pass
    assert not caplog.records


def test_a_lock_from_another_host_is_never_assumed_stale(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "since": "yesterday"}))
    with pytest.raises(HarnessError) as refused:
        with hold(run_dir, "run_dir"):
            pass
    message = str(refused.value)
    assert "on host elsewhere since yesterday" in message and "never assumed stale" in message
    assert f"delete {run_dir / '.lock'}" in message
    assert json.loads(lock_text(run_dir))["host"] == "elsewhere"      # left as it was


def test_without_flock_the_pid_decides(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(locks, "fcntl", None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    parent = os.getppid()    # alive, on this host
    (run_dir / ".lock").write_text(json.dumps({"pid": parent, "host": HOST, "since": "now"}))
    with pytest.raises(HarnessError, match=f"pid {parent} on host {HOST}"):
        with hold(run_dir, "run_dir"):
            pass
    gone = dead_pid()
    (run_dir / ".lock").write_text(json.dumps({"pid": gone, "host": HOST, "since": "then"}))
    with caplog.at_level(logging.WARNING, logger="harness.infra.locks"):
        with hold(run_dir, "run_dir"):
            pass
    assert f"taking over the lock of pid {gone}" in caplog.text
    assert lock_text(run_dir) == ""


# ------------------------------------------------------------------------------------------------ entry points

def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded although the folder is locked")


@pytest.mark.parametrize("resume", [False, True])
def test_bench_refuses_a_second_writer_into_its_run_dir_before_loading_the_model(resume, tmp_path, questions_path,
                                                                                 monkeypatch):
    from harness import bench

    monkeypatch.setattr(bench, "load_model", no_model)
    run_dir = tmp_path / "run"
    cfg = tiny_bench_config(tmp_path / "no-model", run_dir, questions_path, "bench.limit=3",
                            f"resume={str(resume).lower()}")
    with hold(run_dir, "run_dir"):
        with pytest.raises(HarnessError, match=f"is being written by pid {os.getpid()} .*choose another run_dir"):
            bench.run_bench(cfg, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]      # nothing written
    # a failing run releases the folder (here: the model loader raises)
    with pytest.raises(AssertionError, match="a model was loaded"):
        bench.run_bench(cfg, run_dir)
    assert lock_text(run_dir) == ""


def test_distill_locks_its_shard_not_the_whole_out_dir(tmp_path, questions_path, monkeypatch):
    from harness import distill

    monkeypatch.setattr(distill, "load_model", no_model)
    monkeypatch.setattr(distill, "load_conversations", no_model)
    out_dir = tmp_path / "out"

    def cfg(shard):
        return compose_config(f"out_dir={out_dir}", f"bench.path={questions_path}", "logger=none", "progress=false",
                              f"shard={shard}", "num_shards=2", config_name="distill")

    stem = distill.shard_stem(0, 2)
    with hold(out_dir, "shard or out_dir", key=stem):
        with pytest.raises(HarnessError, match=f"{stem} is being written by pid {os.getpid()}"):
            distill.run_distill(cfg(0))
        # another shard of the same folder runs alongside
        monkeypatch.setattr(distill, "_distill_shard", lambda cfg, out_dir, stem, *rest: {"ran": stem})
        assert distill.run_distill(cfg(1)) == {"ran": distill.shard_stem(1, 2)}
    assert not list(out_dir.glob("shard-*"))     # the refused job wrote nothing


@pytest.mark.parametrize("eval_only", [False, True])
def test_train_refuses_a_second_writer_into_its_output_dir_before_loading_the_model(eval_only, tmp_path,
                                                                                    monkeypatch):
    from harness import train

    monkeypatch.setattr(train, "load_model", no_model)
    folder = tmp_path / "head"
    # eval_only writes into <output_dir>/eval/<head folder name>/: that folder is the one held
    overrides = [f"head_path={tmp_path / 'trained' / 'head'}", "eval_only=true", f"output_dir={tmp_path}",
                 f"eval_data_path={tmp_path / 'eval.json'}"] if eval_only \
        else [f"output_dir={folder}", f"data_path={tmp_path / 'train.json'}"]
    if eval_only:
        folder = tmp_path / "eval" / "head"
    cfg = compose_config("logger=none", *overrides, config_name="train")
    folder.mkdir(parents=True)
    with hold(folder, "output_dir"):
        with pytest.raises(HarnessError, match=f"pid {os.getpid()} .*choose another output_dir"):
            train.run_train(cfg)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_a_finished_bench_releases_its_run_dir_for_a_resume(tiny_model_dir, tmp_path, questions_path):
    from harness.infra.store import RunStore

    run_dir = tmp_path / "run"
    common = ("max_new_tokens=4", "bench.max_turns=1")
    assert tiny_bench(tiny_model_dir, run_dir, questions_path, "bench.limit=1", *common)["questions"] == 1
    assert lock_text(run_dir) == ""
    summary = tiny_bench(tiny_model_dir, run_dir, questions_path, "bench.limit=2", "resume=true", *common)
    assert summary["questions"] == 2 and len(RunStore(run_dir).records()) == 2
    assert lock_text(run_dir) == ""


def test_a_finished_distill_shard_releases_its_lock_for_a_resume(chat_model, tmp_path, questions_path):
    from harness.distill import run_distill, shard_stem
    from harness.data.sharegpt import write_sharegpt
    from tiny_chat import model_overrides

    data = write_sharegpt([{"id": f"c{i}", "conversations": [{"from": "human", "value": f"tell me {i}"}]}
                           for i in range(2)], tmp_path / "in.json")
    cfg = compose_config(*model_overrides(chat_model), f"bench.path={questions_path}", "logger=none",
                         f"out_dir={tmp_path / 'out'}", "max_length=48", "max_new_tokens=4", "progress=false",
                         f"data_path={data}", config_name="distill")
    assert run_distill(cfg)["written_now"] == 2
    assert run_distill(cfg)["written_now"] == 0        # resume=true is distill's default
    assert lock_text(tmp_path / "out", f".{shard_stem(0, 1)}.lock") == ""
