"""A stand-in for vLLM with its interface (LLM and its `llm_engine`'s add_request / step /
has_unfinished_requests, SamplingParams, vllm.inputs.TokensPrompt, RequestOutput-like results) for CI, which
has no vLLM: `harness/data/vllm_worker.py` runs against it unchanged. Like vLLM's continuous batching, every
step adds one token to each unfinished request (transformers on the CPU, greedy = argmax, as vLLM's greedy
is), so requests finish out of order. Every engine's arguments are appended to $STUB_VLLM_LOG (when set) so
tests can see what the harness asked for."""

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
    detokenize: bool = True
    output_kind: object = None


@dataclass
class CompletionOutput:
    token_ids: list
    finish_reason: str


@dataclass
class RequestOutput:
    request_id: str
    outputs: list
    finished: bool = True


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
                                         "top_p_rows_only": os.environ.get("SPECDEC_VLLM_TOP_P_ROWS_ONLY"),
                                         **engine_kwargs}) + "\n")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.generator = torch.Generator().manual_seed(seed)

        self.llm_engine = Engine(self.model, self.generator)


class Engine:
    def __init__(self, model, generator):
        self.model, self.generator = model, generator
        self.running: dict[str, tuple[list, object, list]] = {}    # request id -> (prompt, params, tokens so far)
        self.added = 0

    def add_request(self, request_id: str, prompt, params) -> str:
        from vllm.sampling_params import RequestOutputKind

        if params.stop and not params.detokenize:
            raise ValueError("stop strings need detokenize=True")   # as vLLM refuses them
        if params.output_kind is not RequestOutputKind.FINAL_ONLY:
            raise ValueError("the stub only returns finished requests: ask for RequestOutputKind.FINAL_ONLY")
        self.added += 1
        self.running[request_id] = (list(prompt["prompt_token_ids"]), params, [])
        return request_id

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list:
        import torch

        finished = []
        for request_id, (ids, sampling, out) in list(self.running.items()):
            with torch.no_grad():
                logits = self.model(torch.tensor([ids + out])).logits[0, -1].float()
            if sampling.temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / sampling.temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=self.generator))
            out.append(token)
            stopped = token in sampling.stop_token_ids
            if stopped or len(out) >= sampling.max_tokens:
                del self.running[request_id]
                finished.append(RequestOutput(request_id, [CompletionOutput(out, "stop" if stopped else "length")]))
        return finished
