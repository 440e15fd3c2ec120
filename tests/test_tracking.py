"""Issue 6: the W&B mirror. Offline files appear; W&B failing never fails a run or loses its results;
name, group, job_type and tags come from the Hydra job."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from harness import REPO_ROOT
from harness.bench import run_bench
from harness.infra.errors import HarnessError
from harness.infra.store import RunStore
from harness.infra.tracking import Tracker, flat_metrics
from tests.conftest import compose_config, tiny_bench_overrides


def wandb_records(path: Path) -> list:
    """The records of an offline `run-*.wandb` file: wandb's LevelDB-style log (32 KiB blocks, chunks with
    a 7-byte header: crc32, length, type) of protobuf `Record`s after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:          # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):                        # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run_info(path: Path) -> tuple[dict, set[str]]:
    """(name, group, job_type, tags of the run record; every summary key logged)."""
    records = wandb_records(path)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    keys = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "summary"
            for item in r.summary.update}
    return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type, "tags": set(run.tags)}, keys


def bench_overrides(model_dir, run_dir, questions, *extra, wandb_mode="disabled"):
    base = [o for o in tiny_bench_overrides(model_dir, run_dir, questions, "bench.limit=2", "max_new_tokens=6")
            if not o.startswith("logger.wandb.mode=")]
    return [*base, f"logger.wandb.mode={wandb_mode}", *extra]


class FakeRun:
    """A W&B run whose every logging call raises, as an unreachable or broken W&B would."""

    def __init__(self):
        self.finished, self.summary, self.dir = [], {}, "/nonexistent/files"

    def log(self, *args, **kwargs):
        raise RuntimeError("wandb: network is unreachable")

    def finish(self, exit_code=0):
        self.finished.append(exit_code)


def test_offline_run_files_exist_after_a_bench_run(tiny_model_dir, questions_path, tmp_path):
    run_dir = tmp_path / "run"
    summary = run_bench(compose_config(*bench_overrides(tiny_model_dir, run_dir, questions_path,
                                                        wandb_mode="offline")), run_dir)
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    [log_file] = list(offline.glob("run-*.wandb"))
    assert log_file.stat().st_size > 1000
    run, summary_keys = wandb_run_info(log_file)
    assert run == {"name": "run", "group": "", "job_type": "bench", "tags": {"smollm2-135m", "vanilla", "mt_bench"}}
    assert {"tokens_per_s", "tau", "questions"} <= summary_keys
    assert not {"turn/tau", "turn/tokens_per_s"} & summary_keys      # per-turn curves stay out of the summary
    [table] = list((offline / "files" / "media" / "table").glob("questions_*.table.json"))
    rows = json.loads(table.read_text())
    assert len(rows["data"]) == 2 and "tokens_per_s" in rows["columns"]
    assert summary["questions"] == 2 and (run_dir / "summary.json").is_file()
    artifacts = [r.artifact for r in wandb_records(log_file)
                 if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "answers"]
    assert [a.name for a in artifacts] == ["answers-smollm2-135m-vanilla-run"]
    assert {entry.path for entry in artifacts[0].manifest.contents} == {"answers.jsonl", "run.json", "summary.json"}


def test_a_head_is_an_artifact_the_training_run_logs_and_the_bench_run_uses(tmp_path, monkeypatch):
    """Lineage: specdec-train logs its output folder's head; a bench run whose head_path is that folder declares
    the same artifact (name and files) as its input."""
    import wandb

    from harness.infra.tracking import head_artifact

    folder = tmp_path / "runs" / "medusa3"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "head_config.json").write_text("{}")
    calls = []

    class Run:
        def log_artifact(self, artifact):
            calls.append(("log", artifact))

        def use_artifact(self, artifact):
            calls.append(("use", artifact))

    name, files = head_artifact("smollm2-135m", folder)                 # what specdec-train logs
    Tracker(Run()).artifact(name, "head", files)
    name, files = head_artifact("smollm2-135m", str(folder))            # a bench run with head_path=<folder>
    Tracker(Run()).artifact(name, "head", files, use=True)
    assert [kind for kind, _ in calls] == ["log", "use"]
    made, used = calls[0][1], calls[1][1]
    assert isinstance(made, wandb.Artifact) and made.name == used.name == "head-smollm2-135m-medusa3"
    assert made.type == used.type == "head" and made.digest == used.digest       # the same version
    assert sorted(made.manifest.entries) == ["head_config.json", "model.safetensors"]


def test_a_shipped_head_declares_the_training_runs_artifact_by_name():
    """ship copies a head to bf16 (other bytes: another artifact); a bench run on the copy also declares the
    training run's artifact by name, so W&B's lineage reaches the run that trained it; offline it is named in
    the summary."""
    calls = []

    class Run:
        summary: dict = {}

        def use_artifact(self, name, type=None):
            calls.append((name, type))

    Tracker(Run()).use_named("head-smollm2-135m-eagle_mix2", "trained_head")
    assert calls == [("head-smollm2-135m-eagle_mix2:latest", "trained_head")]

    class OfflineRun(Run):
        offline = True
        summary = {}

    offline = OfflineRun()
    Tracker(offline).use_named("head-smollm2-135m-eagle_mix2", "trained_head")
    assert offline.summary == {"uses/trained_head": "head-smollm2-135m-eagle_mix2"} and len(calls) == 1

    class ProjectWithoutIt(Run):                 # trained in another project: named, and logging goes on
        summary = {}

        def use_artifact(self, name, type=None):
            raise ValueError(f"artifact {name} not found")

    tracker = Tracker(ProjectWithoutIt())
    tracker.use_named("head-x-y", "trained_head")
    assert tracker.run.summary == {"uses/trained_head": "head-x-y"} and not tracker.broken


def test_wandb_init_raising_leaves_the_run_and_its_results_intact(tiny_model_dir, questions_path, tmp_path,
                                                                 monkeypatch):
    def broken_init(**kwargs):
        raise wandb.errors.CommError("could not reach api.wandb.ai")

    monkeypatch.setattr(wandb, "init", broken_init)
    run_dir = tmp_path / "run"
    summary = run_bench(compose_config(*bench_overrides(tiny_model_dir, run_dir, questions_path,
                                                        wandb_mode="online")), run_dir)
    assert [r["question_id"] for r in RunStore(run_dir).records()] == [81, 82]
    assert json.loads((run_dir / "summary.json").read_text())["questions"] == summary["questions"] == 2


def test_wandb_log_raising_still_finishes_and_keeps_results(tiny_model_dir, questions_path, tmp_path, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: fake)
    run_dir = tmp_path / "run"
    run_bench(compose_config(*bench_overrides(tiny_model_dir, run_dir, questions_path, wandb_mode="offline")),
              run_dir)
    assert len(RunStore(run_dir).records()) == 2 and (run_dir / "summary.json").is_file()
    assert fake.finished == [0]          # finish() ran, once, and the run counts as a success


def test_finish_runs_with_a_failure_code_when_the_run_fails(tiny_model_dir, questions_path, tmp_path, monkeypatch):
    class Recording(FakeRun):
        def log(self, *args, **kwargs):
            pass

    fake = Recording()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: fake)
    import harness.bench as bench

    def crash(*args, **kwargs):
        raise RuntimeError("the method crashed mid-run")

    monkeypatch.setattr(bench, "answer_question", crash)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crashed"):
        run_bench(compose_config(*bench_overrides(tiny_model_dir, run_dir, questions_path, wandb_mode="offline")),
                  run_dir)
    assert fake.finished == [1]


def test_name_group_job_type_and_tags_come_from_the_hydra_job(tmp_path, monkeypatch):
    seen = {}

    def capture(**kwargs):
        seen.update(kwargs)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", capture)
    from hydra import compose, initialize_config_dir

    from harness import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["method=pld", "bench.limit=3", f"run_dir={tmp_path}",
                                           "logger.wandb.mode=offline", f"hydra.sweep.dir={tmp_path}/sweep_x"],
                      return_hydra_config=True)
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    job_cfg = cfg.copy()
    with open_dict(job_cfg):
        del job_cfg["hydra"]          # a Hydra app's task function sees the config without its hydra node
    try:
        tracker = Tracker.start(job_cfg, tmp_path, "bench", ["smollm2-135m", "pld", "mt_bench"])
    finally:
        HydraConfig.instance().cfg = None
    assert seen["name"] == "bench.limit=3,method=pld"          # run_dir and logger.* say nothing about the job
    assert seen["group"] == "sweep_x" and seen["job_type"] == "bench" and seen["mode"] == "offline"
    assert seen["tags"] == ["mt_bench", "pld", "smollm2-135m"] and seen["config"]["method"]["name"] == "pld"
    tracker.log_record({"question_id": 81, "turns": []})
    tracker.finish()
    # an explicit group wins over the sweep's name
    Tracker.start(compose_config("logger.wandb.group=cpu_compare"), tmp_path, "report", ["x"])
    assert seen["group"] == "cpu_compare" and seen["job_type"] == "report" and seen["name"] == tmp_path.name


def test_flat_metrics_spells_out_positions_and_top_k():
    flat = flat_metrics({"tau": 2.5, "acceptance_per_position": [0.8, None, 0.5], "new_tokens": 40,
                         "topk_accuracy": {"pos1_top5": 0.9}, "lossless_rate": None, "tokens_per_s": math.nan,
                         "run_dir": "/x"})
    assert flat == {"tau": 2.5, "acceptance/pos1": 0.8, "acceptance/pos3": 0.5, "new_tokens": 40,
                    "topk_accuracy/pos1_top5": 0.9, "run_dir": "/x"}


def test_baseline_run_adds_speedups_and_refuses_other_settings(tiny_model_dir, questions_path, tmp_path):
    vanilla = tmp_path / "vanilla"
    run_bench(compose_config(*bench_overrides(tiny_model_dir, vanilla, questions_path)), vanilla)
    peer = tmp_path / "peer"
    summary = run_bench(compose_config(*bench_overrides(tiny_model_dir, peer, questions_path, "method=hf_generate",
                                                        f"baseline_run={vanilla}")), peer)
    assert summary["speedup_questions"] == 2 and summary["speedup"] > 0 and summary["speedup_total"] > 0
    # two paired questions: a resampled mean is one ratio, the other, or their mean, so the point is inside
    assert summary["speedup_ci_low"] <= summary["speedup"] <= summary["speedup_ci_high"]
    written = json.loads((peer / "summary.json").read_text())
    assert written["baseline_run"] == str(vanilla.resolve())
    assert (written["speedup_ci_low"], written["speedup_ci_high"]) == (summary["speedup_ci_low"],
                                                                      summary["speedup_ci_high"])
    other = tmp_path / "other"
    with pytest.raises(HarnessError, match=r"differs in max_new_tokens \(7 vs 6\)"):
        run_bench(compose_config(*bench_overrides(tiny_model_dir, other, questions_path, "max_new_tokens=7",
                                                  f"baseline_run={vanilla}")), other)


def test_a_sweeps_jobs_rank_themselves_against_its_vanilla_job(tiny_model_dir, questions_path, tmp_path):
    """No baseline_run=: each job of `-m method=vanilla,pld` finds the sweep's finished vanilla job with its
    settings; pld's summary.json and W&B summary get the speedups and the lossless classification; the W&B run
    has the acceptance table and keeps the per-turn curves out of its summary."""
    sweep = tmp_path / "sweep"
    base = [o for o in tiny_bench_overrides(tiny_model_dir, tmp_path / "unused", questions_path, "bench.limit=3",
                                            "max_new_tokens=12") if not o.startswith(("run_dir=", "logger.wandb.mode="))]
    command = [sys.executable, "-m", "harness.bench", "-m", "method=vanilla,pld", *base, "logger.wandb.mode=offline",
               f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    vanilla_dir, pld_dir = sweep / "0_vanilla_smollm2-135m", sweep / "1_pld_smollm2-135m"
    summary = json.loads((pld_dir / "summary.json").read_text())
    assert summary["baseline_run"] == str(vanilla_dir) and summary["speedup_questions"] == 3
    for key in ("speedup", "speedup_total", "speedup_spec_bench"):
        assert summary[key] > 0
    assert summary["lossless_compared"] == 3 and summary["lossless_mismatch"] == 0
    assert json.loads((vanilla_dir / "summary.json").read_text()).get("speedup") is None
    [offline] = list((pld_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    _, keys = wandb_run_info(offline)
    assert {"speedup", "speedup_ci_low", "lossless_rate", "tau", "tau_spec_bench"} <= keys
    assert not any(key.startswith("turn/") for key in keys)          # define_metric: no last-turn τ in the summary
    records = wandb_records(offline)
    logged = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
              for item in r.history.item}
    assert {"acceptance/_type", "questions/_type", "turn/tau", "turn_index"} <= logged
    [table] = list(pld_dir.glob("wandb/offline-run-*/files/media/table/acceptance_*.table.json"))
    acceptance = json.loads(table.read_text())
    assert acceptance["columns"] == ["position", "attempts", "accepted", "rate"] and acceptance["data"]


def test_a_merged_dataset_is_the_artifact_a_training_run_on_it_uses(chat_model, questions_path, tmp_path, monkeypatch):
    """specdec-distill merge=true logs the dataset (whole, splits, manifest) as `dataset-<name>`; a training run on
    its .train file declares the same artifact: same name and the same files, so the same version."""
    from harness.distill import dataset_artifact, run_distill
    from helpers import distill_cfg, sharegpt_input

    data = sharegpt_input(tmp_path / "in.json", count=4)
    base = [f"data_path={data}", "max_length=72", "max_new_tokens=6"]
    run_distill(distill_cfg(chat_model, questions_path, tmp_path, *base))
    output = tmp_path / "out" / "distilled.parquet"
    merged = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *base, "merge=true", f"output={output}",
                                     "eval_fraction=0.3", "logger.wandb.mode=offline"))
    [offline] = list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    [logged] = [r.artifact for r in wandb_records(offline)
                if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "dataset"]
    names = {entry.path for entry in logged.manifest.contents}
    assert names == {"distilled.parquet", "distilled.train.parquet", "distilled.eval.parquet", "distilled.manifest.json"}
    name, files = dataset_artifact(merged["train"])                  # what specdec-train data_path=<.train> uses
    assert logged.name == name == "dataset-distilled" and {f.name for f in files} == names


def test_a_dotted_dataset_name_still_attaches_its_manifest(tmp_path):
    from harness.distill import dataset_artifact
    from harness.data.token_data import manifest_path

    for name in ("d.v2.parquet", "d.v2.train.parquet", "d.v2.eval.parquet"):
        (tmp_path / name).write_bytes(b"x")
    manifest_path(tmp_path / "d.v2.parquet").write_text("{}")
    name, files = dataset_artifact(tmp_path / "d.v2.train.parquet")
    assert name == "dataset-d.v2"
    assert sorted(f.name for f in files) == ["d.manifest.json", "d.v2.eval.parquet", "d.v2.parquet",
                                             "d.v2.train.parquet"]
