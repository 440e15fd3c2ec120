"""Training examples for draft heads: ShareGPT conversations tokenised with the target's own conversation
template, labels only on the assistant tokens (answer + its end-of-turn token), as FastChat / Medusa do.

Assistant spans are found by text, not by token arithmetic: the conversation text with every answer
(`template.conversation_text`) must start with each turn's prompt text (`template.prompt_text`, the
generation prompt included) and with the text through that turn's answer; the characters in between
are the answer. Token offsets map them to tokens, so no tokenizer-specific "-2" offsets are needed.
A conversation whose text breaks that prefix property is kept with no labels and counted (Medusa's
"tokenization mismatch" rule).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from harness.infra.errors import HarnessError
from harness.data.sharegpt import read_sharegpt, turn_pairs

log = logging.getLogger(__name__)

IGNORE_INDEX = -100   # torch cross_entropy's ignore_index; Medusa's IGNORE_TOKEN_ID


def answer_spans(template, pairs: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]] | None:
    """The conversation text and the [start, end) character span of each answer; None on a template mismatch."""
    text = template.conversation_text(pairs)
    spans = []
    for index, (user, _) in enumerate(pairs):
        start = template.prompt_text(pairs[:index] + [(user, None)])
        through = template.conversation_text(pairs[: index + 1])
        if not (text.startswith(start) and text.startswith(through)) or len(through) <= len(start):
            return None
        spans.append((len(start), len(through)))
    return text, spans


def tokenize_conversation(template, pairs: list[tuple[str, str]], max_length: int) -> dict | None:
    """{input_ids [T], labels [T]} (labels = the token on assistant tokens, IGNORE_INDEX elsewhere);
    truncated to max_length tokens; None when the template does not reproduce its own prompts."""
    found = answer_spans(template, pairs)
    if found is None:
        return None
    text, spans = found
    encoded = template.tokenizer(text, add_special_tokens=template.add_special_tokens, return_offsets_mapping=True,
                                 truncation=True, max_length=max_length)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for position, (begin, end) in enumerate(encoded["offset_mapping"]):
        # a token counts when its characters overlap an answer span; zero-width ones (an added BOS) never do
        if end > begin and any(begin < span_end and end > span_start for span_start, span_end in spans):
            labels[position] = input_ids[position]
    return {"input_ids": input_ids, "labels": labels}


class ConversationDataset(Dataset):
    """ShareGPT conversations as training examples. lazy=True tokenises in __getitem__ (and caches), as
    Medusa's `lazy_preprocess`; lazy=False tokenises everything up front."""

    def __init__(self, path: str, template, max_length: int, lazy: bool = True):
        records = read_sharegpt(path)
        self.pairs = [p for p in (turn_pairs(r) for r in records) if p]
        if not self.pairs:
            raise HarnessError(f"{path} holds no conversation with a human turn followed by an answer; "
                               "point data_path at specdec-distill output (ShareGPT)")
        if len(self.pairs) < len(records):
            log.warning("%s: %d of %d conversations have no (human, gpt) pair and are left out", path,
                        len(records) - len(self.pairs), len(records))
        self.template, self.max_length, self.path = template, int(max_length), path
        self.mismatches = 0
        self.cache: dict[int, dict] = {}
        if not lazy:
            for index in range(len(self.pairs)):
                self[index]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        if index not in self.cache:
            example = tokenize_conversation(self.template, self.pairs[index], self.max_length)
            if example is None:
                self.mismatches += 1
                log.warning("%s: conversation %d does not tokenise consistently with the %s template; trained "
                            "on with no labels (ignored)", self.path, index, self.template.name)
                ids = self.template.tokenizer(self.template.conversation_text(self.pairs[index]),
                                              add_special_tokens=self.template.add_special_tokens,
                                              truncation=True, max_length=self.max_length)["input_ids"]
                example = {"input_ids": list(ids), "labels": [IGNORE_INDEX] * len(ids)}
            self.cache[index] = example
        return self.cache[index]


@dataclass
class Collator:
    """Right padding to the longest example of the batch (Medusa pads every example to model_max_length;
    the loss is the same, the work is not)."""
    pad_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            labels[row, :length] = torch.tensor(example["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
