"""Ship a trained head inside the repository: bf16 safetensors + a manifest entry.

    python -m harness.ship runs/train/smollm2-135m_eagle_smollm2 heads/smollm2-135m/eagle
    python -m harness.ship SRC DEST --command "specdec-train ..." --commit abc123   # for heads trained before
                                                                                    # specdec-train recorded them

The shipped folder is an ordinary head folder (`method.head_path=` loads it; the decoder casts the
weights to the target's dtype): `model.safetensors` in bfloat16, `head_config.json` as specdec-train
wrote it plus a `shipped` block, and `topk_accuracy.json`. Refused when a file would exceed
`--max-mb` (16) or holds a vocabulary-sized matrix (a shared frozen lm_head is never stored).

`<DEST parent>/MANIFEST.json` gets one entry per head: the training data (path, conversations, sha256),
the command, the commit, steps and time, the eval top-k accuracy per position and the file size;
`<DEST parent>/README.md` is rendered from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import torch

from harness.infra.errors import HarnessError
from harness.infra.tracking import head_artifact
from harness.heads.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_head_config
from harness.train import TOPK_FILE

MANIFEST = "MANIFEST.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def topk_table(metrics: dict) -> dict[str, dict[str, float]]:
    """{"pos1": {"top1": .., "top5": ..}, ...} from the trainer's eval_pos{k}_top{j} keys (position 1 = t+2)."""
    table: dict[str, dict[str, float]] = {}
    for key, value in (metrics or {}).items():
        found = re.fullmatch(r"(?:eval_)?pos(\d+)_top(\d+)", key)
        if found:
            table.setdefault(f"pos{found[1]}", {})[f"top{found[2]}"] = round(float(value), 4)
    return dict(sorted(table.items(), key=lambda item: int(item[0][3:])))


def ship(source: str | Path, dest: str | Path, *, command: str | None = None, commit: str | None = None,
         max_mb: float = 16.0, method: str | None = None, data_command: str | None = None) -> dict:
    """Copy the head at `source` to `dest` in bf16 and record it in dest's parent MANIFEST.json."""
    from safetensors.torch import load_file, save_file

    source, dest = Path(source), Path(dest)
    info = read_head_config(source)
    weights = source / WEIGHTS_FILE
    if not weights.is_file():
        raise HarnessError(f"{source} has no {WEIGHTS_FILE}; ship the final output_dir of specdec-train")
    tensors = load_file(str(weights))
    vocab = int(info.get("base", {}).get("architecture", {}).get("vocab_size") or 0)
    for key, value in tensors.items():
        if vocab and vocab in tuple(value.shape):
            raise HarnessError(f"{weights}: {key} {tuple(value.shape)} is vocabulary-sized (an own lm_head); "
                               f"shipped heads share the frozen base lm_head (train with own_lm_head=false)")
    shipped = {key: (value.to(torch.bfloat16) if value.is_floating_point() else value).contiguous()
               for key, value in tensors.items()}   # integer buffers (a draft vocabulary) stay integers
    size = sum(value.numel() * value.element_size() for value in shipped.values())
    if size > max_mb * 2**20:
        raise HarnessError(f"{source}: {size / 2**20:.1f} MiB in bf16 exceeds --max-mb {max_mb}; ship a smaller head")

    training = dict(info.get("training") or {})
    summary_path = source / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    accuracy = info.get("topk_accuracy") or summary.get("eval") or {}
    if (source / TOPK_FILE).is_file():
        accuracy = json.loads((source / TOPK_FILE).read_text())
    data_path = Path(training["data_path"]) if training.get("data_path") else None
    entry = {
        "name": dest.name,
        "method": method,
        "head_type": info["head_type"],
        "config": info["config"],
        "base": {"hub_id": info.get("base", {}).get("hub_id"), "name": info.get("base", {}).get("name")},
        "parameters": sum(value.numel() for value in shipped.values()),
        "file_bytes": None,
        "dtype": "bfloat16",
        "command": command or training.get("command"),
        "commit": commit or training.get("commit"),
        "data": {"path": str(data_path) if data_path else None,
                 "sha256": sha256(data_path) if data_path and data_path.is_file() else None,
                 "train_conversations": training.get("train_conversations") or summary.get("train_conversations"),
                 "eval_path": training.get("eval_data_path"),
                 "eval_conversations": training.get("eval_conversations"),
                 "made_by": data_command},
        # steps: those the shipped weights had (early stopping keeps the best eval's checkpoint, not the last step)
        "training": {"steps": (summary.get("eval") or {}).get("head_from_step") or summary.get("global_step"),
                     "steps_run": summary.get("global_step"), "runtime_s": summary.get("train_runtime_s"),
                     "train_loss": summary.get("train_loss"),
                     "epochs": (training.get("training_args") or {}).get("num_train_epochs"),
                     "learning_rate": (training.get("training_args") or {}).get("learning_rate")},
        "eval_topk": topk_table(accuracy),
        "eval_loss": accuracy.get("eval_loss"),
        # the W&B artifact specdec-train logged for `source`: bench runs on the shipped copy declare it too
        "trained_artifact": head_artifact(info.get("base", {}).get("name") or "model", source)[0],
    }
    if not entry["command"] or not entry["commit"]:
        raise HarnessError(f"{source} does not record its training command/commit (trained before specdec-train "
                           f"wrote them); pass --command and --commit")

    dest.mkdir(parents=True, exist_ok=True)
    save_file(shipped, str(dest / WEIGHTS_FILE), metadata={"head_type": info["head_type"], "format_version":
                                                            str(info.get("format_version", 1))})
    info["shipped"] = {key: entry[key] for key in ("command", "commit", "dtype", "trained_artifact")}
    (dest / CONFIG_FILE).write_text(json.dumps(info, indent=2, default=str))
    (dest / TOPK_FILE).write_text(json.dumps(accuracy, indent=2, default=str))
    entry["file_bytes"] = (dest / WEIGHTS_FILE).stat().st_size

    manifest_path = dest.parent / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"heads": {}}
    manifest["heads"][dest.name] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    (dest.parent / "README.md").write_text(render(manifest))
    return entry


def render(manifest: dict) -> str:
    lines = ["# Shipped heads", "",
             "Written by `python -m harness.ship` from `MANIFEST.json` (do not edit by hand). Each folder is a",
             "`method.head_path=` folder: bf16 weights without the shared frozen lm_head.", "",
             "Eval top-k: teacher-forced on the held-out split, position k = the token k steps after the target's",
             "own next token (position 1 = t+2).", "",
             "| head | method | type | params | MiB | train convs | steps | train time | eval top-1 / top-5 per position |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in manifest["heads"].items():
        topk = " · ".join(f"{values.get('top1', 0):.3f} / {values.get('top5', 0):.3f}"
                          for values in entry["eval_topk"].values())
        runtime = entry["training"].get("runtime_s")
        lines.append(f"| {name} | {entry.get('method') or ''} | {entry['head_type']} | {entry['parameters']:,} | "
                     f"{entry['file_bytes'] / 2**20:.1f} | {entry['data'].get('train_conversations')} | "
                     f"{entry['training'].get('steps')} | {f'{runtime / 60:.0f} min' if runtime else '-'} | {topk} |")
    lines += ["", "Commands and commits:", ""]
    for name, entry in manifest["heads"].items():
        data = entry["data"]
        made_by = f", made by `{data['made_by']}`" if data.get("made_by") else ""
        lines.append(f"- {name} ({entry['commit']}): `{entry['command']}`; data {data.get('path')} "
                     f"(sha256 {str(data.get('sha256'))[:12]}){made_by}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a specdec-train output_dir")
    parser.add_argument("dest", help="the shipped folder, e.g. heads/smollm2-135m/eagle")
    parser.add_argument("--command", help="the training command (when the head does not record it)")
    parser.add_argument("--commit", help="the commit it was trained at (when the head does not record it)")
    parser.add_argument("--method", help="the conf/method preset that uses it")
    parser.add_argument("--data-command", help="how the training data was made (the specdec-distill commands)")
    parser.add_argument("--max-mb", type=float, default=16.0)
    args = parser.parse_args(argv)
    try:
        entry = ship(args.source, args.dest, command=args.command, commit=args.commit, max_mb=args.max_mb,
                     method=args.method, data_command=args.data_command)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dest}: {entry['parameters']:,} parameters, {entry['file_bytes'] / 2**20:.2f} MiB bf16; "
          f"top-k {entry['eval_topk']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
