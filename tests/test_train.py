"""specdec-train on a tiny chat model: end to end (loss falls, safetensors head folders that load_head reads,
top-k accuracy logged and written), eval_only, resume after a kill, the assistant-only mask, the frozen
target, and the team's Medusa command mapped one to one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from conftest import compose_config
from harness import REPO_ROOT
from harness.heads import base as heads
from harness.infra.errors import HarnessError
from harness.infra.signals import Stopped
from harness.heads.base import DraftHead, topk_accuracy
from harness.heads.checkpoint import base_identity, load_head
from harness.model.loading import load_model
from harness.train import (HeadTrainer, HeadTrainingModel, checkpoint_problem, run_train, training_arguments,
                           training_kwargs, wandb_enabled)
from harness.data.examples import IGNORE_INDEX, Collator, ConversationDataset, tokenize_conversation
from helpers import COUNTING, toy_sharegpt, train_overrides
from tiny_chat import model_overrides

class StandInHead(DraftHead):
    """A trigram-like stand-in (token inputs, teacher-forced): hidden[t] + embed(x[t]) -> K positions."""

    head_type = "standin"

    def __init__(self, hidden_size: int, vocab_size: int, num_positions: int = 2):
        super().__init__(dict(hidden_size=hidden_size, vocab_size=vocab_size, num_positions=num_positions))
        self.mix = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_positions))

    @property
    def num_positions(self) -> int:
        return len(self.mix)

    def training_logits(self, hidden, input_ids, base):
        state = hidden + base.embed(input_ids).to(hidden.dtype)
        return torch.stack([base.lm_head(state + torch.tanh(mix(state))) for mix in self.mix])


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A memorisable set: short questions answered by counting (t + 2 follows from t)."""
    return toy_sharegpt(tmp_path_factory.mktemp("toy"))


def train_cfg(chat_model, toy_data, output_dir, *overrides):
    return compose_config(*train_overrides(chat_model, *toy_data, output_dir, *overrides), config_name="train")


@pytest.fixture(scope="module")
def trained(chat_model, toy_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("medusa")
    cfg = train_cfg(chat_model, toy_data, output_dir)
    return cfg, run_train(cfg)


def logged(output_dir: Path, step: int) -> list[dict]:
    return json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]


def test_training_lowers_the_loss_and_writes_a_head_folder_load_head_reads(trained):
    cfg, summary = trained
    output_dir = Path(cfg.output_dir)
    losses = [entry["loss"] for entry in logged(output_dir, 24) if "loss" in entry]
    assert len(losses) == 24 and summary["global_step"] == 24
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-24"]
    for folder in (output_dir, output_dir / "checkpoint-12"):
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
        assert not list(folder.glob("*.bin"))
    info = json.loads((output_dir / "head_config.json").read_text())
    assert info["head_type"] == "medusa" and info["config"]["medusa_num_heads"] == 2
    assert info["training"]["training_args"]["eval_strategy"] == "steps"
    loaded = load_model(cfg.model, "cpu")
    assert info["base"] == json.loads(json.dumps(base_identity(loaded, cfg.model)))
    head = load_head(output_dir, loaded)   # what method.head_path=<output_dir> loads
    assert head.num_positions == 2


def test_eval_logs_and_writes_topk_accuracy_per_position(trained):
    from transformers.integrations.integration_utils import rewrite_logs

    cfg, summary = trained
    output_dir = Path(cfg.output_dir)
    evals = [entry for entry in logged(output_dir, 24) if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [12, 24]
    for key in ("eval_pos1_top1", "eval_pos1_top5", "eval_pos2_top1", "eval_pos2_top5"):
        assert 0.0 <= evals[-1][key] <= 1.0
    assert "eval/pos2_top5" in rewrite_logs(evals[-1])      # the W&B names
    for folder, step in ((output_dir, 24), (output_dir / "checkpoint-12", 12)):
        written = json.loads((folder / "topk_accuracy.json").read_text())
        assert written["step"] == step and written["eval_pos1_top1"] == [e for e in evals if e["step"] == step][0][
            "eval_pos1_top1"]


def test_eval_accuracy_is_topk_accuracy_over_the_whole_eval_set(trained, chat_model):
    cfg, summary = trained
    loaded = load_model(cfg.model, "cpu")
    head = load_head(cfg.output_dir, loaded)
    data = ConversationDataset(cfg.eval_data_path, loaded.template, 64)
    hits, counted = {}, {}
    with torch.no_grad():
        for example in data:   # one example at a time, no padding: the reference
            ids = torch.tensor([example["input_ids"]])
            mask = torch.tensor([example["labels"]]) != IGNORE_INDEX
            hidden = loaded.model.model(input_ids=ids).last_hidden_state
            accuracy = topk_accuracy(head.training_logits(hidden, ids, heads.BaseHandles.of(loaded.model)), ids,
                                     mask)
            for key, value in accuracy.items():
                tokens = int(mask[0, int(key[3]) + 1:].sum())
                hits[key] = hits.get(key, 0.0) + value * tokens
                counted[key] = counted.get(key, 0) + tokens
    for key in hits:
        assert summary["eval"][f"eval_{key}"] == pytest.approx(hits[key] / counted[key], abs=1e-9)


def test_eval_only_writes_topk_accuracy_beside_never_into_the_head_folder(trained, chat_model, toy_data, tmp_path):
    cfg, summary = trained
    head_copy = tmp_path / "head"
    head_copy.mkdir()
    for name in ("model.safetensors", "head_config.json"):
        (head_copy / name).write_bytes((Path(cfg.output_dir) / name).read_bytes())
    eval_cfg = train_cfg(chat_model, toy_data, tmp_path / "unused", "eval_only=true", f"head_path={head_copy}")
    before = sorted(p.name for p in head_copy.iterdir())
    metrics = run_train(eval_cfg)
    assert sorted(p.name for p in head_copy.iterdir()) == before          # the head folder is left as it was
    written = json.loads((tmp_path / "unused" / "eval" / "head" / "topk_accuracy.json").read_text())
    assert written["head_path"] == str(head_copy) and metrics["output_dir"] == str(tmp_path / "unused" / "eval" / "head")
    for key in ("eval_pos1_top1", "eval_pos2_top5", "eval_loss"):
        assert written[key] == pytest.approx(summary["eval"][key], rel=1e-6) == metrics[key]
    with pytest.raises(HarnessError, match="eval_only=true needs head_path"):
        run_train(train_cfg(chat_model, toy_data, tmp_path / "x", "eval_only=true"))


def test_resume_after_a_kill_continues_from_the_last_checkpoint(chat_model, toy_data, tmp_path, monkeypatch):
    overrides = ["training.max_steps=6", "training.save_steps=3", "training.eval_steps=3"]
    straight = run_train(train_cfg(chat_model, toy_data, tmp_path / "straight", *overrides))
    real, steps = HeadTrainer.training_step, []

    def killed_in_step_5(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HeadTrainer, "training_step", killed_in_step_5)
    with pytest.raises(Stopped, match="stopped at once"):
        run_train(train_cfg(chat_model, toy_data, tmp_path / "killed", *overrides))
    assert [p.name for p in (tmp_path / "killed").glob("checkpoint-*")] == ["checkpoint-3"]
    monkeypatch.setattr(HeadTrainer, "training_step", real)
    resumed = run_train(train_cfg(chat_model, toy_data, tmp_path / "killed", *overrides))
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["global_step"] == 6
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert resumed["eval"]["eval_pos1_top1"] == pytest.approx(straight["eval"]["eval_pos1_top1"])
    with pytest.raises(HarnessError, match="holds a medusa head"):   # another head into the same folder
        run_train(train_cfg(chat_model, toy_data, tmp_path / "killed", *overrides[1:], "training.max_steps=9",
                            "head.medusa_num_heads=1"))


def test_frozen_target_stays_outside_the_trained_module(chat_model, toy_data, tmp_path, monkeypatch):
    monkeypatch.setitem(heads.HEAD_TYPES, "standin", "test_train:StandInHead")
    cfg = train_cfg(chat_model, toy_data, tmp_path / "standin", "training.max_steps=4", "training.save_steps=4",
                    "training.eval_steps=4")
    with open_dict(cfg):
        cfg.head = OmegaConf.create({"type": "standin", "num_positions": 3})
    loaded = load_model(cfg.model, "cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    model = HeadTrainingModel(StandInHead(64, len(loaded.tokenizer), 3), loaded.model)
    assert all(key.startswith("head.") for key in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    summary = run_train(cfg)   # loads its own target: check the weights on disk did not move either
    assert summary["global_step"] == 4 and summary["eval"]["eval_pos3_top5"] >= 0.0
    after = load_model(cfg.model, "cpu").model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    head = load_head(cfg.output_dir, loaded)
    assert isinstance(head, StandInHead) and head.num_positions == 3


def test_labels_cover_exactly_the_assistant_answers(chat_model):
    cfg = compose_config(*model_overrides(chat_model)[:-1], config_name="train")
    loaded = load_model(cfg.model, "cpu")
    pairs = [("hello world", "the cat sat on the mat ."), ("why ?", "red blue green")]
    example = tokenize_conversation(loaded.template, pairs, 512)
    labelled = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert loaded.tokenizer.decode(labelled) == "the cat sat on the mat . <|im_end|> red blue green <|im_end|>"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"]))
    cut = tokenize_conversation(loaded.template, pairs, 30)
    assert len(cut["input_ids"]) == 30
    batch = Collator(pad_id=1)([example, cut])
    assert batch["input_ids"].shape == (2, len(example["input_ids"]))
    assert (batch["labels"][1, 30:] == IGNORE_INDEX).all() and batch["attention_mask"][1].sum() == 30


@pytest.mark.integration
def test_real_tokenizer_spans_for_chatml_and_vicuna_templates(default_model):
    from harness.model.loading import model_config
    from harness.model.templates import make_template

    pairs = [("Hi there", "Hello! How can I help?"), ("Name a colour.", "Blue.")]
    for template, expected in ((default_model.template, ["Hello! How can I help?<|im_end|>\n", "Blue.<|im_end|>\n"]),
                               (make_template(model_config("vicuna-7b-v1.3"), default_model.tokenizer),
                                [" Hello! How can I help?</s>", " Blue.</s>"])):
        example = tokenize_conversation(template, pairs, 2048)
        labels = example["labels"]
        runs, current = [], []
        for token, label in zip(example["input_ids"], labels):
            if label != IGNORE_INDEX:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        runs += [current] if current else []
        assert [default_model.tokenizer.decode(run) for run in runs] == expected


def test_medusa_vicuna7b_reproduces_the_team_command(tmp_path):
    cfg = compose_config("train=medusa_vicuna7b", "data_path=/data/sharegpt_vicuna.json",
                         "eval_data_path=/data/sharegpt_vicuna_eval.json", f"output_dir={tmp_path}",
                         config_name="train")
    assert cfg.model.hub_id == "lmsys/vicuna-7b-v1.3"
    assert (cfg.data_path, cfg.eval_data_path) == ("/data/sharegpt_vicuna.json", "/data/sharegpt_vicuna_eval.json")
    assert cfg.model_max_length == 2048 and cfg.lazy_preprocess is True
    assert OmegaConf.to_container(cfg.head) == {"type": "medusa", "medusa_num_heads": 1, "medusa_num_layers": 1,
                                                "own_lm_head": True}
    kwargs = training_kwargs(cfg)
    team = {"num_train_epochs": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
            "gradient_accumulation_steps": 4, "eval_strategy": "steps", "eval_steps": 50, "save_strategy": "steps",
            "save_steps": 400, "save_total_limit": 2, "learning_rate": 1e-4, "weight_decay": 0.0,
            "warmup_steps": 0.05, "lr_scheduler_type": "cosine", "logging_steps": 1, "bf16": True, "tf32": True,
            "output_dir": str(tmp_path), "optim": "adamw_torch"}
    for key, value in team.items():
        assert kwargs[key] == value, key
    assert "evaluation_strategy" not in kwargs and "warmup_ratio" not in kwargs
    args = training_arguments(cfg, report_to_wandb=False)   # the real TrainingArguments (tf32 dropped on CPU)
    for key, value in team.items():
        if key != "tf32" or torch.cuda.is_available():
            assert getattr(args, key) == value, key
    assert args.get_warmup_steps(1000) == 50


def test_training_arguments_refuse_unknown_or_conflicting_names(tmp_path):
    cfg = compose_config("+training.evaluation_strategi=steps", f"output_dir={tmp_path}", config_name="train")
    with pytest.raises(HarnessError, match="training.evaluation_strategi is not a transformers TrainingArguments"):
        training_kwargs(cfg)
    cfg = compose_config("+training.eval_strategy=no", f"output_dir={tmp_path}", config_name="train")
    with pytest.raises(HarnessError, match="evaluation_strategy and training.eval_strategy disagree"):
        training_kwargs(cfg)
    cfg = compose_config("+training.group_by_length=true", "~training.train_sampling_strategy",
                         f"output_dir={tmp_path}", config_name="train")
    assert training_kwargs(cfg)["train_sampling_strategy"] == "group_by_length"   # transformers 4's flag


def test_wandb_follows_the_logger_config(tmp_path):
    assert wandb_enabled(compose_config(config_name="train"))            # offline by default
    assert not wandb_enabled(compose_config("logger=none", config_name="train"))
    cfg = compose_config(f"output_dir={tmp_path}", "+training.use_cpu=true", config_name="train")
    assert training_arguments(cfg, report_to_wandb=True).report_to == ["wandb"]
    assert training_arguments(cfg, report_to_wandb=False).report_to in ([], "none", ["none"])


def test_missing_data_is_one_line(chat_model, toy_data, tmp_path):
    cfg = train_cfg(chat_model, toy_data, tmp_path, "data_path=null")
    with pytest.raises(HarnessError, match="needs data_path"):
        run_train(cfg)
    cfg = train_cfg(chat_model, toy_data, tmp_path, "eval_data_path=null")
    with pytest.raises(HarnessError, match="needs eval_data_path"):
        run_train(cfg)


@pytest.mark.slow
def test_torchrun_runs_the_same_command_on_two_processes(chat_model, toy_data, trained, tmp_path):
    """DDP (gloo on CPU): only the head is wrapped; eval counts every held-out token exactly once."""
    train, held = toy_data
    output_dir = tmp_path / "ddp"
    overrides = [*model_overrides(chat_model)[:-1], "logger=none", f"data_path={train}", f"eval_data_path={held}",
                 f"output_dir={output_dir}", "model_max_length=64", "head.medusa_num_heads=2", "+training.max_steps=4",
                 "training.per_device_train_batch_size=1", "training.per_device_eval_batch_size=1",
                 "training.eval_steps=4", "training.save_steps=4", "+training.disable_tqdm=true",
                 "+training.use_cpu=true", "+training.ddp_backend=gloo", "head.draft_vocab_size=null",
                 "training.bf16=false", "threads=1"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "harness.train", *overrides], cwd=REPO_ROOT, check=True, capture_output=True, timeout=600)
    written = json.loads((output_dir / "topk_accuracy.json").read_text())
    single = trained[1]["eval"]
    assert written["eval_pos1_tokens"] == single["eval_pos1_tokens"] > 0
    assert written["eval_pos2_tokens"] == single["eval_pos2_tokens"]
    cfg = trained[0]
    assert load_head(output_dir, load_model(cfg.model, "cpu")).num_positions == 2


@pytest.mark.parametrize("preset, head_type, positions", [("medusa_smollm2", "medusa", 3),
                                                          ("ours_smollm2", "ours", 4),
                                                          ("ours_no_trigram_smollm2", "ours", 4),
                                                          ("eagle_smollm2", "eagle", 4)])
def test_cpu_presets_train_their_head(chat_model, toy_data, tmp_path, preset, head_type, positions):
    train, held = toy_data
    cfg = compose_config(f"train={preset}", *model_overrides(chat_model)[:-1], "logger=none", f"data_path={train}",
                         f"eval_data_path={held}", f"output_dir={tmp_path}", "+training.max_steps=2",
                         "training.logging_steps=1", "training.eval_steps=2", "training.save_steps=2",
                         "+training.disable_tqdm=true", "head.draft_vocab_size=32",   # the tiny vocabulary: 200
                         "+training.use_cpu=true", config_name="train")
    summary = run_train(cfg)
    head = load_head(tmp_path, load_model(cfg.model, "cpu"))
    assert (head.head_type, head.num_positions) == (head_type, positions)
    assert head.config.get("trigram", True) == (preset != "ours_no_trigram_smollm2")
    assert summary["global_step"] == 2 and f"eval_pos{positions}_top5" in summary["eval"]
    assert head.draft_vocab.numel() == 32     # the presets train a reduced draft vocabulary, in bf16
    logged_names = {key for entry in logged(tmp_path, 2) for key in entry}
    # a head with its own objective (EAGLE) logs its parts; the others their per-position cross-entropies
    assert ({"vloss", "ploss"} if head_type == "eagle" else {f"pos{positions}_loss"}) <= logged_names


def test_feature_cache_trains_like_the_target_in_the_loop(chat_model, toy_data, tmp_path, monkeypatch):
    common = ["training.max_steps=6", "training.save_steps=6", "training.eval_steps=6"]
    on_the_fly = run_train(train_cfg(chat_model, toy_data, tmp_path / "fly", *common))
    cache = tmp_path / "features"
    cached = run_train(train_cfg(chat_model, toy_data, tmp_path / "cached", *common, f"feature_cache={cache}"))
    assert (cache / "index.json").is_file() and json.loads((cache / "source.json").read_text())["conversations"] == 6
    # fp16 features: the same training up to rounding
    assert cached["train_loss"] == pytest.approx(on_the_fly["train_loss"], rel=2e-2)
    # the eval set is cached beside it and scores the head the same, up to the same rounding
    assert json.loads((cache / "eval" / "source.json").read_text())["data_path"] == str(toy_data[1].resolve())
    assert cached["eval"]["eval_loss"] == pytest.approx(on_the_fly["eval"]["eval_loss"], rel=2e-2)
    assert cached["eval"]["eval_pos1_top5"] == pytest.approx(on_the_fly["eval"]["eval_pos1_top5"], abs=0.05)
    from transformers.models.llama.modeling_llama import LlamaModel

    target_runs, forward = [], LlamaModel.forward

    def counted(self, *args, **kwargs):
        target_runs.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", counted)
    again = run_train(train_cfg(chat_model, toy_data, tmp_path / "again", *common, f"feature_cache={cache}"))
    assert again["train_loss"] == pytest.approx(cached["train_loss"], rel=1e-6)      # read back, not rebuilt
    assert not target_runs              # 6 training steps and the eval read cached features: no target forward
    uncached_eval = run_train(train_cfg(chat_model, toy_data, tmp_path / "fly_eval", *common,
                                        f"feature_cache={cache}", "feature_cache_eval=false"))
    assert target_runs and uncached_eval["train_loss"] == pytest.approx(cached["train_loss"], rel=1e-6)
    with pytest.raises(HarnessError, match="holds features of other data"):
        run_train(train_cfg(chat_model, toy_data, tmp_path / "other", *common, f"feature_cache={cache}",
                            "model_max_length=32"))
    # the same path and count, other content (a dataset merged again): other data too
    train_copy = tmp_path / "train_copy.json"
    shutil.copy(toy_data[0], train_copy)
    copied = (train_copy, toy_data[1])
    run_train(train_cfg(chat_model, copied, tmp_path / "copy", "training.max_steps=1", f"feature_cache={tmp_path / 'f2'}",
                        "feature_cache_eval=false"))
    records = json.loads(train_copy.read_text())
    records[0]["conversations"][-1]["value"] += " Done."
    train_copy.write_text(json.dumps(records))
    with pytest.raises(HarnessError, match="holds features of other data"):
        run_train(train_cfg(chat_model, copied, tmp_path / "copy2", "training.max_steps=1",
                            f"feature_cache={tmp_path / 'f2'}", "feature_cache_eval=false"))


def test_clip_grad_value_clamps_gradients_before_the_step():
    from types import SimpleNamespace

    from accelerate import Accelerator

    from harness.train import ClipGradValue

    layer = nn.Linear(4, 4)
    layer.weight.grad = torch.full((4, 4), 3.0)
    layer.bias.grad = torch.tensor([-5.0, 0.1, 0.2, 9.0])
    ClipGradValue(0.5, SimpleNamespace(accelerator=Accelerator(cpu=True), model=layer)).on_pre_optimizer_step(
        None, None, None)
    assert bool((layer.weight.grad == 0.5).all())
    assert layer.bias.grad.tolist() == pytest.approx([-0.5, 0.1, 0.2, 0.5])


@pytest.mark.parametrize("head_type, kwargs, context", [("medusa", {"medusa_num_heads": 3}, 0),
                                                        ("ours", {"num_positions": 4}, 1),
                                                        ("ours", {"num_positions": 4, "trigram": False}, 0)])
def test_cropping_prompt_columns_changes_no_counted_prediction(chat_model, head_type, kwargs, context):
    from harness.heads.base import BaseHandles, build_head

    cfg = compose_config(*model_overrides(chat_model)[:-1], config_name="train")
    loaded = load_model(cfg.model, "cpu")
    torch.manual_seed(0)
    head = build_head(head_type, loaded.model.config, base=BaseHandles.of(loaded.model), **kwargs)
    for parameter in head.parameters():   # an untrained Medusa block is the identity: make every input count
        torch.nn.init.normal_(parameter, std=0.2)
    pairs = [[("tell me about the red car and the blue house in the city please", "one two three")],
             [("why ?", "the cat sat on the mat"), ("and the dog ?", "it sat on the road")]]
    batch = Collator(pad_id=1)([tokenize_conversation(loaded.template, p, 128) for p in pairs])
    full = HeadTrainingModel(head, loaded.model).eval()
    cropped = HeadTrainingModel(head, loaded.model, crop_context=context).eval()
    with torch.no_grad():
        expected, got = full(**batch), cropped(**batch)
        hidden = loaded.model.model(input_ids=batch["input_ids"]).last_hidden_state
        kept = cropped.crop(hidden, batch["input_ids"], batch["labels"])[0].shape[1]
    assert kept < batch["input_ids"].shape[1]          # the first prompt's columns are gone
    torch.testing.assert_close(got["loss"], expected["loss"])
    counts, reference = got["eval_counts"], expected["eval_counts"]
    assert torch.equal(counts[..., [0, 2, 3]], reference[..., [0, 2, 3]])     # counted tokens, top-1 / top-5 hits
    torch.testing.assert_close(counts[..., 1], reference[..., 1], rtol=1e-5, atol=1e-5)   # CE sums (matmul order)


def test_a_head_trained_over_an_int8_base_records_it_and_warns_on_fp32(chat_model, toy_data, tmp_path, caplog):
    cfg = train_cfg(chat_model, toy_data, tmp_path / "int8", "model.quantization=int8", "training.max_steps=4",
                    "training.evaluation_strategy=no", "training.save_strategy=no")
    assert run_train(cfg)["global_step"] == 4
    info = json.loads((tmp_path / "int8" / "head_config.json").read_text())
    assert info["base_quantization"]["quantization"] == "int8"
    head = load_head(tmp_path / "int8", load_model(cfg.model, "cpu"))
    assert {tensor.dtype for tensor in head.state_dict().values()} == {torch.float32}   # the head stays fp32
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_head(tmp_path / "int8", load_model(OmegaConf.merge(cfg.model, {"quantization": "none"}), "cpu"))
    assert "trained over a base with quantization=int8 but runs on quantization=none" in caplog.text


def test_bf16_training_with_a_draft_vocabulary_logs_medusas_step_metrics(chat_model, toy_data, tmp_path):
    cfg = train_cfg(chat_model, toy_data, tmp_path, "training.bf16=true", "head.draft_vocab_size=24")
    summary = run_train(cfg)
    steps = [e for e in logged(tmp_path, 24) if "loss" in e]
    assert len(steps) == 24
    for entry in steps:   # every logging step, under the names Medusa's train.py uses
        assert {f"medusa{i}_top{k}" for i in range(2) for k in range(1, 6)} <= set(entry)
        assert entry["train_tokens_per_s"] > 0
    assert sum(e["loss"] for e in steps[-4:]) < 0.6 * sum(e["loss"] for e in steps[:4])
    assert steps[-1]["medusa0_top5"] >= steps[0]["medusa0_top5"]
    info = json.loads((tmp_path / "head_config.json").read_text())
    assert info["config"]["draft_vocab_size"] == 24
    assert info["training"]["draft_vocab"]["train_coverage"] == 1.0     # the toy answers use < 24 tokens
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["draft_vocab"].dtype == torch.int64 and tensors["draft_vocab"].numel() == 24
    assert {t.dtype for k, t in tensors.items() if k != "draft_vocab"} == {torch.float32}   # fp32 master weights
    loaded = load_model(cfg.model, "cpu")
    tokenizer = loaded.tokenizer
    answer_ids = {i for w in COUNTING.split() for i in tokenizer(w, add_special_tokens=False).input_ids}
    assert answer_ids <= set(tensors["draft_vocab"].tolist())          # the most frequent assistant tokens
    head = load_head(tmp_path, loaded)
    assert head.draft_vocab.tolist() == tensors["draft_vocab"].tolist()
    assert summary["eval"]["eval_pos1_top5"] > 0


def cache_inputs(chat_model, toy_data):
    """The tiny target, its toy training conversations and its identity, for the feature-cache tests."""
    loaded = load_model(OmegaConf.create({"name": "tiny", "path": str(chat_model), "template": "chat_template"}),
                        "cpu")
    return loaded, ConversationDataset(str(toy_data[0]), loaded.template, 64), base_identity(loaded)


def test_feature_cache_continues_after_a_kill(chat_model, toy_data, tmp_path, monkeypatch):
    from harness.data import feature_cache
    from harness.data.feature_cache import FeatureCache, training_examples, write_cache

    loaded, data, identity = cache_inputs(chat_model, toy_data)
    whole = FeatureCache(write_cache(loaded.model, training_examples(data), tmp_path / "whole", identity,
                                     shard_size=2, progress=False))
    calls, real = [], feature_cache.target_features

    def dies_after_three(model, ids, mask=None):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt   # killed during the fourth example: shard 0 (2 examples) is on disk
        return real(model, ids, mask)

    monkeypatch.setattr(feature_cache, "target_features", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        write_cache(loaded.model, training_examples(data), tmp_path / "killed", identity, shard_size=2,
                    progress=False)
    assert (tmp_path / "killed" / "progress.json").is_file() and not (tmp_path / "killed" / "index.json").exists()
    calls.clear()
    monkeypatch.setattr(feature_cache, "target_features", lambda *a: (calls.append(1), real(*a))[1])
    resumed = FeatureCache(write_cache(loaded.model, training_examples(data), tmp_path / "killed", identity,
                                       shard_size=2, progress=False))
    assert len(calls) == 4                              # 6 examples, the first shard's 2 kept
    assert len(resumed) == len(whole) == 6
    for index in range(6):
        assert torch.equal(resumed[index]["hidden"], whole[index]["hidden"])
        assert torch.equal(resumed[index]["input_ids"], whole[index]["input_ids"])
    assert whole.index["dtype"] == "bfloat16"


def test_training_curves_are_drawn_from_the_trainer_state(trained, tmp_path):
    from reports.training_curves import eval_table, frames, plot

    cfg, _ = trained
    train, evals = frames(cfg.output_dir)
    assert len(train) == 24 and list(evals["step"]) == [12, 24]
    written = plot([cfg.output_dir], tmp_path / "curves", ["medusa"])
    assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in written)
    table = eval_table([cfg.output_dir], ["medusa"])
    assert "pos2_top5" in table and table.count("| medusa") == 2


def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_one_before(chat_model, toy_data, tmp_path,
                                                                          monkeypatch):
    """A kill while checkpoint-6 is written (head saved, optimizer not) leaves it in .staging/, never as a
    half checkpoint-6: resume continues from checkpoint-3, to the same weights. A half-written checkpoint-<step>
    from elsewhere (another tool, an older harness) is set aside as incomplete-checkpoint-<step>-<time>."""
    overrides = ["training.max_steps=6", "training.save_steps=3", "training.eval_steps=3"]
    run_train(train_cfg(chat_model, toy_data, tmp_path / "straight", *overrides))
    real, saves = HeadTrainer._save_optimizer_and_scheduler, []

    def killed_in_the_second_save(self, output_dir):
        saves.append(output_dir)
        if len(saves) == 2:
            raise KeyboardInterrupt      # checkpoint-6 has its head files, no optimizer, no trainer_state.json
        return real(self, output_dir)

    monkeypatch.setattr(HeadTrainer, "_save_optimizer_and_scheduler", killed_in_the_second_save)
    with pytest.raises(Stopped, match="stopped at once"):
        run_train(train_cfg(chat_model, toy_data, tmp_path / "killed", *overrides))
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-3"]
    assert (tmp_path / "killed" / ".staging" / "checkpoint-6" / "model.safetensors").is_file()
    monkeypatch.setattr(HeadTrainer, "_save_optimizer_and_scheduler", real)
    # and a half-written checkpoint-6 left by something else: set aside, never resumed from
    half = tmp_path / "killed" / "checkpoint-6"
    shutil.copytree(tmp_path / "killed" / ".staging" / "checkpoint-6", half)
    resumed = run_train(train_cfg(chat_model, toy_data, tmp_path / "killed", *overrides))
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["global_step"] == 6
    assert not (tmp_path / "killed" / ".staging").exists()          # the next save cleared the leftovers
    aside = list((tmp_path / "killed").glob("incomplete-checkpoint-6-*"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").is_file()      # kept, not deleted
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    # a torn trainer_state.json (killed inside its write) is incomplete too
    torn = tmp_path / "killed" / "checkpoint-6" / "trainer_state.json"
    torn.write_text(torn.read_text()[:40])
    assert checkpoint_problem(torn.parent) == "trainer_state.json is torn"


def test_init_head_continues_a_trained_head_with_its_draft_vocabulary(chat_model, toy_data, tmp_path):
    from safetensors.torch import load_file

    common = ["training.bf16=true", "head.draft_vocab_size=24", "training.max_steps=4", "training.save_steps=4",
              "training.eval_steps=4"]
    run_train(train_cfg(chat_model, toy_data, tmp_path / "first", *common))
    first = load_file(str(tmp_path / "first" / "model.safetensors"))
    # learning rate 0: the continued run must hold exactly the weights (and draft vocabulary) it started from
    summary = run_train(train_cfg(chat_model, toy_data, tmp_path / "second", *common, "training.learning_rate=0",
                                  f"init_head={tmp_path / 'first'}"))
    second = load_file(str(tmp_path / "second" / "model.safetensors"))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert summary["global_step"] == 4
    info = json.loads((tmp_path / "second" / "head_config.json").read_text())
    assert info["training"]["init_head"] == str(tmp_path / "first")
    assert info["training"]["draft_vocab"]["from"] == str(tmp_path / "first")
    assert info["training"]["draft_vocab"]["train_coverage"] == 1.0
    with pytest.raises(HarnessError, match="holds a medusa head .* this run trains"):   # another draft vocabulary
        run_train(train_cfg(chat_model, toy_data, tmp_path / "third", "head.draft_vocab_size=32",
                            f"init_head={tmp_path / 'first'}"))
    # the finished run's folder resumed without its init_head: refused (its checkpoints started elsewhere)
    with pytest.raises(HarnessError, match="continues a run started with init_head="):
        run_train(train_cfg(chat_model, toy_data, tmp_path / "second", *common, "training.max_steps=6"))
    with pytest.raises(HarnessError, match="eval_only=true head_path="):
        run_train(train_cfg(chat_model, toy_data, tmp_path / "fourth", "eval_only=true",
                            f"head_path={tmp_path / 'first'}", f"init_head={tmp_path / 'first'}"))
    with pytest.raises(HarnessError):   # no such folder: one line before the model loads
        run_train(train_cfg(chat_model, toy_data, tmp_path / "fifth", f"init_head={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "fifth").exists() or not any((tmp_path / "fifth").glob("checkpoint-*"))


def test_a_stop_while_the_feature_cache_is_written_keeps_every_finished_conversation(chat_model, toy_data,
                                                                                     tmp_path, monkeypatch):
    from harness.data import feature_cache
    from harness.data.feature_cache import FeatureCache, training_examples, write_cache
    from harness.infra.signals import StopRequest

    loaded, data, identity = cache_inputs(chat_model, toy_data)
    whole = FeatureCache(write_cache(loaded.model, training_examples(data), tmp_path / "whole", identity,
                                     shard_size=4, progress=False))
    stop, calls, real = StopRequest(), [], feature_cache.target_features

    def signalled_at_the_third(model, ids, mask=None):
        calls.append(1)
        if len(calls) == 3:
            stop.signum = 15          # SIGTERM during the third conversation: it finishes, then a partial shard
        return real(model, ids, mask)

    monkeypatch.setattr(feature_cache, "target_features", signalled_at_the_third)
    assert write_cache(loaded.model, training_examples(data), tmp_path / "stopped", identity, shard_size=4,
                       progress=False, stop=stop) is None
    assert len(calls) == 3 and not (tmp_path / "stopped" / "index.json").exists()
    calls.clear()
    resumed = FeatureCache(write_cache(loaded.model, training_examples(data), tmp_path / "stopped", identity,
                                       shard_size=4, progress=False))
    assert len(calls) == 3 and len(resumed) == len(whole) == 6        # the three written are not redone
    for index in range(6):
        assert torch.equal(resumed[index]["hidden"], whole[index]["hidden"])


def test_early_stopping_keeps_the_best_evals_head_and_stops_the_schedule(chat_model, toy_data, tmp_path):
    from safetensors.torch import load_file

    # threshold 1e9: no eval counts as an improvement after the first, so patience 1 stops at the second eval
    summary = run_train(train_cfg(chat_model, toy_data, tmp_path, "training.eval_steps=4", "training.save_steps=4",
                                  "early_stopping_patience=1", "early_stopping_threshold=1e9",
                                  "training.save_total_limit=null"))
    assert summary["global_step"] == 8 and summary["early_stopping"]["stopped_early"]
    losses = {entry["step"]: entry["eval_loss"] for entry in logged(tmp_path, 8) if "eval_loss" in entry}
    assert sorted(losses) == [4, 8]
    best = min(losses, key=losses.get)
    assert summary["early_stopping"]["best_step"] == best == summary["eval"]["head_from_step"]
    # the shipped head is the best eval's checkpoint, not the last step's weights
    final = load_file(str(tmp_path / "model.safetensors"))
    kept = load_file(str(tmp_path / f"checkpoint-{best}" / "model.safetensors"))
    assert set(final) == set(kept) and all(torch.equal(final[k], kept[k]) for k in final)
    assert summary["eval"]["eval_loss"] == pytest.approx(losses[best], rel=1e-5)
    info = json.loads((tmp_path / "head_config.json").read_text())
    assert info["training"]["early_stopping_patience"] == 1


def test_early_stopping_counts_evals_without_improvement_across_a_resume(chat_model, toy_data, tmp_path,
                                                                         monkeypatch):
    # patience 2, no eval improves on the first by more than 1e9: evals at 2, 4, 6 -> stops at 6. Killed in step 5,
    # the resumed run must remember the eval at 4 did not improve (a fresh count would run on to step 8)
    overrides = ["training.max_steps=12", "training.eval_steps=2", "training.save_steps=2",
                 "early_stopping_patience=2", "early_stopping_threshold=1e9", "training.save_total_limit=null"]
    straight = run_train(train_cfg(chat_model, toy_data, tmp_path / "straight", *overrides))
    assert straight["global_step"] == 6 and straight["early_stopping"]["stopped_early"]
    real, steps = HeadTrainer.training_step, []

    def killed_in_step_5(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HeadTrainer, "training_step", killed_in_step_5)
    with pytest.raises(Stopped, match="stopped at once"):
        run_train(train_cfg(chat_model, toy_data, tmp_path / "killed", *overrides))
    monkeypatch.setattr(HeadTrainer, "training_step", real)
    resumed = run_train(train_cfg(chat_model, toy_data, tmp_path / "killed", *overrides))
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["global_step"] == 6 and resumed["early_stopping"] == straight["early_stopping"]


@pytest.mark.parametrize("overrides, message", [
    (["training.eval_steps=4", "training.save_steps=8"], "save_steps equal to training.eval_steps"),
    (["training.evaluation_strategy=no"], "early_stopping_patience needs evals"),
    (["early_stopping_patience=0"], "must be a whole number >= 1"),
])
def test_early_stopping_refuses_a_schedule_without_checkpoints_to_keep(chat_model, toy_data, tmp_path, overrides,
                                                                       message):
    patience = [] if any(o.startswith("early_stopping_patience") for o in overrides) else ["early_stopping_patience=2"]
    with pytest.raises(HarnessError, match=message):
        run_train(train_cfg(chat_model, toy_data, tmp_path, *patience, *overrides))
    assert not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.parametrize("folder, message", [
    ("mydata", "set VERSION=<name>"),                                   # no dataset_<version> to name the heads by
    ("dataset_vx", "merge the dataset with eval_fraction > 0 first"),   # no train / eval split
])
def test_retrain_script_refuses_a_dataset_before_any_work(tmp_path, folder, message):
    (tmp_path / folder).mkdir()
    script = REPO_ROOT / "scripts" / "retrain_smollm2_heads.sh"
    result = subprocess.run(["bash", str(script), folder, "ours"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (REPO_ROOT / "runs" / "train" / "ours_vx").exists()
