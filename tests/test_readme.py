"""Every command in the README's bash blocks runs as written, as far as that can be checked without the GPU models
and hours of work: each specdec-* command composes with Hydra (every key, group choice and sweep value), passes
the app's settings check (harness/infra/settings.py), and each `python -m` tool knows every flag the README
gives it. Placeholders (`<vanilla run>`) become a path; `...` (more flags) is dropped."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import compose_config
from harness import REPO_ROOT
from harness.infra.settings import BENCH, DISTILL, TRAIN, check_settings

APPS = {"specdec-bench": ("config", BENCH), "specdec-train": ("train", TRAIN), "specdec-distill": ("distill", DISTILL),
        "specdec-report": ("report", None), "specdec-plan": ("plan", None)}
GROUPS = {"model", "method", "bench", "logger", "experiment", "train"}


def readme_commands() -> list[str]:
    """The README's bash-block lines, continuation lines joined and comments cut."""
    text = (REPO_ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def placeholders(word: str) -> str:
    return re.sub(r"<[^>]*>", "placeholder", word)


def expand(overrides: list[str]) -> list[list[str]]:
    """A sweep's overrides (`method=a,b`) as one override list per value of each swept key."""
    lists = [[]]
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and "," in value and not value.startswith("[") and key.lstrip("+~") in GROUPS:
            lists = [current + [f"{key}={v}"] for current in lists for v in value.split(",")]
        else:
            lists = [current + [override] for current in lists]
    return lists


HYDRA_COMMANDS = [c for c in readme_commands() if shlex.split(c)[0] in APPS]
MODULE_COMMANDS = [c for c in readme_commands() if c.startswith("python -m ")]


def test_the_readme_has_the_commands_this_test_reads():
    assert len(HYDRA_COMMANDS) >= 15 and len(MODULE_COMMANDS) >= 2
    assert {shlex.split(c)[0] for c in HYDRA_COMMANDS} >= {"specdec-bench", "specdec-train", "specdec-distill",
                                                           "specdec-report"}


@pytest.mark.parametrize("command", HYDRA_COMMANDS)
def test_each_specdec_command_composes_and_passes_its_settings_check(command):
    from harness.medusa_cli import translate

    words = [w for w in shlex.split(placeholders(command)) if w != "..."]
    app, args = words[0], words[1:]
    if app == "specdec-train":
        args = translate(args)          # the team's Medusa flags, as the entry point maps them
    config_name, rules = APPS[app]
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            continue
        if arg in ("--config-dir", "-cd"):
            skip = True
            continue
        if arg.startswith(("hydra.", "hydra/")):      # where Hydra runs it: not part of the job's config
            continue
        overrides.append(arg)
    for each in expand(overrides):
        cfg = compose_config(*each, config_name=config_name)
        if rules is not None:
            check_settings(cfg, rules)


def module_flags(command: str) -> tuple[str, list[str]]:
    words = shlex.split(placeholders(command))
    return words[2], [w.split("=", 1)[0] for w in words[3:] if w.startswith("--")]


@pytest.mark.parametrize("command", MODULE_COMMANDS)
def test_each_python_tool_knows_the_flags_the_readme_gives_it(command):
    module, flags = module_flags(command)
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in flags:
        assert flag in done.stdout, f"{module} has no {flag}"
