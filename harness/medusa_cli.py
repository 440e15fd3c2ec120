"""The team's Medusa train.py command line, as typed, for `specdec-train`.

    specdec-train --model_name_or_path lmsys/vicuna-7b-v1.3 --data_path D --bf16 True --output_dir O
                  --num_train_epochs 2 --per_device_train_batch_size 8 ... --medusa_num_heads 3 --medusa_num_layers 1

becomes the Hydra overrides `train=medusa_vicuna7b model=vicuna-7b-v1.3 data_path=D training.bf16=true
output_dir=O training.num_train_epochs=2 ... head.medusa_num_heads=3 head.medusa_num_layers=1`:
- `--model_name_or_path`: a hub id of a `conf/model/*.yaml` selects that model; a local folder selects the
  model whose hub id ends with the folder's name and sets `model.path` (otherwise: one line asking for
  `model=<name>`).
- Medusa's own arguments: `--data_path`, `--eval_data_path`, `--output_dir`, `--model_max_length`,
  `--lazy_preprocess`, `--medusa_num_heads`, `--medusa_num_layers` map to their config keys; every other
  `--name value` is a transformers TrainingArguments field: `++training.name=value` (an unknown name is refused
  in one line by harness/train.py). `True`/`False` become `true`/`false`; `--flag=value` works too.
- Without a `train=` of its own, the preset is `medusa_vicuna7b` (Medusa-1: own lm_heads, prompt columns
  cropped); Hydra overrides and Hydra's own flags (-m, --cfg, --config-dir ...) may be mixed in and pass through.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from harness import CONF_DIR
from harness.infra.errors import HarnessError

MEDUSA_KEYS = {"data_path": "data_path", "eval_data_path": "eval_data_path", "output_dir": "output_dir",
               "model_max_length": "model_max_length", "lazy_preprocess": "lazy_preprocess",
               "medusa_num_heads": "head.medusa_num_heads", "medusa_num_layers": "head.medusa_num_layers"}
PRESET = "medusa_vicuna7b"
# Hydra's own flags: (flag, takes a value)
HYDRA_FLAGS = {"-m": False, "--multirun": False, "--cfg": True, "-c": True, "--help": False, "-h": False,
               "--hydra-help": False, "--info": False, "-i": False, "--package": True, "-p": True,
               "--resolve": False, "--run": False, "-r": False, "--config-dir": True, "-cd": True,
               "--config-path": True, "-cp": True, "--config-name": True, "-cn": True,
               "--shell-completion": False, "-sc": False, "--experimental-rerun": True}


def _value(text: str) -> str:
    return {"true": "true", "false": "false"}.get(text.lower(), text)


def _model_overrides(name_or_path: str) -> list[str]:
    models = {path.stem: OmegaConf.load(path) for path in sorted((CONF_DIR / "model").glob("*.yaml"))}
    for name, cfg in models.items():
        if cfg.get("hub_id") == name_or_path or name == name_or_path:
            return [f"model={name}"]
    folder = Path(name_or_path).expanduser()
    for name, cfg in models.items():
        hub = str(cfg.get("hub_id") or "")
        if folder.name and folder.name.lower() in (name.lower(), hub.rsplit("/", 1)[-1].lower()):
            return [f"model={name}", f"model.path={folder}"]
    raise HarnessError(f"--model_name_or_path {name_or_path}: no conf/model/*.yaml has that hub id or folder name; "
                       f"add model=<name> (one of {', '.join(models)}) and model.path={name_or_path}")


def translate(argv: list[str]) -> list[str]:
    """Medusa-style `--name value` arguments -> Hydra overrides; anything else passes through unchanged."""
    if not any(arg.startswith("--") and arg.split("=", 1)[0] not in HYDRA_FLAGS for arg in argv):
        return list(argv)
    out, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        flag = arg.split("=", 1)[0]
        if flag in HYDRA_FLAGS or not arg.startswith("--"):
            out.append(arg)
            if flag in HYDRA_FLAGS and HYDRA_FLAGS[flag] and "=" not in arg and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
            i += 1
            continue
        name = flag[2:]
        if "=" in arg:
            value = arg.split("=", 1)[1]
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        else:
            raise HarnessError(f"--{name} needs a value (Medusa's train.py writes booleans as `--{name} True`)")
        i += 1
        if name == "model_name_or_path":
            overrides += _model_overrides(value)
        elif name in MEDUSA_KEYS:
            overrides.append(f"{MEDUSA_KEYS[name]}={_value(value)}")
        else:
            overrides.append(f"++training.{name}={_value(value)}")   # ++: add a field the preset does not set
    if not any(arg.split("=", 1)[0].lstrip("+~") == "train" for arg in out):
        overrides.insert(0, f"train={PRESET}")
    return out + overrides
