"""harness/heads/base.py: top-k accuracy by hand, checkpoints round trip, and the one-line refusals."""

import copy
import json

import pytest
import torch

from harness.infra.errors import HarnessError
from harness.heads.base import BaseHandles, build_head, topk_accuracy
from harness.heads.checkpoint import base_identity, check_base, load_head, save_head
from conftest import make_tiny_llama
from helpers import as_loaded

pytestmark = pytest.mark.usefixtures("one_thread")


def test_topk_accuracy_matches_a_hand_checked_example():
    # K=2 positions, B=1, T=5, V=4; input ids 0 1 2 3 0, the last token is not an assistant token
    input_ids = torch.tensor([[0, 1, 2, 3, 0]])
    mask = torch.tensor([[True, True, True, True, False]])
    logits = torch.zeros(2, 1, 5, 4)
    # position 1 (k=0): [0, t] predicts id[t+2]; counted t = 0, 1 (t = 2 targets the masked token)
    logits[0, 0, 0] = torch.tensor([0.0, 1.0, 9.0, 2.0])   # target 2: top-1 hit
    logits[0, 0, 1] = torch.tensor([9.0, 1.0, 2.0, 5.0])   # target 3: second -> top-1 miss, top-2 hit
    logits[0, 0, 2] = torch.tensor([0.0, 9.0, 5.0, 4.0])   # target 0 masked out: not counted
    logits[0, 0, 3:] = torch.tensor([0.0, 0.0, 0.0, 9.0])  # t + 2 >= T: never counted
    # position 2 (k=1): [1, t] predicts id[t+3]; counted t = 0 only (t = 1 targets the masked token)
    logits[1, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 0.0])   # target 3: last -> miss in top-1 and top-2
    logits[1, 0, 1] = torch.tensor([9.0, 0.0, 0.0, 0.0])
    result = topk_accuracy(logits, input_ids, mask, ks=(1, 2))
    assert result == {"pos1_top1": 0.5, "pos1_top2": 1.0, "pos2_top1": 0.0, "pos2_top2": 0.0}
    # nothing counted -> NaN, not a fake 0
    empty = topk_accuracy(logits, input_ids, torch.zeros_like(mask), ks=(1,))
    assert all(value != value for value in empty.values())


@pytest.mark.parametrize("own_lm_head", [True, False])
def test_medusa_head_round_trip(tmp_path, own_lm_head):
    model = make_tiny_llama()
    base = BaseHandles.of(model)
    head = build_head("medusa", model.config, base=base, type="medusa", medusa_num_heads=2, medusa_num_layers=1,
                      own_lm_head=own_lm_head)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.01 * torch.randn_like(param))
    save_head(head, tmp_path / "head", base_identity(model), extra={"training": {"steps": 3}})
    info = json.loads((tmp_path / "head" / "head_config.json").read_text())
    assert info["head_type"] == "medusa" and info["config"]["medusa_num_heads"] == 2
    assert info["training"] == {"steps": 3} and info["base"]["config_hash"]
    loaded = load_head(tmp_path / "head", as_loaded(model))
    saved, restored = head.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert any("medusa_head.0.1.weight" == key for key in saved) == own_lm_head   # shared lm_head not stored
    for key in saved:
        torch.testing.assert_close(saved[key], restored[key], rtol=0, atol=0)
    hidden, ids = torch.randn(2, 7, 64), torch.randint(0, 256, (2, 7))
    logits = loaded.training_logits(hidden, ids, base)
    assert logits.shape == (2, 2, 7, 256)
    torch.testing.assert_close(logits, head.training_logits(hidden, ids, base))


def _saved_head(tmp_path, model):
    head = build_head("medusa", model.config, base=BaseHandles.of(model), medusa_num_heads=2)
    return save_head(head, tmp_path / "head", base_identity(model))


def test_missing_and_corrupt_checkpoints_give_one_line_errors(tmp_path):
    model = make_tiny_llama()
    with pytest.raises(HarnessError, match="does not exist"):
        load_head(tmp_path / "nowhere", as_loaded(model))
    folder = _saved_head(tmp_path, model)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])             # a copy cut short
    with pytest.raises(HarnessError, match="corrupt or truncated") as error:
        load_head(folder, as_loaded(model))
    assert "\n" not in str(error.value)
    weights.unlink()
    with pytest.raises(HarnessError, match="has no model.safetensors"):
        load_head(folder, as_loaded(model))


def test_keys_or_shapes_that_do_not_match_the_config_are_refused(tmp_path):
    model = make_tiny_llama()
    folder = _saved_head(tmp_path, model)
    config_path = folder / "head_config.json"
    info = json.loads(config_path.read_text())
    info["config"]["medusa_num_layers"] = 2
    config_path.write_text(json.dumps(info))
    with pytest.raises(HarnessError, match="does not have the layout of its head_config.json"):
        load_head(folder, as_loaded(model))
    info["config"]["medusa_num_layers"] = 1
    info["config"]["medusa_num_heads"] = 1
    info["config"]["own_lm_head"] = False
    config_path.write_text(json.dumps(info))
    with pytest.raises(HarnessError, match="does not have the layout of its head_config.json"):
        load_head(folder, as_loaded(model))


def test_a_head_trained_for_another_model_is_refused(tmp_path):
    model = make_tiny_llama(seed=0)
    folder = _saved_head(tmp_path, model)
    with pytest.raises(HarnessError, match="lm_head weights differ") as error:
        load_head(folder, as_loaded(make_tiny_llama(seed=1), name="other"))   # same shapes, other weights
    assert "\n" not in str(error.value)
    with pytest.raises(HarnessError, match="was trained for"):
        load_head(folder, as_loaded(make_tiny_llama(seed=0, vocab=300), name="other"))   # other vocab


def test_identity_survives_dtype_changes_but_not_other_weights():
    model = make_tiny_llama()
    fp32 = base_identity(model)
    half = base_identity(copy.deepcopy(model).half())
    assert half["lm_head_hash"] == fp32["lm_head_hash"]          # fp16 rounding is part of the hash
    bf16 = base_identity(copy.deepcopy(model).bfloat16())
    check_base(fp32, bf16, "head")                               # the fingerprint tolerates bf16 rounding
    with pytest.raises(HarnessError):
        check_base(fp32, base_identity(make_tiny_llama(seed=3)), "head")


def test_unknown_head_type_and_bad_parameters():
    model = make_tiny_llama()
    with pytest.raises(HarnessError, match="unknown head type"):
        build_head("nope", model.config)
    with pytest.raises(HarnessError, match="bad parameters"):
        build_head("medusa", model.config, heads=3)
