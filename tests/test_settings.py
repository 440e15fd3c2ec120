"""Run settings are checked before any work starts (harness/infra/settings.py): each bad value the issue
lists is one line naming the key and what it must be, for bench, distill and train configs."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness import CONF_DIR
from harness.infra.errors import HarnessError
from harness.infra.settings import BENCH, DISTILL, TRAIN, check_settings


def composed(name: str, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize("override, words", [
    ("max_new_tokens=0", "max_new_tokens=0 must be an integer >= 1"),        # generated 1 token before
    ("max_new_tokens=-5", "max_new_tokens=-5 must be an integer >= 1"),
    ("decoding.temperature=-1", "decoding.temperature=-1 must be a number >= 0"),   # ran greedy, recorded -1.0
    ("decoding.top_p=0", "decoding.top_p=0 must be a number in (0, 1]"),      # crashed mid-run with sampling
    ("decoding.top_p=1.5", "decoding.top_p=1.5"),
    ("threads=-1", "threads=-1 must be an integer >= 1, or null"),
    ("threads=0", "threads=0"),
    ("seed=-3", "seed=-3 must be an integer >= 0"),
    ("warmup=-1", "warmup=-1"),
    ("device=tpu", "device='tpu' must be auto, cpu, cuda or cuda:<index>"),
])
def test_bad_bench_values_are_one_line(override, words):
    with pytest.raises(HarnessError) as caught:
        check_settings(composed("config", override), BENCH)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_cuda_on_a_machine_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)     # also on a GPU machine
    with pytest.raises(HarnessError, match="this machine has no CUDA device; use device=cpu"):
        check_settings(composed("config", "device=cuda"), BENCH)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_settings(composed("config", "device=cuda:1"), BENCH)
    with pytest.raises(HarnessError, match="CUDA devices 0..1"):
        check_settings(composed("config", "device=cuda:2"), BENCH)


@pytest.mark.parametrize("name, rules, override, words", [
    ("distill", DISTILL, "max_length=1", "max_length=1 must be an integer >= 2"),
    ("distill", DISTILL, "self_prompts.second_turn_fraction=1.5", "second_turn_fraction=1.5"),
    ("distill", DISTILL, "eval_fraction=-0.1", "eval_fraction=-0.1"),
    ("distill", DISTILL, "decoding.temperature=-0.5", "decoding.temperature=-0.5"),
    ("train", TRAIN, "threads=-2", "threads=-2"),
])
def test_bad_distill_and_train_values_are_one_line(name, rules, override, words):
    with pytest.raises(HarnessError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_settings(composed(name, override), rules)


@pytest.mark.parametrize("name, rules", [("config", BENCH), ("distill", DISTILL), ("train", TRAIN)])
def test_the_shipped_defaults_pass(name, rules):
    check_settings(composed(name), rules)
    if name == "config":
        check_settings(composed(name, "decoding.temperature=0.7", "decoding.top_p=0.9", "threads=2",
                                "device=cpu", "max_new_tokens=1"), rules)


def test_the_bench_refuses_before_the_model_loads(tmp_path):
    import subprocess
    import sys

    from harness import REPO_ROOT

    out = subprocess.run([sys.executable, "-m", "harness.bench", "max_new_tokens=0", "model.path=/nowhere",
                          f"hydra.run.dir={tmp_path / 'hydra'}"],   # no run folder left in the checkout
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "max_new_tokens=0 must be an integer >= 1" in lines[0]
