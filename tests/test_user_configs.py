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
