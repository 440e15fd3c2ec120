"""Generation backends of `specdec-distill`: token-id prompts in, token ids out, nothing else.

- `hf`: the harness itself. batch_size=1 runs the benchmark's own loop (`decode_turn` with the vanilla
  proposer: the same greedy tokens vanilla benchmark runs produce); batch_size>1 transformers `generate`
  with left padding.
- `vllm`: vLLM (CPU or CUDA build) in its own environment (`make distill-env`), driven through
  `harness/data/vllm_worker.py` over a pipe; tensor parallelism and every other engine option through
  `vllm.engine_kwargs` / `vllm.tensor_parallel_size`. The engine starts once per job (minutes on a CPU).

Both take requests one at a time (`submit`) and hand back whichever are finished (`poll`), so the caller can
follow a finished turn with the next one while the rest are still generating: vLLM's batch stays full instead
of running a round's longest answer alone (continuous batching across turns and conversations).

Stop tokens and strings are applied by the caller with `StopCriteria.cut` on every backend's output, so the
backends cannot disagree about where an answer ends.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from harness.infra.errors import HarnessError

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")


@dataclass
class Params:
    temperature: float
    top_p: float
    max_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str                 # "stop" (a stop token or string) | "length"


class Backend:
    """`submit(key, prompt, params)` queues a request; `poll(timeout_s)` waits until at least one queued request
    is finished (or, on vLLM, until `timeout_s` passes: then it may return none) and returns
    `[(key, Completion), ...]`."""

    name = "?"

    def submit(self, key: int, prompt: list[int], params: Params) -> None:
        raise NotImplementedError

    def poll(self, timeout_s: float | None = None) -> list[tuple[int, Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HFBackend(Backend):
    """The harness's own model object: the benchmark loop at batch 1, `generate` in padded batches above.
    `poll` runs the oldest queued request, with up to batch_size - 1 later ones of the same sampling."""

    name = "hf"

    def __init__(self, loaded, batch_size: int = 1):
        from harness.engine.target import Target

        self.loaded, self.batch_size = loaded, int(batch_size)
        self.target = Target(loaded.model)
        tokenizer = loaded.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.queue: list[tuple[int, list[int], Params]] = []

    def submit(self, key: int, prompt: list[int], params: Params) -> None:
        self.queue.append((key, prompt, params))

    def poll(self, timeout_s: float | None = None) -> list[tuple[int, Completion]]:
        """The oldest request (and its batch) runs to its end: one answer is the finest step here."""
        if not self.queue:
            raise HarnessError("backend=hf: poll() with nothing submitted")
        first = self.queue[0][2]
        taken = [q for q in self.queue if (q[2].temperature, q[2].top_p) == (first.temperature, first.top_p)]
        taken = taken[: self.batch_size]
        chosen = {key for key, _, _ in taken}
        self.queue = [q for q in self.queue if q[0] not in chosen]
        if self.batch_size == 1:
            return [(taken[0][0], self._one(taken[0][1], taken[0][2]))]
        return list(zip([k for k, _, _ in taken], self._batch([p for _, p, _ in taken], [q for _, _, q in taken])))

    def _one(self, prompt: list[int], params: Params) -> Completion:
        from harness.engine.acceptance import Sampling
        from harness.engine.loop import Proposer, StopCriteria, decode_turn

        generator = torch.Generator(device=self.target.device).manual_seed(int(params.seed or 0) % 2**63)
        stop = StopCriteria(frozenset(params.stop_token_ids), tuple(params.stop), self.loaded.tokenizer,
                            params.max_tokens)
        result = decode_turn(self.target, Proposer(), prompt, Sampling(params.temperature, params.top_p), stop,
                             generator)
        return Completion(result.token_ids, "length" if result.stop_reason == "max_new_tokens" else "stop")

    @torch.inference_mode()
    def _batch(self, prompts: list[list[int]], params: list[Params]) -> list[Completion]:
        from transformers import GenerationConfig

        first = params[0]
        if any((p.temperature, p.top_p) != (first.temperature, first.top_p) for p in params):
            raise HarnessError("backend=hf batch_size>1 needs one temperature/top_p per batch")
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention[row, width - len(prompt):] = 1
        greedy = first.temperature == 0
        config = GenerationConfig(max_new_tokens=max(p.max_tokens for p in params), do_sample=not greedy,
                                  temperature=None if greedy else first.temperature,
                                  top_p=None if greedy else first.top_p, top_k=None,
                                  eos_token_id=sorted(set(first.stop_token_ids)) or None, pad_token_id=self.pad_id)
        if not greedy:   # reproducible for the same batch; not per prompt as at batch 1
            torch.manual_seed(int(first.seed or 0) % 2**63)
        out = self.loaded.model.generate(input_ids=input_ids.to(self.target.device),
                                         attention_mask=attention.to(self.target.device), generation_config=config)
        return [Completion(tokens[: p.max_tokens], "length") for tokens, p in zip(out[:, width:].tolist(), params)]


class VllmBackend(Backend):
    """vLLM in its own venv, as a subprocess speaking JSON lines (harness/vllm_worker.py)."""

    name = "vllm"

    def __init__(self, model_dir: str, settings: dict, log_path: Path, python: str | None = None,
                 env: dict | None = None):
        python = python or sys.executable
        if not Path(python).is_file():
            raise HarnessError(f"backend=vllm: no Python at {python}; run `make distill-env` (vLLM's own venv) "
                               "or point vllm.python at a Python that has vllm")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "a", encoding="utf-8")
        # a session of its own: Ctrl-C (the terminal's process group) and SLURM's SIGTERM reach the harness, which
        # stops in order (stop_grace_s) and then closes the worker, instead of killing vLLM under it
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        ready = self._call({"model": model_dir, **settings})
        self.version, self.top_p_rows_only = ready.get("vllm"), ready.get("top_p_rows_only")
        self.requests, self.pending, self.outbox = 0, 0, []
        log.info("vLLM %s ready (%s; top-p on sampled rows only: %s; its log, engine stats every 10 s: %s)",
                 self.version, model_dir, self.top_p_rows_only, log_path)

    def _call(self, message: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.proc.wait(timeout=30)
            raise HarnessError(f"the vLLM worker exited (status {self.proc.returncode}); its log: {self.log_path}"
                               f" — last line: {self._last_log_line()}")
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise HarnessError(f"{answer['error']} (vLLM log: {self.log_path})")
        return answer

    def _last_log_line(self) -> str:
        self._log.flush()
        lines = [l for l in self.log_path.read_text(errors="replace").splitlines() if l.strip()]
        return lines[-1][:300] if lines else "(empty)"

    def submit(self, key: int, prompt: list[int], params: Params) -> None:
        self.outbox.append({"key": int(key), "prompt": prompt, "params": asdict(params)})
        self.pending += 1

    def poll(self, timeout_s: float | None = None) -> list[tuple[int, Completion]]:
        """Hand the engine what was submitted since the last call; it steps until one or more are finished, or
        until `timeout_s` has passed (then the answer may be empty)."""
        if not self.pending:
            raise HarnessError("backend=vllm: poll() with nothing submitted")
        self.requests += 1
        message = {"id": self.requests, "submit": self.outbox}
        if timeout_s is not None:
            message["timeout_s"] = max(float(timeout_s), 0.0)
        answer = self._call(message)
        self.outbox = []
        if not answer["done"] and timeout_s is None:
            raise HarnessError(f"the vLLM worker finished none of {self.pending} requests (vLLM log: {self.log_path})")
        self.pending -= len(answer["done"])
        return [(o["key"], Completion(o["token_ids"], o["finish_reason"])) for o in answer["done"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.proc.kill()
        self._log.close()
