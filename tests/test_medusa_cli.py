"""specdec-train accepts the team's Medusa train.py command line as typed (harness/medusa_cli.py)."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from harness import CONF_DIR, REPO_ROOT
from harness.infra.errors import HarnessError
from harness.medusa_cli import translate
from harness.train import training_kwargs

# conf/train/medusa_vicuna7b.yaml's comment: the team's command, after `medusa/train/train_legacy.py`
TEAM_COMMAND = ("--model_name_or_path lmsys/vicuna-7b-v1.3 --data_path D.json --eval_data_path E.json --bf16 True "
                "--tf32 True --output_dir O --num_train_epochs 4 --per_device_train_batch_size 4 "
                "--per_device_eval_batch_size 4 --gradient_accumulation_steps 4 --evaluation_strategy steps "
                "--eval_steps 50 --save_strategy steps --save_steps 400 --save_total_limit 2 --learning_rate 1e-4 "
                "--weight_decay 0.0 --warmup_ratio 0.05 --lr_scheduler_type cosine --logging_steps 1 "
                "--model_max_length 2048 --lazy_preprocess True --medusa_num_heads 1 --medusa_num_layers 1")


def composed(overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_the_team_command_maps_onto_the_config():
    overrides = translate(shlex.split(TEAM_COMMAND))
    assert overrides[0] == "train=medusa_vicuna7b" and "model=vicuna-7b-v1.3" in overrides
    cfg = composed(overrides)
    assert cfg.model.name == "vicuna-7b-v1.3" and cfg.data_path == "D.json" and cfg.eval_data_path == "E.json"
    assert cfg.output_dir == "O" and cfg.model_max_length == 2048 and cfg.lazy_preprocess is True
    assert cfg.head.medusa_num_heads == 1 and cfg.head.medusa_num_layers == 1 and cfg.head.own_lm_head
    kwargs = training_kwargs(cfg)
    assert kwargs["bf16"] is True and kwargs["tf32"] is True and kwargs["num_train_epochs"] == 4
    assert kwargs["eval_strategy"] == "steps" and kwargs["eval_steps"] == 50 and kwargs["save_total_limit"] == 2
    assert kwargs["learning_rate"] == pytest.approx(1e-4) and kwargs["lr_scheduler_type"] == "cosine"
    assert kwargs["gradient_accumulation_steps"] == 4 and kwargs["logging_steps"] == 1


def test_flag_forms_hydra_flags_and_overrides_pass_through(tmp_path):
    folder = tmp_path / "vicuna-13b-v1.3"
    args = translate(["-m", f"--model_name_or_path={folder}", "--medusa_num_heads", "5", "train=medusa_smollm2",
                      "--cfg", "job", "threads=2", "--bf16", "False"])
    assert args == ["-m", "train=medusa_smollm2", "--cfg", "job", "threads=2", "model=vicuna-13b-v1.3",
                    f"model.path={folder}", "head.medusa_num_heads=5", "++training.bf16=false"]
    assert translate(["train=medusa_smollm2", "threads=2"]) == ["train=medusa_smollm2", "threads=2"]


def test_bad_flags_are_one_line():
    with pytest.raises(HarnessError, match="add model=<name>"):
        translate(["--model_name_or_path", "/data/some-other-model"])
    with pytest.raises(HarnessError, match="--bf16 needs a value"):
        translate(["--bf16"])
    cfg = composed(translate(["--model_name_or_path", "lmsys/vicuna-7b-v1.3", "--learning_rte", "1e-4"]))
    with pytest.raises(HarnessError, match="training.learning_rte is not a transformers TrainingArguments field"):
        training_kwargs(cfg)


def test_the_console_command_accepts_it():
    out = subprocess.run([sys.executable, "-c", "import sys; from harness.train import main; sys.argv[0] = "
                          "'specdec-train'; main()", *shlex.split(TEAM_COMMAND), "--cfg", "job"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "name: medusa_vicuna7b" in out.stdout and "hub_id: lmsys/vicuna-7b-v1.3" in out.stdout
    assert "medusa_num_heads: 1" in out.stdout and "tf32: true" in out.stdout
