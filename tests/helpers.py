"""Plain functions the tests share (fixtures live in conftest.py): a bare model as a LoadedModel, decoding
through the harness loop without a bench, torch on one thread, a bench run on the tiny SmolLM2-shaped model,
and the inputs of the distillation tests."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from conftest import compose_config, tiny_bench_overrides
from harness.engine.acceptance import Sampling
from harness.engine.loop import Proposer, StopCriteria, TurnResult, decode_turn
from harness.engine.target import Target
from harness.model.loading import LoadedModel


def as_loaded(model, name: str = "tiny", template=None) -> LoadedModel:
    """`model` as load_model would hand it over on the CPU in fp32 (no tokenizer; a template only if given)."""
    return LoadedModel(name, model, None, template, torch.device("cpu"), torch.float32, "test")


def decode(model, proposer: Proposer, prompt: list[int], new_tokens: int, sampling: Sampling | None = None,
           generator: torch.Generator | None = None) -> TurnResult:
    """One turn of `new_tokens` tokens (no stop tokens) through the harness loop, on a fresh cache."""
    return decode_turn(Target(model), proposer, prompt, sampling or Sampling(),
                       StopCriteria(frozenset(), max_new_tokens=new_tokens), generator)


def greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Vanilla greedy token ids: the reference a lossless method must reproduce."""
    return decode(model, Proposer(), prompt, max_new_tokens).token_ids


@contextmanager
def single_thread():
    """Tiny models run fastest on one thread, and on a busy shared machine two threads spin; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_bench_config(model_dir: Path, run_dir: Path, questions: Path, *extra: str) -> DictConfig:
    """The bench config for the tiny SmolLM2-shaped model folder (conftest.tiny_model_dir), shrunk for tests."""
    return compose_config(*tiny_bench_overrides(model_dir, run_dir, questions, *extra))


def tiny_bench(model_dir: Path, run_dir: Path, questions: Path, *extra: str) -> dict:
    """Run the bench on the tiny model into `run_dir`; returns its summary."""
    from harness.bench import run_bench

    return run_bench(tiny_bench_config(model_dir, run_dir, questions, *extra), run_dir)


# ------------------------------------------------------------------------------ distillation inputs

MT_BENCH_81 = ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
               "experiences and must-see attractions.")


def sharegpt_input(path: Path, count: int = 6) -> Path:
    """A ShareGPT file of `count` conversations in the tiny chat tokenizer's words; every third has two turns."""
    from harness.data.sharegpt import write_sharegpt

    records = []
    for index in range(count):
        turns = [{"from": "human", "value": f"what is the colour of the sky ? tell me {index}"},
                 {"from": "gpt", "value": "an old answer that distillation replaces"}]
        if index % 3 == 0:   # some multi-turn conversations
            turns += [{"from": "human", "value": "why ?"}, {"from": "gpt", "value": "old"}]
        records.append({"id": f"c{index}", "conversations": turns})
    return write_sharegpt(records, path)


def distill_overrides(chat_model: Path, questions_path: Path, tmp_path: Path, *overrides: str) -> list[str]:
    """specdec-distill's overrides for the tiny chat model (conftest.chat_model), writing under `tmp_path`/out."""
    from tiny_chat import model_overrides

    return [*model_overrides(chat_model), f"bench.path={questions_path}", "logger=none", f"out_dir={tmp_path / 'out'}",
            "max_length=72", "progress=false", *overrides]


def distill_cfg(chat_model: Path, questions_path: Path, tmp_path: Path, *overrides: str) -> DictConfig:
    """The distill config for the tiny chat model (conftest.chat_model), writing under `tmp_path`/out."""
    return compose_config(*distill_overrides(chat_model, questions_path, tmp_path, *overrides), config_name="distill")


COUNTING = "one two three four five six seven eight nine ten"


def toy_sharegpt(folder: Path) -> tuple[Path, Path]:
    """A memorisable training set for the tiny chat model: short questions answered by counting (t + 2 follows
    from t); 6 training conversations, 2 held out."""
    from harness.data.sharegpt import write_sharegpt

    words = COUNTING.split()
    records = []
    for index in range(8):
        answer = " ".join(words[index % 3:] + words[:index % 3])
        records.append({"id": f"t{index}", "conversations": [
            {"from": "human", "value": f"tell me {words[index]} words"}, {"from": "gpt", "value": answer}]})
    return write_sharegpt(records[:6], folder / "train.json"), write_sharegpt(records[6:], folder / "eval.jsonl")


def train_overrides(chat_model: Path, train: Path, held: Path, output_dir: Path, *overrides: str) -> list[str]:
    """specdec-train's overrides: a 2-head Medusa on the tiny chat model, fp32, 24 steps of batch 2."""
    from tiny_chat import model_overrides

    return [*model_overrides(chat_model)[:-1], "logger=none", f"data_path={train}", f"eval_data_path={held}",
            f"output_dir={output_dir}", "model_max_length=64", "head.medusa_num_heads=2",
            "training.num_train_epochs=1", "+training.max_steps=24", "training.per_device_train_batch_size=2",
            "training.per_device_eval_batch_size=2", "training.learning_rate=3e-2", "training.warmup_ratio=0.0",
            "training.logging_steps=1", "training.eval_steps=12", "training.save_steps=12",
            "+training.disable_tqdm=true",
            # the tiny vocabulary is smaller than the presets' draft vocabulary; fp32 unless a test asks
            "+training.use_cpu=true", "head.draft_vocab_size=null", "training.bf16=false", *overrides]
