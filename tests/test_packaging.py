"""Issue 15 item 10: a non-editable install (`pip install .`, `pip install git+...`) carries the configs and
the shipped heads, and `specdec-bench` runs from any folder.

A wheel is built from a copy of the checkout's files and installed, without dependencies, into a fresh venv
whose only other packages come from this venv (a .pth line: no download, no second torch), then the installed
`specdec-bench` runs EAGLE-2 with its shipped head on the real default model from an unrelated folder."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import harness
from harness import REPO_ROOT

pytestmark = pytest.mark.integration


def test_setuptools_packages_list_every_python_package():
    """pyproject.toml lists packages by hand (conf/ and heads/ are mapped into harness/_resources): a new
    subpackage must be listed too, or a wheel would lack it."""
    import tomllib

    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO_ROOT).parts) for top in ("harness", "baselines", "methods", "reports")
             for p in (REPO_ROOT / top).rglob("__init__.py")}
    assert found <= listed and {"harness._resources.conf", "harness._resources.heads"} <= listed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps_from_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the wheel is built by this venv's setuptools (no build isolation: nothing is downloaded), then installed
    # by the new venv's own pip, so its entry points run the new venv's python
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((root / "dist").glob("specdec_harness-*.whl"))
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return venv


def test_the_installed_package_runs_from_another_folder_with_its_shipped_head(installed, questions_path, tmp_path):
    python = installed / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import harness; print(harness.__file__, harness.CONF_DIR)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.split()
    assert str(installed) in where[0] and where[1].endswith("harness/_resources/conf")   # not this checkout
    run_dir = tmp_path / "run"
    out = subprocess.run([str(installed / "bin" / "specdec-bench"), "method=eagle2_cpu", "bench.limit=1",
                          "bench.max_turns=1", "max_new_tokens=8", "warmup=0", "device=cpu", "progress=false",
                          "logger.wandb.mode=disabled", f"bench.path={questions_path}", f"run_dir={run_dir}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["questions"] == 1 and summary["new_tokens"] == 8 and not summary["untrained_head"]
    head = Path(summary["head_path"])
    assert head.is_relative_to(installed) and head.parts[-3:] == ("heads", "smollm2-135m", "eagle")
    assert (head / "model.safetensors").is_file()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["git_commit"] is None and info["versions"]["specdec-harness"]   # an install has no checkout


def test_hydra_reads_the_installed_configs_as_a_package_search_path(installed, tmp_path):
    out = subprocess.run([str(installed / "bin" / "specdec-bench"), "hydra.searchpath=[pkg://harness._resources.conf]",
                          "method=medusa_cpu", "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name: medusa_cpu" in out.stdout


def test_the_source_tree_reads_its_own_folders():
    assert harness.CONF_DIR == REPO_ROOT / "conf" and harness.RESOURCE_ROOT == REPO_ROOT
