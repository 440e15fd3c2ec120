"""Issue 6: sweeps. A multirun through submitit's local launcher gives one folder per job and a report;
every experiment config composes; the demo's command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from harness import CONF_DIR, REPO_ROOT
from harness.demo import available_methods, sweep_args
from conftest import compose_config
from reports.report import build_report
from tests.test_tracking import wandb_run_info

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_every_experiment_composes_with_each_method_it_sweeps():
    assert {"cpu_compare", "gpu_vicuna7b", "gpu_vicuna13b", "gpu_llama2_7b", "gpu_llama2_13b", "gpu_llama2_70b",
            "trigram_ablation"} <= set(EXPERIMENTS)
    known = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    swept, methods_cfg = {}, {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for experiment in EXPERIMENTS:
            cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
            params = swept[experiment] = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
            methods = params.get("method") or []
            assert "vanilla" in methods, f"{experiment}: a comparison needs its vanilla baseline in the sweep"
            assert cfg.logger.wandb.group == experiment    # one experiment = one W&B group
            # every method an experiment sweeps must exist: a name without a conf/method file is a typo
            absent = sorted(set(methods) - known)
            assert not absent, f"{experiment} sweeps methods with no conf/method file: {absent}"
            job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            for method in sorted(set(methods)):
                # Hydra composes each method once; the experiment's job config must resolve with it
                if method not in methods_cfg:
                    methods_cfg[method] = compose("config", overrides=[f"method={method}"]).method
                merged = OmegaConf.merge(job, {"method": methods_cfg[method]})
                resolved = OmegaConf.to_container(merged, resolve=True)
                assert resolved["method"]["name"] == method and resolved["model"]["name"]
                assert get_class(resolved["method"]["_target_"])   # the code the config points at imports
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=cpu_compare"])
    assert cfg.model.name == "smollm2-135m" and cfg.bench.limit == 20 and cfg.max_new_tokens == 256
    assert {"vanilla", "hf_generate", "pld", "lookahead_cpu", "early_exit"} <= set(swept["cpu_compare"]["method"])


@pytest.mark.parametrize("launcher, target", [("local", "LocalLauncher"), ("slurm", "SlurmLauncher")])
def test_launchers_compose_with_their_resources_in_config(launcher, target):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    settings = cfg.hydra.launcher
    assert settings._target_.endswith(target) and settings.timeout_min > 0
    if launcher == "slurm":
        assert settings.gpus_per_node == 1 and settings.array_parallelism >= 1 and settings.mem_gb
        assert "partition" in settings and settings.cpus_per_task
    # the job number keeps concurrent jobs' folders apart
    assert "${hydra:job.num}" in OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]


def test_demo_sweeps_the_cpu_methods_with_the_shipped_heads_and_takes_overrides(tmp_path):
    methods = available_methods()
    assert methods[:2] == ["vanilla", "hf_generate"]
    # trained heads, the ones heads/smollm2-135m ships, in the presets sized for this CPU (issue 14)
    for name in ("eagle2_cpu", "medusa_cpu_auto", "ours_auto"):
        assert name in methods
        head_path = compose_config(f"method={name}").method.head_path
        assert head_path and (Path(head_path) / "model.safetensors").is_file(), name
    args = sweep_args(["bench.limit=5", "method=vanilla,pld", "+foo=1"], tmp_path / "s")
    assert args[0] == "-m" and "bench.limit=5" in args and "bench.limit=3" not in args
    assert "method=vanilla,pld" in args and "+foo=1" in args and f"hydra.sweep.dir={tmp_path / 's'}" in args
    assert "max_new_tokens=64" in sweep_args([], tmp_path)


@pytest.mark.integration
def test_local_launcher_sweep_gives_one_folder_per_job_and_a_report(questions_path, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "harness.bench", "-m", "hydra/launcher=local", "method=vanilla,hf_generate",
               f"bench.path={questions_path}", "bench.limit=2", "max_new_tokens=4", "warmup=0", "progress=false",
               "logger.wandb.mode=offline", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "run.json").is_file())
    assert jobs == ["0_vanilla_smollm2-135m", "1_hf_generate_smollm2-135m"]
    assert (sweep / ".submitit").is_dir()           # it went through submitit, one process per job
    for job in jobs:
        assert (sweep / job / "summary.json").is_file()
        assert len((sweep / job / "answers.jsonl").read_text().splitlines()) == 2
        [offline] = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        run, _ = wandb_run_info(offline)
        method = job.split("_", 1)[1].rsplit("_", 1)[0]
        # named by the job's overrides, grouped by its sweep
        assert run["name"] == f"bench.limit=2,max_new_tokens=4,method={method},warmup=0" and run["group"] == "sweep"
    report = build_report(sweep, tmp_path / "report")
    board = report.tables["leaderboard"]
    assert set(board["method"]) == {"vanilla", "hf_generate"}
    assert board.loc[board["method"] == "vanilla", "Overall"].iloc[0] == pytest.approx(1.0)
    summary = report.tables["summary"].set_index("method")
    assert summary.loc["hf_generate", "lossless_rate"] == 1.0      # token ids compared with vanilla's
    assert all(Path(p).is_file() for p in report.figures.values()) and "speedup_per_category" in report.figures
