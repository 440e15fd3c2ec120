"""A stand-in for vLLM with its interface (LLM, SamplingParams, vllm.inputs.TokensPrompt, RequestOutput-like
results) for CI, which has no vLLM: `harness/data/vllm_worker.py` runs against it unchanged. It generates with
transformers on the CPU, one prompt at a time: greedy = argmax, as vLLM's greedy is. Every engine's arguments
are appended to $STUB_VLLM_LOG (when set) so tests can see what the harness asked for."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

__version__ = "0.0-stub"


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list = field(default_factory=list)
    stop: list | None = None
    seed: int | None = None
    skip_special_tokens: bool = True


@dataclass
class CompletionOutput:
    token_ids: list
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list


class LLM:
    def __init__(self, model: str, dtype: str = "auto", tensor_parallel_size: int = 1, max_model_len=None,
                 seed: int = 0, trust_remote_code: bool = False, **engine_kwargs):
        import torch
        from transformers import AutoModelForCausalLM

        if os.environ.get("STUB_VLLM_LOG"):
            with open(os.environ["STUB_VLLM_LOG"], "a") as handle:
                handle.write(json.dumps({"model": model, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
                                         "max_model_len": max_model_len, "seed": seed,
                                         "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                                         **engine_kwargs}) + "\n")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.generator = torch.Generator().manual_seed(seed)

    def generate(self, prompts, params, use_tqdm: bool = True):
        import torch

        results = []
        for prompt, sampling in zip(prompts, params):
            ids = list(prompt["prompt_token_ids"])
            out, reason = [], "length"
            with torch.no_grad():
                for _ in range(sampling.max_tokens):
                    logits = self.model(torch.tensor([ids + out])).logits[0, -1].float()
                    if sampling.temperature == 0:
                        token = int(logits.argmax())
                    else:
                        probs = torch.softmax(logits / sampling.temperature, dim=-1)
                        token = int(torch.multinomial(probs, 1, generator=self.generator))
                    out.append(token)
                    if token in sampling.stop_token_ids:
                        reason = "stop"
                        break
            results.append(RequestOutput([CompletionOutput(out, reason)]))
        return results
