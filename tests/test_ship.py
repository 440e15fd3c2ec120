"""Issue 5: shipped heads. `python -m harness.ship` writes a bf16 head folder + a manifest entry; the heads
the repository ships for the default model are small, bf16, lm_head-free, and load onto that model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, make_tiny_llama
from helpers import as_loaded
from safetensors import safe_open

from harness import REPO_ROOT
from harness.infra.errors import HarnessError
from harness.heads.base import BaseHandles, build_head
from harness.heads.checkpoint import base_identity, load_head, save_head
from harness.ship import main as ship_main
from harness.ship import sha256, ship

SHIPPED = REPO_ROOT / "heads" / "smollm2-135m"


def _trained_folder(tiny, folder: Path, data: Path, **head_kwargs) -> tuple[Path, torch.nn.Module]:
    head = build_head("medusa", tiny.config, base=BaseHandles.of(tiny), medusa_num_heads=2, **head_kwargs)
    accuracy = {"step": 7, "eval_loss": 2.5, "eval_pos0_top1": 0.25, "eval_pos0_top5": 0.5,
                "eval_pos1_top1": 0.125, "eval_pos1_top5": 0.375}
    training = {"command": "specdec-train train=medusa_smollm2", "commit": "abc123", "data_path": str(data),
                "eval_data_path": "e.json", "train_conversations": 3, "eval_conversations": 1,
                "training_args": {"num_train_epochs": 2, "learning_rate": 1e-3}}
    save_head(head, folder, base_identity(tiny), {"training": training, "topk_accuracy": accuracy})
    (folder / "topk_accuracy.json").write_text(json.dumps(accuracy))
    (folder / "train_summary.json").write_text(json.dumps({"global_step": 7, "train_runtime_s": 61.0,
                                                           "train_loss": 3.0, "train_conversations": 3}))
    return folder, head


def test_ship_writes_bf16_weights_and_a_manifest_entry_that_loads_back(tmp_path):
    tiny = make_tiny_llama()
    data = tmp_path / "train.json"
    data.write_text('[{"id": "a", "conversations": []}]')
    source, head = _trained_folder(tiny, tmp_path / "run", data)
    dest = tmp_path / "heads" / "tiny" / "medusa"
    entry = ship(source, dest, method="medusa_cpu")

    with safe_open(str(dest / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
    manifest = json.loads((dest.parent / "MANIFEST.json").read_text())
    assert manifest["heads"]["medusa"] == entry
    assert entry["command"] == "specdec-train train=medusa_smollm2" and entry["commit"] == "abc123"
    assert entry["data"]["sha256"] == sha256(data) and entry["data"]["train_conversations"] == 3
    assert entry["eval_topk"] == {"pos0": {"top1": 0.25, "top5": 0.5}, "pos1": {"top1": 0.125, "top5": 0.375}}
    assert entry["training"] == {"steps": 7, "steps_run": 7, "runtime_s": 61.0, "train_loss": 3.0, "epochs": 2,
                                 "learning_rate": 1e-3}
    assert entry["parameters"] == sum(p.numel() for p in head.parameters())
    assert entry["file_bytes"] == (dest / "model.safetensors").stat().st_size
    # lineage: the shipped copy names the artifact specdec-train logged for the folder it came from
    from harness.heads.checkpoint import trained_head_artifact
    from harness.infra.tracking import head_artifact

    base = json.loads((source / "head_config.json").read_text()).get("base", {}).get("name") or "model"
    assert entry["trained_artifact"] == head_artifact(base, source)[0] == f"head-{base}-run"
    assert trained_head_artifact(dest) == entry["trained_artifact"] and trained_head_artifact(source) is None
    readme = (dest.parent / "README.md").read_text()
    assert "| medusa | medusa_cpu | medusa |" in readme and "0.250 / 0.500 · 0.125 / 0.375" in readme

    # early stopping shipped the best eval's checkpoint: steps are that checkpoint's, steps_run the schedule's
    summary = json.loads((source / "train_summary.json").read_text())
    (source / "train_summary.json").write_text(json.dumps({**summary, "eval": {"head_from_step": 4}}))
    early = ship(source, tmp_path / "heads" / "tiny" / "medusa_early", method="medusa_cpu")
    assert (early["training"]["steps"], early["training"]["steps_run"]) == (4, 7)

    # the shipped folder is an ordinary head folder: it loads (fp32 on the tiny model) within bf16 rounding
    loaded = load_head(dest, as_loaded(tiny))
    for key, value in head.state_dict().items():
        assert torch.allclose(loaded.state_dict()[key], value, rtol=1e-2, atol=1e-2), key
        assert loaded.state_dict()[key].dtype == torch.float32


def test_ship_refuses_an_own_lm_head_an_oversized_head_and_an_unrecorded_command(tmp_path, capsys):
    tiny = make_tiny_llama()
    data = tmp_path / "train.json"
    data.write_text("[]")
    own, _ = _trained_folder(tiny, tmp_path / "own", data, own_lm_head=True)
    with pytest.raises(HarnessError, match="vocabulary-sized"):
        ship(own, tmp_path / "out" / "own")
    small, _ = _trained_folder(tiny, tmp_path / "small", data)
    with pytest.raises(HarnessError, match="exceeds --max-mb"):
        ship(small, tmp_path / "out" / "small", max_mb=0.001)
    info = json.loads((small / "head_config.json").read_text())
    del info["training"]["command"]
    (small / "head_config.json").write_text(json.dumps(info))
    assert ship_main([str(small), str(tmp_path / "out" / "small")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --command and --commit" in err
    assert not (tmp_path / "out").exists()                          # nothing half-written
    assert ship_main([str(small), str(tmp_path / "out" / "small"), "--command", "c", "--commit", "x"]) == 0


def test_the_shipped_heads_are_small_bf16_and_recorded():
    manifest = json.loads((SHIPPED / "MANIFEST.json").read_text())
    assert set(manifest["heads"]) == {"eagle", "eagle_v2", "medusa", "medusa1", "ours", "ours_no_trigram"}
    for name, entry in manifest["heads"].items():
        weights = SHIPPED / name / "model.safetensors"
        assert weights.stat().st_size == entry["file_bytes"] <= 16 * 2**20, name
        with safe_open(str(weights), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if key == "draft_vocab":    # a reduced draft vocabulary: token ids, kept as integers
                    assert tensor.dtype == torch.int64 and tensor.unique().numel() == tensor.numel(), name
                    continue
                assert tensor.dtype == torch.bfloat16 and 49152 not in tensor.shape, (name, key)
        assert entry["command"].startswith("specdec-train") and entry["commit"], name
        assert entry["data"]["train_conversations"] and len(entry["eval_topk"]) >= 1, name
        assert all(0.0 < v["top1"] <= v["top5"] <= 1.0 for v in entry["eval_topk"].values()), name
        assert json.loads((SHIPPED / name / "head_config.json").read_text())["head_type"] == entry["head_type"]


@pytest.mark.integration
def test_the_shipped_heads_load_onto_the_default_model():
    from harness.model.loading import load_model

    loaded = load_model(compose_config().model, "cpu", "fp32")
    for name in ("eagle", "eagle_v2", "medusa", "medusa1", "ours", "ours_no_trigram"):
        head = load_head(SHIPPED / name, loaded)                  # refuses a head trained for another model
        assert next(head.parameters()).dtype == torch.float32, name

