"""`specdec-train`: train a draft head (Medusa, ours) on a frozen target with transformers' Trainer.

    specdec-train train=medusa_smollm2 data_path=D.train.json eval_data_path=D.eval.json
    specdec-train train=ours_smollm2 ... resume=true                      # continue from the last checkpoint
    specdec-train eval_only=true head_path=runs/train/x eval_data_path=E  # top-k accuracy of a trained head,
                                                   # written to <output_dir>/eval/<head folder>/ (never into it)
    torchrun --nproc_per_node=4 -m harness.train train=medusa_vicuna7b data_path=D eval_data_path=E output_dir=O
    accelerate launch -m harness.train train=medusa_vicuna7b ...          # same code: Trainer does DDP

The team's Medusa command maps one to one (conf/train/medusa_vicuna7b.yaml holds it):
    --model_name_or_path                      -> model=<conf/model name> (model.path=/local/copy)
    --data_path --eval_data_path --output_dir --model_max_length --lazy_preprocess -> the same names
    --medusa_num_heads --medusa_num_layers    -> head.medusa_num_heads head.medusa_num_layers
    any other --name value                    -> training.name=value (transformers TrainingArguments)
transformers 5 renamed some of them: evaluation_strategy -> eval_strategy, warmup_ratio -> warmup_steps (a float
below 1 is a ratio of the total steps), group_by_length -> train_sampling_strategy=group_by_length; the old
names are accepted and mapped. tf32 is a CUDA-only
switch and is dropped on machines without CUDA; bf16 there runs on the CPU (use_cpu).

What runs: the target is loaded frozen on the Trainer's device (its rank's GPU under torchrun) and kept
OUT of the module Trainer optimises, so DDP wraps, broadcasts and syncs only the head and checkpoints
hold only the head. Each batch's target hidden states are computed under no_grad, then
`head.training_logits(hidden, input_ids, base)` gives logits [K, B, T, V], position k predicting
token t + k + 2 (Medusa-1).

Loss (Medusa-1): L = sum_k decay**k * CE_k, CE_k the mean cross-entropy of position k over the assistant
tokens of the batch. FasterDecoding/Medusa's medusa/train/train.py and train_legacy.py sum the heads'
losses unweighted (decay = 1.0, our presets); the Medusa paper weights head k by 0.8**k (loss.decay=0.8).
A head with its own objective defines `training_loss(hidden, input_ids, loss_mask, base) -> (loss, logits)`
(EAGLE: feature regression + cross-entropy); its `last_losses` are logged.

`feature_cache=<folder>` writes the target's features for the training set once (harness.data.feature_cache)
and reads them every epoch instead of running the target in each step (eval stays on the fly);
`clip_grad_value=v` clamps gradients before each optimizer step (EAGLE-1).

Checkpoints (`checkpoint-<step>/` and the final `output_dir/`) are harness.heads.base.save_head folders:
model.safetensors (head only) + head_config.json (base-model identity, head config, training settings,
the last eval's top-k accuracy) + topk_accuracy.json; the final `output_dir` is what `method.head_path=`
loads. Trainer adds its optimizer / scheduler / RNG state to the checkpoints for `resume=true`.

Eval: loss and teacher-forced top-1 / top-5 accuracy per head position (harness.heads.base.topk_accuracy,
summed over the whole eval set), logged as eval/pos{k}_top{j} (W&B) / eval_pos{k}_top{j} (Trainer logs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from harness.infra.app import hydra_app
from harness.infra.errors import HarnessError
from harness.infra.settings import TRAIN, check_settings
from harness.heads.base import BaseHandles, DraftHead, build_head, head_class, topk_accuracy
from harness.heads.checkpoint import WEIGHTS_FILE, base_identity, check_base, load_head, read_head_config, save_head
from harness.infra.locks import hold
from harness.infra.signals import Stopped, graceful_stop, resume_command
from harness.model.loading import load_model
from harness.model.quantization import quantization_signature
from harness.infra.store import git_commit, write_json
from harness.infra.tracking import Tracker, head_artifact
from harness.data.token_data import TokenDataset, is_token_dataset
from harness.data.examples import IGNORE_INDEX, Collator, ConversationDataset

log = logging.getLogger(__name__)

TOPK_FILE = "topk_accuracy.json"
# the team's (transformers 4) names -> transformers 5 TrainingArguments names
RENAMED = {"evaluation_strategy": "eval_strategy", "warmup_ratio": "warmup_steps"}


# ----------------------------------------------------------------------------------------------------- arguments

def training_kwargs(cfg: DictConfig) -> dict:
    """`training:` + output_dir -> TrainingArguments keyword arguments (renamed keys mapped, unknown refused)."""
    kwargs = OmegaConf.to_container(cfg.training, resolve=True) if cfg.get("training") else {}
    for old, new in RENAMED.items():
        if old in kwargs:
            if new in kwargs and kwargs[new] != kwargs[old]:
                raise HarnessError(f"training.{old} and training.{new} disagree; set only one of them")
            kwargs[new] = kwargs.pop(old)
    if "group_by_length" in kwargs:   # transformers 4's flag -> transformers 5's sampling strategy
        if kwargs.pop("group_by_length"):
            kwargs.setdefault("train_sampling_strategy", "group_by_length")
    if "warmup_steps" in kwargs and isinstance(kwargs["warmup_steps"], float) and kwargs["warmup_steps"] >= 1:
        raise HarnessError("training.warmup_ratio must be below 1 (it becomes transformers 5's warmup_steps ratio)")
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise HarnessError(f"training.{unknown[0]} is not a transformers TrainingArguments field; fix or remove "
                           f"{', '.join('training.' + u for u in unknown)}")
    kwargs["output_dir"] = str(cfg.output_dir)
    kwargs["label_names"] = ["labels"]          # Trainer then computes an eval loss and calls compute_metrics
    kwargs["remove_unused_columns"] = False
    return kwargs


def wandb_enabled(cfg: DictConfig) -> bool:
    settings = (cfg.get("logger") or {}).get("wandb") or {}
    return settings.get("mode", "offline") != "disabled"


def training_arguments(cfg: DictConfig, report_to_wandb: bool) -> TrainingArguments:
    """TrainingArguments for this machine: the only device-dependent choices are CUDA-only switches."""
    kwargs = training_kwargs(cfg)
    if not torch.cuda.is_available():
        if kwargs.pop("tf32", None):
            log.info("training.tf32 ignored: no CUDA device")
        if kwargs.get("bf16"):
            kwargs["use_cpu"] = True
        kwargs.setdefault("dataloader_pin_memory", False)   # pinning needs an accelerator
    kwargs["report_to"] = ["wandb"] if report_to_wandb else "none"
    if cfg.get("early_stopping_patience") is not None:
        early_stopping_arguments(cfg, kwargs)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as exc:
        raise HarnessError(f"transformers refused the training arguments: {str(exc).splitlines()[0]}") from exc


def early_stopping_arguments(cfg: DictConfig, kwargs: dict) -> None:
    """`early_stopping_patience=N`: Trainer keeps the checkpoint of the lowest eval_loss and loads it at the end
    (load_best_model_at_end), so every eval must have a checkpoint to come back to. Refused in one line, naming
    the fix, when the schedule cannot give one."""
    patience = int(cfg.early_stopping_patience)
    if patience < 1:
        raise HarnessError(f"early_stopping_patience={cfg.early_stopping_patience} must be a whole number >= 1 "
                           "(or null: no early stopping)")
    if not cfg.eval_data_path or kwargs.get("eval_strategy", "no") == "no":
        raise HarnessError("early_stopping_patience needs evals: set eval_data_path=<held-out data> and "
                           "training.evaluation_strategy=steps")
    if kwargs.get("save_strategy", "steps") != kwargs["eval_strategy"]:
        raise HarnessError(f"early_stopping_patience needs training.save_strategy={kwargs['eval_strategy']} "
                           f"(the eval strategy; now {kwargs.get('save_strategy')})")
    if kwargs["eval_strategy"] == "steps":
        # equal, not a multiple: an eval without its own checkpoint could be the best one, and the head kept
        # would then be an older checkpoint's
        save, every = kwargs.get("save_steps", 500), kwargs.get("eval_steps") or kwargs.get("logging_steps", 500)
        if save != every:
            raise HarnessError(f"early_stopping_patience needs training.save_steps equal to training.eval_steps "
                               f"(now {save} and {every}): set training.save_steps={every}")
    kwargs.setdefault("load_best_model_at_end", True)
    kwargs.setdefault("metric_for_best_model", "eval_loss")   # transformers: lower is better for "*loss" names
    # a resumed run keeps its count of evals without improvement (EarlyStoppingCallback's state in the checkpoint)
    kwargs.setdefault("restore_callback_states_from_checkpoint", True)
    if not kwargs["load_best_model_at_end"]:
        raise HarnessError("early_stopping_patience keeps the best eval's head: drop training.load_best_model_at_end"
                           "=false (or early_stopping_patience)")


# ----------------------------------------------------------------------------------------------------- model

class HeadTrainingModel(nn.Module):
    """What Trainer optimises: the head. The frozen target is held in plain attributes (not a submodule), so
    Trainer/DDP never wrap, move, broadcast or save it; it only provides hidden states under no_grad."""

    def __init__(self, head: DraftHead, target: nn.Module, loss_decay: float = 1.0, ks: tuple[int, ...] = (1, 5),
                 crop_context: int | None = None):
        super().__init__()
        self.head = head
        # a dataclass: not registered as a submodule; a reduced draft vocabulary gives reduced logits here
        self.base = BaseHandles.for_head(target, head, scatter=False)
        self.frozen = (getattr(target, target.base_model_prefix),)   # a tuple: not registered either
        self.loss_decay, self.ks = float(loss_decay), tuple(ks)
        self.crop_context = crop_context

    def crop(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
        """Drop the columns no counted prediction needs: before the earliest origin whose target (t + k + 2, any
        k < K) is an assistant token, less the `crop_context` earlier tokens the head reads, and after the last
        assistant token. Exact for heads whose logits at t read no further back (Medusa: 0, ours: 1); a prompt
        of 700 tokens before a 150-token answer no longer costs 850 vocabulary projections per head."""
        valid = labels != IGNORE_INDEX
        if self.crop_context is None or not bool(valid.any()):
            return hidden, input_ids, labels
        columns = valid.any(dim=0).nonzero().flatten()
        start = max(0, int(columns[0]) - self.head.num_positions - 1 - int(self.crop_context))
        end = int(columns[-1]) + 1
        return hidden[:, start:end], input_ids[:, start:end], labels[:, start:end]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> dict:
        """hidden: the target's features from a feature cache (then the target does not run)."""
        if hidden is None:
            with torch.no_grad():
                hidden = self.frozen[0](input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state           # [B, T, H]
        hidden = hidden.to(next(self.head.parameters()).dtype)
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX) if attention_mask is not None \
                else input_ids
        hidden, input_ids, labels = self.crop(hidden, input_ids, labels)
        # the ids the logits index: draft-vocabulary indices when it is reduced (-1 outside it: never a hit,
        # left out of the cross-entropy, still counted as a miss in the accuracies)
        draft_ids = self.base.lm_head.to_draft_ids(input_ids) if self.head.draft_vocab is not None else input_ids
        custom = getattr(self.head, "training_loss", None)
        if custom is not None:      # a head with its own objective (EAGLE: feature regression + CE)
            loss, logits = custom(hidden, input_ids, labels != IGNORE_INDEX, self.base)
            logs = {name: float(value) for name, value in (getattr(self.head, "last_losses", None) or {}).items()}
            ce_sums = None
        else:
            logits = self.head.training_logits(hidden, input_ids, self.base)                # [K, B, T, V]
            draft_labels = draft_ids.masked_fill((labels == IGNORE_INDEX) | (draft_ids < 0), IGNORE_INDEX)
            loss, position_loss, ce_sums = self.medusa_loss(logits, draft_labels)
            logs = {f"pos{k + 1}_loss": value for k, value in enumerate(position_loss.tolist())}
        out = {"loss": loss, "logs": logs, "tokens": int((labels != IGNORE_INDEX).sum())}
        if self.training:
            if logits is not None:
                logs.update(self.step_topk(logits.detach(), draft_ids, labels != IGNORE_INDEX))
            else:   # a head that projects only its loss rows reports its own (EAGLE)
                logs.update(getattr(self.head, "last_topk", None) or {})
        else:
            out["eval_counts"] = self.eval_counts(logits.detach(), draft_ids, labels, ce_sums)
        return out

    @staticmethod
    def step_topk(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, top: int = 5) -> dict[str, float]:
        """Medusa's train.py logs, every logging step: medusa{i}_top{k} = share of this batch's assistant tokens
        t + i + 2 in head position i's top-k (i from 0, as Medusa names its heads)."""
        accuracy = topk_accuracy(logits, ids, mask, tuple(range(1, top + 1)))
        out = {}
        for key, value in accuracy.items():
            found = re.fullmatch(r"pos(\d+)_top(\d+)", key)
            if found and not math.isnan(value):
                out[f"medusa{int(found[1]) - 1}_top{found[2]}"] = value
        return out

    def medusa_loss(self, logits: torch.Tensor, labels: torch.Tensor):
        """sum_k decay**k * (mean CE of position k over assistant tokens); per-position losses [K] and per-example
        CE sums [B, K] for the eval metrics."""
        num_positions, batch, length, vocab = logits.shape
        losses, ce_sums = [], []
        for k in range(num_positions):
            shift = k + 2
            if length <= shift:
                losses.append(logits[k].sum() * 0.0)            # keeps the graph whole for DDP
                ce_sums.append(torch.zeros(batch, device=logits.device))
                continue
            target = labels[:, shift:]                                              # [B, T - shift]
            ce = F.cross_entropy(logits[k, :, : length - shift].reshape(-1, vocab).float(), target.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(batch, length - shift)
            losses.append(ce.sum() / (target != IGNORE_INDEX).sum().clamp(min=1))
            ce_sums.append(ce.detach().sum(dim=1))
        position_loss = torch.stack(losses)                                         # [K]
        weights = self.loss_decay ** torch.arange(num_positions, device=logits.device, dtype=position_loss.dtype)
        return (weights * position_loss).sum(), position_loss.detach(), torch.stack(ce_sums, 1)

    def eval_counts(self, logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                    ce_sums: torch.Tensor | None) -> torch.Tensor:
        """input_ids: the ids the logits index (draft-vocabulary indices, -1 outside it, when reduced)."""
        """Per example [B, K, 2 + len(ks)]: counted tokens, summed CE, top-j hits. Per example (not per batch)
        so Trainer's gather drops the padding examples of the last distributed batch correctly."""
        num_positions, batch, length, vocab = logits.shape
        mask = labels != IGNORE_INDEX
        if ce_sums is None:   # a head with its own loss: the cross-entropy of its logits, for the metric only
            ce_sums = torch.zeros(batch, num_positions, device=logits.device)
            for k in range(num_positions):
                if length > k + 2:
                    target = input_ids[:, k + 2:].masked_fill((labels[:, k + 2:] == IGNORE_INDEX)
                                                              | (input_ids[:, k + 2:] < 0), IGNORE_INDEX)
                    ce = F.cross_entropy(logits[k, :, : length - k - 2].reshape(-1, vocab).float(),
                                         target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
                    ce_sums[:, k] = ce.view(batch, -1).sum(dim=1)
        counts = torch.zeros(batch, num_positions, 2 + len(self.ks), dtype=torch.float64)
        for b in range(batch):
            accuracy = topk_accuracy(logits[:, b: b + 1], input_ids[b: b + 1], mask[b: b + 1], self.ks)
            for k in range(num_positions):
                tokens = int(mask[b, k + 2:].sum()) if length > k + 2 else 0
                counts[b, k, 0] = tokens
                counts[b, k, 1] = float(ce_sums[b, k])
                for j, top in enumerate(self.ks):
                    value = accuracy[f"pos{k + 1}_top{top}"]
                    counts[b, k, 2 + j] = 0.0 if math.isnan(value) else round(value * tokens)
        return counts.to(logits.device)


def metrics_from_counts(counts: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Summed per-example counts [N, K, 2 + len(ks)] -> {pos{k}_top{j}, pos{k}_loss, pos{k}_tokens}."""
    total = np.asarray(counts, dtype=np.float64).reshape(-1, *np.shape(counts)[-2:]).sum(axis=0)
    metrics = {}
    for k, row in enumerate(total):
        tokens = row[0]
        for j, top in enumerate(ks):
            metrics[f"pos{k + 1}_top{top}"] = float(row[2 + j] / tokens) if tokens else float("nan")
        metrics[f"pos{k + 1}_loss"] = float(row[1] / tokens) if tokens else float("nan")
        metrics[f"pos{k + 1}_tokens"] = int(tokens)
    return metrics


# ----------------------------------------------------------------------------------------------------- trainer

def load_head_weights(head: DraftHead, folder: str | Path, identity: dict,
                      fix: str = "use another output_dir or resume=false") -> None:
    """Load a checkpoint folder's weights into `head` (kept in its training dtype); refuse another head/base."""
    from safetensors.torch import load_file

    info = read_head_config(folder)
    check_base(info.get("base") or {}, identity, folder)
    wanted = json.loads(json.dumps(head.config))
    if head_class(info["head_type"]) is not type(head) or info["config"] != wanted:   # an alias names the same class
        raise HarnessError(f"checkpoint {folder} holds a {info['head_type']} head {info['config']}, this run trains "
                           f"a {head.head_type} head {wanted}; {fix}")
    head.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))


STAGING = ".staging"     # where a checkpoint is written before it is renamed into place


class HeadTrainer(Trainer):
    """Trainer whose checkpoints are head folders (save_head) and whose eval adds top-k accuracy."""

    def __init__(self, *args, identity: dict, run_info: dict, base_quantization: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.identity, self.run_info, self.base_quantization = identity, run_info, base_quantization
        self.last_eval: dict | None = None
        self._loss_sums: dict[str, float] = {}      # per-position (or the head's own) losses since the last log
        self._loss_batches = 0
        self._tokens, self._since = 0, time.perf_counter()   # assistant tokens trained on since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            for name, value in outputs["logs"].items():
                self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value
            self._loss_batches += 1
            self._tokens += outputs["tokens"]
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_batches:   # this rank's means (rank 0 logs)
            logs.update({name: total / self._loss_batches for name, total in self._loss_sums.items()})
            now = time.perf_counter()
            logs["train_tokens_per_s"] = self._tokens / max(now - self._since, 1e-9)   # assistant tokens, this rank
            self._loss_sums, self._loss_batches, self._tokens, self._since = {}, 0, 0, now
        super().log(logs, start_time)
        if int(os.environ.get("RANK", "0")) == 0:   # job logs (SLURM, Hydra's <app>.log) carry the numbers too
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in logs.items()
                     if not re.fullmatch(r"medusa\d+_top[2-4]", k)}
            log.info("step %d: %s", self.state.global_step, json.dumps(shown))

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and dataset is not None:
            # lengths from the dataset's index where it has one: no pass over the data (a feature cache would
            # read every file); else one pass, as Trainer's own sampler makes
            lengths = dataset.lengths() if hasattr(dataset, "lengths") else \
                [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
            return EpochSeededLengthSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            lengths, self.args.data_seed if self.args.data_seed is not None
                                            else self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        counts = outputs["eval_counts"]
        # returned as "labels" too: Trainer calls compute_metrics only when labels were gathered
        return loss.detach(), counts, counts

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        self.last_eval = {"step": self.state.global_step, **metrics}
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        head = self.accelerator.unwrap_model(self.model).head
        save_head(head, folder, self.identity, {"training": self.run_info, "topk_accuracy": self.last_eval,
                                                "base_quantization": self.base_quantization})
        if self.last_eval is not None:
            write_json(folder / TOPK_FILE, self.last_eval)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written whole into `<output_dir>/.staging/` and then renamed into place: a kill
        mid-write leaves a staging folder (cleared by the next save), never a half-written `checkpoint-<step>`.
        Rotation (save_total_limit) runs on the real checkpoints after the rename."""
        import shutil

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        staging = run_dir / STAGING
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)     # a killed save's leftovers
        self.accelerator.wait_for_everyone()               # no rank still writes into the staging folder
        output_dir = self.args.output_dir
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = output_dir
        self.accelerator.wait_for_everyone()               # every rank's files (rng_state_<k>.pth) are written
        if self.args.should_save:
            final = run_dir / name
            if final.exists():        # the same step saved again (a resumed run): the new one replaces it
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staging:     # the parent wrote the staging path: point at the real one
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(final / "trainer_state.json"))
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_head_weights(model.head, resume_from_checkpoint, self.identity)

    def _load_best_model(self) -> None:
        load_head_weights(self.accelerator.unwrap_model(self.model).head, self.state.best_model_checkpoint,
                          self.identity)


def _length_grouped_sampler():
    from transformers.trainer_pt_utils import LengthGroupedSampler

    return LengthGroupedSampler


class EpochSeededLengthSampler(_length_grouped_sampler()):
    """Trainer's length-grouped order (similar lengths per batch), drawn from a generator seeded with (seed,
    epoch): a run resumed in the middle of an epoch sees the batches the uninterrupted run saw (the stock sampler
    draws from the global RNG, which a resume has reset, so the rest of that epoch came in another order).
    accelerate calls set_epoch before each epoch, the resumed one included."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + int(epoch))


class ClipGradValue(TrainerCallback):
    """`clip_grad_value`: clamp every gradient element to [-v, v] before the optimizer step (EAGLE-1's
    clip_grad_value_), after Trainer's own norm clip (max_grad_norm; 0 disables it)."""

    def __init__(self, value: float, trainer: Trainer):
        self.value, self.trainer = float(value), trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.accelerator.clip_grad_value_(self.trainer.model.parameters(), self.value)


class BatchCollator:
    """Token batches (right padding); with cached target features ("hidden") they are padded the same way."""

    def __init__(self, pad_id: int):
        self.tokens = Collator(pad_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if "hidden" in examples[0]:
            from harness.data.feature_cache import FeatureCollator

            return FeatureCollator(self.tokens)(examples)
        return self.tokens(examples)


def cached_training_set(cfg: DictConfig, loaded, identity: dict, data: ConversationDataset,
                        args: TrainingArguments, stop=None, split: str = "train"):
    """`feature_cache=<folder>`: the target's features for the training set (`split="train"`: the folder itself)
    or the eval set (`split="eval"`: `<folder>/eval`, with `feature_cache_eval`), written once (rank 0, one
    conversation at a time) and read every epoch / every eval instead of running the target in each step."""
    from harness.data.feature_cache import INDEX_FILE, CachedTrainingSet, FeatureCache, training_examples, write_cache
    from harness.data.token_data import sha256_of

    folder = Path(cfg.feature_cache) / ("eval" if split == "eval" else "")
    path = cfg.eval_data_path if split == "eval" else cfg.data_path
    data_file = Path(path).expanduser().resolve()
    # the content's hash too: a dataset merged again at the same path with as many conversations is other data
    source = {"data_path": str(data_file), "sha256": sha256_of(data_file) if data_file.is_file() else None,
              "model_max_length": int(cfg.model_max_length), "template": loaded.template.name,
              "conversations": len(data), "base_quantization": loaded.quantization,
              "dtype": "bfloat16" if loaded.dtype == torch.bfloat16 else "float16"}
    with args.main_process_first(local=False, desc=f"feature cache ({split})"):
        if args.process_index == 0 and not (folder / INDEX_FILE).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            previous = folder / "source.json"
            if previous.is_file() and json.loads(previous.read_text()) != json.loads(json.dumps(source)):
                (folder / "progress.json").unlink(missing_ok=True)    # another dataset's partial cache: start over
            write_json(previous, source)      # before the index: an unfinished cache is continued or rebuilt
            log.info("writing target features for %d %s conversations to %s (once)", len(data), split, folder)
            written = write_cache(loaded.model, training_examples(data, IGNORE_INDEX), folder, identity,
                                  progress=True, total=len(data), dtype=source["dtype"], stop=stop)
            if written is None:
                done = len(json.loads((folder / "progress.json").read_text())["entries"])
                raise Stopped(f"stopped by {stop.name} while writing the feature cache: {done} of {len(data)} "
                              f"{split} conversations kept in {folder}; continue with: "
                              f"{resume_command('train', cfg.output_dir, 'output_dir')}", stop.signum)
    saved = json.loads((folder / "source.json").read_text()) if (folder / "source.json").is_file() else None
    if saved != source:
        raise HarnessError(f"feature_cache {folder} holds features of other data ({saved}); delete it or point "
                           "feature_cache at another folder")
    return CachedTrainingSet(FeatureCache(folder, identity), IGNORE_INDEX)


def label_token_counts(dataset) -> np.ndarray:
    """How often each token id is an assistant (labelled) token of `dataset`."""
    counts = np.zeros(0, dtype=np.int64)
    for index in range(len(dataset)):
        example = dataset[index]
        ids = np.asarray(example["input_ids"], dtype=np.int64)
        kept = ids[np.asarray(example["labels"]) != IGNORE_INDEX]
        found = np.bincount(kept)
        if found.size > counts.size:
            counts = np.pad(counts, (0, found.size - counts.size))
        counts[: found.size] += found
    return counts


def choose_draft_vocab(head: DraftHead, train_data, eval_data) -> dict:
    """The head's reduced draft vocabulary: the most frequent assistant tokens of the training data (FR-Spec,
    EAGLE-3); ties to the lower id. Returns its coverage of the training (and eval) assistant tokens."""
    size = int(head.draft_vocab.numel())
    counts = label_token_counts(train_data)
    vocab = int(head.config["vocab_size"])
    counts = np.pad(counts, (0, max(0, vocab - counts.size)))[:vocab]
    order = np.lexsort((np.arange(vocab), -counts))[:size]
    head.set_draft_vocab(size, np.sort(order).tolist())
    return draft_vocab_coverage(head, train_data, eval_data, counts)


def draft_vocab_coverage(head: DraftHead, train_data, eval_data, counts: np.ndarray | None = None) -> dict:
    """How much of the training (and eval) assistant tokens the head's draft vocabulary covers."""
    vocab = int(head.config["vocab_size"])
    ids = head.draft_vocab.cpu().numpy()
    if counts is None:
        counts = label_token_counts(train_data)
    counts = np.pad(counts, (0, max(0, vocab - counts.size)))[:vocab]
    info = {"size": int(ids.size), "train_coverage": float(counts[ids].sum() / max(counts.sum(), 1))}
    if eval_data is not None:
        held = np.pad(label_token_counts(eval_data), (0, vocab))[:vocab]
        info["eval_coverage"] = float(held[ids].sum() / max(held.sum(), 1))
    log.info("draft vocabulary: the %d most frequent assistant tokens cover %.2f %% of the training tokens%s", ids.size,
             100 * info["train_coverage"],
             f" and {100 * info['eval_coverage']:.2f} % of the eval tokens" if "eval_coverage" in info else "")
    return info


# ----------------------------------------------------------------------------------------------------- runs

CHECKPOINT_FILES = (WEIGHTS_FILE, "head_config.json", "trainer_state.json")   # + optimizer/scheduler unless save_only_model
STATE_FILES = ("optimizer.pt", "scheduler.pt")


def checkpoint_problem(folder: Path, model_only: bool = False) -> str | None:
    """Why `folder` cannot be resumed from (None: it is complete). Trainer writes a checkpoint's files in
    order (head, optimizer, scheduler, RNG, trainer_state.json last), so a kill mid-write leaves a folder
    without a readable trainer_state.json, or without the files before it."""
    for name in CHECKPOINT_FILES + (() if model_only else STATE_FILES):
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    for name in ("trainer_state.json", "head_config.json"):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return f"{name} is torn"
    return None


def last_checkpoint(output_dir: str | Path, model_only: bool = False) -> str | None:
    """The newest COMPLETE `checkpoint-<step>` in output_dir. A newer incomplete one (a kill during its write)
    is renamed `incomplete-checkpoint-<step>-<time>` (kept, never deleted; out of Trainer's rotation) and
    the one before it is tried."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                   if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())
    for _, folder in reversed(steps):
        problem = checkpoint_problem(folder, model_only)
        if problem is None:
            return str(folder)
        aside = folder.with_name(f"incomplete-{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        log.warning("%s is incomplete (%s: killed while it was written?); moved to %s, trying the one before",
                    folder, problem, aside.name)
    return None


def run_train(cfg: DictConfig) -> dict:
    """Train (or with eval_only, evaluate) a head; returns the summary. Raises HarnessError on bad input."""
    check_settings(cfg, TRAIN)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.eval_only:
        if not cfg.head_path or not cfg.eval_data_path:
            raise HarnessError("eval_only=true needs head_path=<trained head folder> and eval_data_path=<ShareGPT>")
        cfg = cfg.copy()
        # its own folder under output_dir, never the head's: a shipped head's topk_accuracy.json stays as shipped
        cfg.output_dir = str(Path(cfg.output_dir or "runs/train") / "eval" / Path(str(cfg.head_path)).name)
    elif not cfg.data_path:
        raise HarnessError("specdec-train needs data_path=<ShareGPT .json/.jsonl> (specdec-distill writes one)")
    if cfg.get("init_head"):
        if cfg.eval_only:
            raise HarnessError("init_head= starts a training run; to score a head use eval_only=true head_path=<folder>")
        read_head_config(cfg.init_head)     # a missing or foreign folder: refused before the model loads
    if not cfg.output_dir:
        raise HarnessError("set output_dir=<folder> (checkpoints and the final head go there)")
    main_process = int(os.environ.get("RANK", "0")) == 0
    job_type = "eval" if cfg.eval_only else "train"
    # one writer per output folder, held by rank 0 for the whole job: a second job into it is refused here,
    # before the model loads
    locked = main_process
    with hold(cfg.output_dir, "output_dir") if locked else nullcontext(), graceful_stop("this step") as stop:
        tracker = Tracker(None)
        if main_process and wandb_enabled(cfg):
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            tracker = Tracker.start(cfg, Path(cfg.output_dir), job_type,
                                    [cfg.model.name, str(cfg.head.type) if cfg.get("head") else "head", cfg.name])
        args = training_arguments(cfg, report_to_wandb=tracker.run is not None)
        failed = True
        try:
            try:
                summary = _run(cfg, args, stop)
            except KeyboardInterrupt:   # a second signal: back to the last complete checkpoint
                raise Stopped(f"stopped at once by {stop.name}; the last complete checkpoint in {cfg.output_dir} is kept: "
                              f"continue with: {resume_command('train', cfg.output_dir, 'output_dir')}",
                              stop.signum or 2) from None
            tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            if cfg.data_path:              # lineage: the dataset artifact specdec-distill merge=true logged
                from harness.distill import dataset_artifact

                name, files = dataset_artifact(cfg.data_path)
                tracker.artifact(name, "dataset", files, use=True)
            if cfg.get("init_head"):       # the head it continued, as an input
                name, files = head_artifact(cfg.model.name, cfg.init_head)
                tracker.artifact(name, "head", files, use=True)
            if not cfg.eval_only:          # the head as a W&B artifact: the bench runs that use it link back here
                name, files = head_artifact(cfg.model.name, cfg.output_dir)
                tracker.artifact(name, "head", files, metadata={"global_step": summary.get("global_step")})
            failed = False
            return summary
        finally:
            tracker.finish(failed=failed)


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGINT (harness.infra.signals): finish the step in flight, save a checkpoint, stop training."""

    def __init__(self, stop):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.stop.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank stops at the same step (one rank stopping alone would hang the others' all-reduce)
            flag = torch.tensor([int(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            control.should_save = True
            control.should_training_stop = True
        return control


def _run(cfg: DictConfig, args: TrainingArguments, stop=None) -> dict:
    from transformers import set_seed

    set_seed(args.seed)
    eval_wanted = args.eval_strategy != "no" or cfg.eval_only
    if eval_wanted and not cfg.eval_data_path:
        raise HarnessError(f"training.eval_strategy={args.eval_strategy} needs eval_data_path=<held-out ShareGPT>; "
                           "set it or training.evaluation_strategy=no")
    # the target in the precision Trainer's autocast expects; fp32 otherwise (exact on CPU)
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    loaded = load_model(cfg.model, str(args.device), dtype)
    identity = base_identity(loaded, cfg.model)
    ks = tuple(int(k) for k in cfg.topk)
    template, lazy, max_length = loaded.template, bool(cfg.lazy_preprocess), int(cfg.model_max_length)

    def dataset(path):
        """A distilled parquet file (token ids as generated) or ShareGPT text (tokenised with the template)."""
        return TokenDataset(path, max_length) if is_token_dataset(path) else \
            ConversationDataset(path, template, max_length, lazy)

    train_data = None if cfg.eval_only else dataset(cfg.data_path)
    eval_data = dataset(cfg.eval_data_path) if cfg.eval_data_path else None
    vocab_info = None
    if cfg.eval_only:
        head = load_head(cfg.head_path, loaded)
    else:
        head_cfg = OmegaConf.to_container(cfg.head, resolve=True)
        head = build_head(head_cfg.pop("type"), loaded.model.config, base=BaseHandles.of(loaded.model), **head_cfg)
        if cfg.get("init_head"):
            # warm start: a trained head's weights and draft vocabulary (same type, config and base), then
            # training continues on data_path under this run's schedule (a checkpoint to resume from wins)
            load_head_weights(head, cfg.init_head, identity, fix="init_head needs the preset's head settings")
            log.info("starting from the weights of %s", cfg.init_head)
            if head.draft_vocab is not None:
                vocab_info = {**draft_vocab_coverage(head, train_data, eval_data), "from": str(cfg.init_head)}
        elif head.draft_vocab is not None:
            vocab_info = choose_draft_vocab(head, train_data, eval_data)
        head = head.to(device=loaded.device, dtype=torch.float32).train()   # fp32 master weights (autocast: bf16)
    crop = cfg.get("crop_context")
    model = HeadTrainingModel(head, loaded.model, float(cfg.loss.decay), ks, None if crop is None else int(crop))
    if train_data is not None and cfg.get("feature_cache"):
        train_data = cached_training_set(cfg, loaded, identity, train_data, args, stop)
    if eval_data is not None and cfg.get("feature_cache") and cfg.get("feature_cache_eval", True):
        # evals then run the head only: on the default model ~10x cheaper than the target's forward each time
        eval_data = cached_training_set(cfg, loaded, identity, eval_data, args, stop, split="eval")
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collator = BatchCollator(pad_id)   # cached features (feature_cache) ride along as "hidden"
    run_info = {"command": shlex.join(["specdec-train", *sys.argv[1:]]), "commit": git_commit(),
                "data_path": cfg.data_path, "eval_data_path": cfg.eval_data_path, "model_max_length": max_length,
                "lazy_preprocess": lazy, "loss": OmegaConf.to_container(cfg.loss, resolve=True),
                "preset": cfg.name, "training_args": training_kwargs(cfg),
                "feature_cache": cfg.get("feature_cache"), "init_head": cfg.get("init_head"), "crop_context": cfg.get("crop_context"),
                "clip_grad_value": cfg.get("clip_grad_value"), "draft_vocab": vocab_info,
                "early_stopping_patience": cfg.get("early_stopping_patience"),
                "train_conversations": len(train_data) if train_data is not None else None,
                "eval_conversations": len(eval_data) if eval_data is not None else None}
    trainer = HeadTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                          data_collator=collator, identity=identity, run_info=run_info,
                          # the head stays fp32 over a quantized frozen base; benchmarks warn on a mismatch
                          base_quantization=quantization_signature(cfg.model, loaded.device),
                          compute_metrics=lambda prediction: metrics_from_counts(prediction.predictions, ks))
    if cfg.get("clip_grad_value") and not cfg.eval_only:
        trainer.add_callback(ClipGradValue(cfg.clip_grad_value, trainer))
    if cfg.eval_only:
        metrics = trainer.evaluate()
        write_json(Path(cfg.output_dir) / TOPK_FILE, {"head_path": str(cfg.head_path), **trainer.last_eval})
        log.info("top-k accuracy of %s written to %s", cfg.head_path, Path(cfg.output_dir) / TOPK_FILE)
        return {"head_path": str(cfg.head_path), "output_dir": str(cfg.output_dir), **metrics}

    checkpoint = last_checkpoint(cfg.output_dir, bool(args.save_only_model)) if cfg.resume else None
    if checkpoint:
        started_from = (read_head_config(checkpoint).get("training") or {}).get("init_head")
        if started_from != cfg.get("init_head"):
            raise HarnessError(f"{cfg.output_dir} continues a run started with init_head={started_from}, not "
                               f"{cfg.get('init_head')}; pass init_head={started_from} or use another output_dir")
        log.info("resuming from %s", checkpoint)
    if stop is not None:
        trainer.add_callback(StopOnSignal(stop))
    if cfg.get("early_stopping_patience"):
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(int(cfg.early_stopping_patience),
                                                   float(cfg.get("early_stopping_threshold") or 0.0)))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stop is not None and stop.requested and trainer.state.global_step < trainer.state.max_steps:
        # no final head: the folder holds checkpoints to resume from (a signal after the last step just finishes)
        raise Stopped(f"stopped by {stop.name} at step {trainer.state.global_step} of {trainer.state.max_steps}: "
                      f"checkpoint-{trainer.state.global_step} saved in {cfg.output_dir}; continue with: "
                      f"{resume_command('train', cfg.output_dir, 'output_dir')}", stop.signum)
    state = trainer.state
    best = state.best_model_checkpoint if args.load_best_model_at_end else None
    best_step = int(Path(best).name.rsplit("-", 1)[1]) if best else None
    if eval_data is not None and (best_step not in (None, state.global_step) or trainer.last_eval is None
                                  or trainer.last_eval["step"] != state.global_step):
        trainer.evaluate()       # the final head's own numbers (the best eval's head, loaded back, when kept)
    if best_step is not None:
        trainer.last_eval["head_from_step"] = best_step
    trainer.save_model(cfg.output_dir)
    summary = {"output_dir": str(cfg.output_dir), "global_step": state.global_step,
               "train_loss": result.training_loss, "train_runtime_s": result.metrics.get("train_runtime"),
               "train_conversations": len(train_data), "resumed_from": checkpoint, "eval": trainer.last_eval}
    if cfg.get("early_stopping_patience"):
        summary["early_stopping"] = {"patience": int(cfg.early_stopping_patience),
                                     "stopped_early": state.global_step < state.max_steps,
                                     "best_step": best_step, "best_eval_loss": state.best_metric}
    if trainer.args.should_save:
        write_json(Path(cfg.output_dir) / "train_summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = []
    if "global_step" in summary:
        lines.append(f"trained {summary['global_step']} steps in {summary['train_runtime_s'] or 0:.0f} s "
                     f"(loss {summary['train_loss']:.3f}); head folder: {summary['output_dir']}")
    table: dict[int, dict[int, float]] = {}
    for key, value in (summary.get("eval") or summary).items():
        found = re.fullmatch(r"(?:eval_)?pos(\d+)_top(\d+)", key)
        if found:
            table.setdefault(int(found[1]), {})[int(found[2])] = value
    for position, accuracies in sorted(table.items()):
        lines.append(f"position {position} (token t+{position + 1}): "
                     + ", ".join(f"top-{j} {value:.3f}" for j, value in sorted(accuracies.items())))
    return "\n".join(lines)


def _show(summary: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:   # one summary from a torchrun / accelerate job
        print(format_summary(summary))


_hydra_main = hydra_app("train", run_train, _show)


def main() -> None:
    """specdec-train: Hydra overrides, or the team's Medusa train.py flags as typed (harness/medusa_cli.py)."""
    import sys

    from harness.medusa_cli import translate

    try:
        sys.argv[1:] = translate(sys.argv[1:])
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
