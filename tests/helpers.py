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


def distill_cfg(chat_model: Path, questions_path: Path, tmp_path: Path, *overrides: str) -> DictConfig:
    """The distill config for the tiny chat model (conftest.chat_model), writing under `tmp_path`/out."""
    from tiny_chat import model_overrides

    return compose_config(*model_overrides(chat_model), f"bench.path={questions_path}", "logger=none",
                          f"out_dir={tmp_path / 'out'}", "max_length=72", "progress=false", *overrides,
                          config_name="distill")
