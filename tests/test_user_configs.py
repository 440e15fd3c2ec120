"""A user's own configs: `--config-dir DIR` and `hydra.searchpath=[...]` add config folders, and the
harness's name check (harness/infra/app.py, before Hydra composes) accepts what they hold."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import REPO_ROOT


@pytest.fixture()
def user_dir(tmp_path):
    folder = tmp_path / "my_conf"
    (folder / "method").mkdir(parents=True)
    (folder / "method" / "mymethod.yaml").write_text(
        "# a user's method: the vanilla proposer under another name\nname: mymethod\n"
        "_target_: baselines.vanilla.VanillaProposer\n")
    return folder


def bench(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, "-m", "harness.bench", *args, "--cfg", "job"], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("how", ["config-dir", "config-dir=", "searchpath"])
def test_a_method_from_a_user_folder_composes(user_dir, tmp_path, how):
    args = {"config-dir": ["--config-dir", str(user_dir)], "config-dir=": [f"--config-dir={user_dir}"],
            "searchpath": [f"hydra.searchpath=[file://{user_dir}]"]}[how]
    out = bench(*args, "method=mymethod", cwd=tmp_path)           # from another folder, too
    assert out.returncode == 0, out.stderr
    assert "name: mymethod" in out.stdout and "baselines.vanilla.VanillaProposer" in out.stdout


def test_unknown_names_still_fail_in_one_line_naming_every_folder(user_dir):
    out = bench("--config-dir", str(user_dir), "method=theirs")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1
    assert "unknown method 'theirs'" in lines[0] and "mymethod" in lines[0] and "vanilla" in lines[0]
    assert f"{user_dir}/method/" in lines[0] and "conf/method/" in lines[0]


def test_a_sweep_jobs_bad_input_is_recorded_and_the_other_jobs_run(tiny_model_dir, questions_path, tmp_path):
    """`-m bench.limit=0,1`: job 0 is refused (limit 0) and leaves failed.json; job 1 runs to its summary;
    the sweep ends with one line counting the failure and exit status 2."""
    import json

    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "harness.bench", "-m", f"model.path={tiny_model_dir}",
                          f"bench.path={questions_path}", "warmup=0", "logger.wandb.mode=disabled", "progress=false",
                          "max_new_tokens=4", "bench.max_turns=1", "bench.limit=0,1", f"hydra.sweep.dir={sweep}",
                          "hydra.sweep.subdir=${hydra:job.num}"], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    failed = json.loads((sweep / "0" / "failed.json").read_text())
    assert "bench.limit=0 must be an integer >= 1" in failed["error"] and "bench.limit=0" in failed["overrides"]
    assert (sweep / "1" / "summary.json").is_file() and not (sweep / "1" / "failed.json").exists()
    assert "1 sweep job(s) failed on bad input" in out.stderr.splitlines()[-1]
    from reports.report import build_report

    report = (build_report(sweep, tmp_path / "report", make_figures=False).out_dir / "report.md").read_text()
    assert "## Failed jobs (1" in report and "bench.limit=0 must be an integer >= 1" in report
