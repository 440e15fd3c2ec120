"""transformers' own `generate` as a peer reference: plain greedy/sampling, prompt lookup
(`prompt_lookup_num_tokens`) or assisted decoding (`assistant_model`, a conf/model name).

Steps are counted through a StoppingCriteria, which `generate` calls once per decoding iteration;
the growth of the sequence between calls gives the accepted lengths, counted as the harness counts them.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from harness.engine.acceptance import Sampling
from harness.engine.rng import seed_from
from harness.engine.loop import Clock, StopCriteria, TurnResult
from harness.engine.target import Target


class _StepCounter(StoppingCriteria):
    def __init__(self, prompt_len: int):
        self.last = prompt_len
        self.lengths: list[int] = []

    def __call__(self, input_ids, scores, **kwargs):
        length = input_ids.shape[-1]
        self.lengths.append(length - self.last)
        self.last = length
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFGenerate:
    """A peer runner (generate_turn), not a Proposer; it describes itself to the planner the same way."""

    name = "hf_generate"
    head_type = None

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        """Plain generate: one token a forward; prompt lookup / assisted decoding: root + the candidates
        (transformers' num_assistant_tokens defaults to 20)."""
        lookup, assistant = cfg.get("prompt_lookup_num_tokens"), cfg.get("assistant_model")
        if not lookup and not assistant:
            return 1
        return 1 + int(lookup or cfg.get("num_assistant_tokens") or 20)

    def __init__(self, prompt_lookup_num_tokens: int | None = None, max_matching_ngram_size: int | None = None,
                 assistant_model: str | None = None, num_assistant_tokens: int | None = None):
        self.prompt_lookup_num_tokens = prompt_lookup_num_tokens
        self.max_matching_ngram_size = max_matching_ngram_size
        self.assistant_name = assistant_model
        self.num_assistant_tokens = num_assistant_tokens
        self.assistant = None

    def setup(self, loaded) -> None:
        self.loaded = loaded
        if self.assistant_name:
            from harness.model.loading import load_model, model_config

            self.assistant = load_model(model_config(self.assistant_name), str(loaded.device)).model

    def _generation_config(self, sampling: Sampling, stop: StopCriteria) -> GenerationConfig:
        options = dict(max_new_tokens=stop.max_new_tokens, eos_token_id=sorted(stop.token_ids) or None,
                       pad_token_id=self.loaded.tokenizer.pad_token_id or 0, do_sample=not sampling.greedy,
                       top_k=None, top_p=None, temperature=None)
        if not sampling.greedy:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p)
        if stop.strings:
            options["stop_strings"] = list(stop.strings)
        if self.prompt_lookup_num_tokens:
            options["prompt_lookup_num_tokens"] = int(self.prompt_lookup_num_tokens)
            if self.max_matching_ngram_size:
                options["max_matching_ngram_size"] = int(self.max_matching_ngram_size)
        if self.assistant is not None and self.num_assistant_tokens:
            options["num_assistant_tokens"] = int(self.num_assistant_tokens)
        return GenerationConfig(**options)

    @torch.inference_mode()
    def generate_turn(self, target: Target, prompt_ids: list[int], sampling: Sampling, stop: StopCriteria,
                      generator: torch.Generator | None) -> TurnResult:
        if generator is not None and not sampling.greedy:
            torch.manual_seed(seed_from(generator))
        clock = Clock(target.devices)
        ids = torch.tensor([prompt_ids], device=target.device)
        counter = _StepCounter(len(prompt_ids))
        kwargs = dict(attention_mask=torch.ones_like(ids), generation_config=self._generation_config(sampling, stop),
                      stopping_criteria=StoppingCriteriaList([counter]))
        if stop.strings:
            kwargs["tokenizer"] = self.loaded.tokenizer
        if self.assistant is not None:
            kwargs["assistant_model"] = self.assistant
        start = clock()
        out = target.model.generate(ids, **kwargs)
        wall = clock() - start
        produced = out[0, len(prompt_ids):].tolist()
        # the same stop rule as the harness loop, so tokens are counted identically for every method
        kept, reason = stop.cut([], produced)
        lengths, total = [], 0
        for length in counter.lengths:
            if total >= len(kept):
                break
            lengths.append(min(length, len(kept) - total))
            total += lengths[-1]
        return TurnResult(kept, len(prompt_ids), wall, None, None, None, None, lengths, None,
                          [], [], reason or stop.cap_reason)
