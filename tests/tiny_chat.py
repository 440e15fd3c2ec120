"""A tiny chat model folder for distill/train tests: a random Llama (conftest.make_tiny_llama) + a word-level
tokenizer with a ChatML chat template, saved like a Hub model so `model.path=<folder>` loads it through
harness.model.loading.load_model (template, stop tokens and all). No downloads, a few hundred tokens of vocabulary."""

from __future__ import annotations

from pathlib import Path

from conftest import make_tiny_llama

SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ("system user assistant you are a helpful model . , ? ! the cat dog sat on mat red blue green one two "
         "three four five six seven eight nine ten what is colour of sky sea grass translate into french german "
         "summarise this text answer question please tell me about why how when where who it was and or not "
         "yes no hello world good bad day night sun moon star tree house car road city river rain snow wind "
         "fire water earth stone gold silver iron wood paper book pen ink word name time year month week "
         "hour minute second first last next new old big small long short high low hot cold fast slow").split()
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nyou are a helpful model .<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def make_tiny_chat_model(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Write model + tokenizer into `folder` (once) and return it."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    tokenizer = make_tokenizer()
    model = make_tiny_llama(seed=seed, vocab=len(tokenizer), layers=layers, hidden=hidden)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def model_overrides(folder: Path) -> list[str]:
    """Hydra overrides that make the default model config load the tiny chat model."""
    return [f"model.path={folder}", "model.name=tiny-chat", "model.dtype=fp32", "model.heads={}", "device=cpu"]
