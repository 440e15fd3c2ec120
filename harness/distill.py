"""`specdec-distill`: regenerate the assistant turns of a ShareGPT file or a question file with the target
model itself (self-distillation data for Medusa, ours and EAGLE heads: a head learns what *this* model
says, not what ChatGPT said).

    specdec-distill out_dir=data/distill/specbench                      # Spec-Bench minus MT-Bench (default)
    specdec-distill data_path=ShareGPT_V4.3_unfiltered_cleaned_split.json max_length=2048 out_dir=data/sg
    specdec-distill -m shard=0,1,2,3 num_shards=4 out_dir=data/sg ...     # 4 jobs (SLURM array / multirun)
    specdec-distill merge=true num_shards=4 out_dir=data/sg eval_fraction=0.05   # final ShareGPT file(s)
    specdec-distill extend=heads/m/dataset/distilled.parquet self_prompts.count=9000 ...  # grow a merged set

Each human turn is followed by the model's own answer: turn 1 is answered, the answer appended, then
turn 2 is answered with it in the prompt (as MT-Bench prompts are built). `max_length` bounds the tokens
of the whole conversation: a turn whose prompt leaves no room ends the conversation there.

A shard appends one conversation a line to `out_dir/shard-<i>-of-<n>.jsonl`, fsync'd per conversation, so
a killed job loses at most the conversations in flight (`in_flight`); rerunning the same command skips
finished ids.
Conversations go to shard `sha1(id) mod n`, so a shard's share does not depend on the input order.

Generation: batch_size=1 uses the harness loop (`decode_turn` with the vanilla `Proposer`), the same
greedy tokens the benchmark's vanilla runs produce. batch_size>1 uses transformers `generate` with left
padding (for GPUs); padded batches may differ from batch 1 in the last bits of fp16 logits, which is
harmless for training data but means the two paths are not token-identical there.

First human turns that appear in the evaluation benchmark (MT-Bench, Spec-Bench ids 81-160; compared after
`sharegpt.normalise`) are dropped with one line saying how many, unless `allow_eval_overlap=true`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from harness.infra.app import hydra_app
from harness.data.questions import load_questions
from harness.engine.loop import StopCriteria
from harness.infra.errors import HarnessError
from harness.infra.settings import DISTILL, check_settings
from harness.infra.locks import hold
from harness.infra.signals import Stopped, graceful_stop, resume_command
from harness.model.loading import load_model
from harness.data.self_prompts import (EvalOverlap, NearDuplicates, PromptFilter, clean_user_turn, encode_prefix, open_user_turn,
                                  user_turn_stops)
from harness.data.sharegpt import JsonlLog, read_sharegpt, user_turns, write_sharegpt
from harness.infra.tracking import Tracker
from harness.infra.store import git_commit
from harness.data.token_data import (is_token_dataset, manifest_path, read_parquet, sha256_of, to_sharegpt,
                                     write_manifest, write_parquet)
from harness.data.examples import answer_spans

log = logging.getLogger(__name__)

# Settings that must agree between a shard file and a run that continues or merges it
IDENTITY_KEYS = ("model", "source", "decoding", "max_length", "max_new_tokens", "seed", "allow_eval_overlap",
                 "prompts", "self_prompts", "eval_overlap", "extend")


@dataclass
class Conversation:
    id: str
    turns: list[str]                     # human turns, in order (self-written ones are appended as written)
    category: str | None = None
    planned_turns: int = 0               # > 0: a self-written conversation of that many user turns
    source: str = "input"                # input | self


@dataclass
class Answered:
    """One conversation with the model's own answers; `record()` is its line in the shard file."""
    conversation: Conversation
    answers: list[str] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    stop_reasons: list[str] = field(default_factory=list)
    total_tokens: int = 0                # prompt of the last answered turn + its answer
    alive: bool = True                   # False once a turn was dropped or left no room
    skipped: str | None = None
    prompt_ids: list[int] = field(default_factory=list)    # the last answered turn's prompt ...
    answer_ids: list[int] = field(default_factory=list)    # ... and its generated tokens
    layout: dict | None = None           # token_layout(): input_ids + answer_spans

    def record(self, model_name: str) -> dict:
        turns = []
        for user, answer in zip(self.conversation.turns, self.answers):
            turns += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
        record = {"id": self.conversation.id, "conversations": turns, "model": model_name,
                  "source": self.conversation.source, "new_tokens": self.new_tokens,
                  "stop_reasons": self.stop_reasons, "total_tokens": self.total_tokens}
        if self.conversation.category is not None:
            record["category"] = self.conversation.category
        if self.layout is not None:
            record.update(self.layout)
        if not self.answers:
            record["skipped"] = self.skipped or "first prompt leaves no room under max_length"
        return record


def stable_hash(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16)


def shard_of(conversation_id: str, num_shards: int) -> int:
    return stable_hash(conversation_id) % num_shards


# ----------------------------------------------------------------------------------------------------- input

def source_identity(cfg: DictConfig) -> dict:
    identity = {}
    if cfg.prompts in ("input", "mix"):
        if cfg.data_path:
            identity["data_path"] = str(Path(cfg.data_path).expanduser().resolve())
        else:
            bench = OmegaConf.to_container(cfg.bench, resolve=True)
            identity["questions"] = {k: bench.get(k) for k in ("name", "id_range", "question_ids", "categories",
                                                                "limit", "max_turns")}
    return identity


PROMPT_SOURCES = ("input", "self", "mix")


def self_conversations(cfg: DictConfig) -> list[Conversation]:
    """`self_prompts.count` conversations the target will write itself; a stable `second_turn_fraction` of
    them plan a follow-up user turn (MT-Bench-like turn-2 contexts)."""
    magpie = cfg.self_prompts
    count, fraction = int(magpie.count), float(magpie.second_turn_fraction)
    if count < 1 or not 0.0 <= fraction <= 1.0:
        raise HarnessError("self_prompts.count must be >= 1 and self_prompts.second_turn_fraction in [0, 1]")
    out = []
    for index in range(count):
        conversation_id = f"self-{index:07d}"
        two = stable_hash(f"{cfg.seed}:turns:{conversation_id}") % 10**6 < fraction * 10**6
        out.append(Conversation(conversation_id, [], "self", planned_turns=2 if two else 1, source="self"))
    return out


def load_conversations(cfg: DictConfig) -> list[Conversation]:
    """The input (and/or self-written conversations), ids unique (a repeated id keeps its first conversation),
    empty input conversations dropped."""
    if cfg.prompts not in PROMPT_SOURCES:
        raise HarnessError(f"prompts={cfg.prompts} is not one of {', '.join(PROMPT_SOURCES)}")
    found = []
    if cfg.prompts in ("input", "mix"):
        if cfg.data_path:
            found += [Conversation(r["id"], user_turns(r)) for r in read_sharegpt(cfg.data_path)]
        else:
            found += [Conversation(str(q.question_id), list(q.turns), q.category)
                      for q in load_questions(cfg.bench)]
    if cfg.prompts in ("self", "mix"):
        found += self_conversations(cfg)
    seen, conversations, repeated = set(), [], 0
    for conversation in found:
        if conversation.id in seen:
            repeated += 1
            continue
        seen.add(conversation.id)
        if conversation.turns or conversation.planned_turns:
            conversations.append(conversation)
    if repeated:
        log.warning("%d conversations repeat an earlier id; kept the first of each", repeated)
    if not conversations:
        raise HarnessError("the input holds no conversation with a human turn; check data_path / bench selection")
    return conversations


def eval_overlap_checker(cfg: DictConfig) -> EvalOverlap | None:
    """The n-gram check against the evaluation benchmark; None when its file is missing and overlap allowed."""
    try:
        eval_questions = load_questions(cfg.eval_bench)
    except HarnessError:
        if cfg.allow_eval_overlap:
            log.warning("eval overlap: not checked (no %s question file) and allowed by allow_eval_overlap=true",
                        cfg.eval_bench.name)
            return None
        raise
    return EvalOverlap([turn for q in eval_questions for turn in q.turns], int(cfg.eval_overlap.ngram))


def drop_eval_overlap(conversations: list[Conversation], cfg: DictConfig) -> tuple[list[Conversation], int]:
    """Drop input conversations with a human turn that overlaps the evaluation benchmark: an exact copy
    (normalised text) or more than `eval_overlap.max_fraction` of its word n-grams found in it. Self-written
    prompts are checked as they are written (PromptFilter)."""
    checker = eval_overlap_checker(cfg)
    if checker is None:
        return conversations, 0
    limit = float(cfg.eval_overlap.max_fraction)
    overlapping = [c for c in conversations if c.turns and any(checker.score(t) > limit for t in c.turns)]
    if not overlapping:
        log.info("eval overlap: none of %d input prompts overlaps %s", sum(1 for c in conversations if c.turns),
                 cfg.eval_bench.name)
        return conversations, 0
    shown = ", ".join(c.id for c in overlapping[:10]) + (" ..." if len(overlapping) > 10 else "")
    if cfg.allow_eval_overlap:
        log.warning("eval overlap: %d of %d prompts overlap %s (ids %s); KEPT because allow_eval_overlap=true",
                    len(overlapping), len(conversations), cfg.eval_bench.name, shown)
        return conversations, len(overlapping)
    log.warning("eval overlap: %d of %d prompts overlap %s (ids %s); refused them (no training on the benchmark; "
                "allow_eval_overlap=true keeps them)", len(overlapping), len(conversations), cfg.eval_bench.name,
                shown)
    dropped = {c.id for c in overlapping}
    return [c for c in conversations if c.id not in dropped], len(overlapping)


# ----------------------------------------------------------------------------------------------------- shards

def shard_stem(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def identity(cfg: DictConfig) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {"model": cfg.model.name, "source": source_identity(cfg), "decoding": resolved["decoding"],
            "max_length": cfg.max_length, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
            "allow_eval_overlap": bool(cfg.allow_eval_overlap), "prompts": cfg.prompts,
            # not the count: ids self-<n> are fixed by n, so a larger count extends a dataset (resume)
            "self_prompts": ({k: v for k, v in resolved["self_prompts"].items() if k != "count"}
                             if cfg.prompts != "input" else None),
            "eval_overlap": resolved["eval_overlap"],
            # the dataset this folder grows (sha256 of its whole set): a shard resumed or merged without the same
            # extend= is refused, rather than regenerating (or dropping) the old conversations
            "extend": sha256_of(Path(cfg.extend).expanduser()) if cfg.get("extend") and Path(cfg.extend).expanduser().is_file()
            else (str(cfg.extend) if cfg.get("extend") else None)}


def _without_count(self_prompts):
    return {k: v for k, v in self_prompts.items() if k != "count"} if isinstance(self_prompts, dict) else self_prompts


def extended_records(cfg: DictConfig) -> tuple[list[dict], dict | None]:
    """`extend`: an earlier merged dataset (the whole parquet, beside its manifest) that this run continues, as
    shard records, and its manifest. Its conversations count as done (not generated again), its self-written
    prompts as seen (a new one that near-duplicates them is dropped), and the merge writes them back unchanged;
    so a dataset grows on a machine that kept only the parquet (the shard files live under an ignored data/).
    Refused in one line when it was made with other settings than this run's."""
    if not cfg.get("extend"):
        return [], None
    path = Path(cfg.extend).expanduser()
    manifest_file = manifest_path(path)
    if not path.is_file() or not manifest_file.is_file():
        raise HarnessError(f"extend={path}: needs a merged dataset and its manifest ({manifest_file.name}); "
                           "fix extend= (the whole set, e.g. .../distilled.parquet)")
    manifest = json.loads(manifest_file.read_text())
    whole = (manifest.get("files") or {}).get("all") or {}
    if whole.get("path") != path.name or whole.get("sha256") != sha256_of(path):
        raise HarnessError(f"extend={path} is not the whole set its manifest describes ({whole.get('path')}, "
                           "sha256 checked); pass the whole set, unchanged since its merge")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    wanted = {"model": cfg.model.name, "prompts": cfg.prompts, "prompt_source": source_identity(cfg),
              "answers_sampling": resolved["decoding"], "max_length": cfg.max_length,
              "max_new_tokens": cfg.max_new_tokens,
              "self_prompts": _without_count(resolved["self_prompts"]) if cfg.prompts != "input" else None}
    wanted["eval_overlap"] = {**resolved["eval_overlap"], "eval_bench": cfg.eval_bench.name}
    if "seed" in manifest:     # datasets merged before the seed was recorded carry none
        wanted["seed"] = cfg.seed
    had = {**{k: manifest.get(k) for k in wanted}, "self_prompts": _without_count(manifest.get("self_prompts"))}
    had["eval_overlap"] = {k: v for k, v in (manifest.get("eval_overlap") or {}).items() if k != "dropped_input_prompts"}
    changed = [k for k in wanted if had[k] != wanted[k]]
    if changed:
        raise HarnessError(f"extend={path} was distilled with other {', '.join(changed)} "
                           f"({'; '.join(f'{k}: {had[k]!r}' for k in changed)}); run with its settings")
    columns, records = read_parquet(path), []
    for index, text in enumerate(to_sharegpt(columns)):
        flat = columns["answer_spans"][index]
        record = {**text, "model": cfg.model.name,
                  "source": columns["source"][index], "new_tokens": list(columns["new_tokens"][index]),
                  "stop_reasons": list(columns["stop_reasons"][index]),
                  "total_tokens": len(columns["input_ids"][index]), "input_ids": list(columns["input_ids"][index]),
                  "answer_spans": [[int(a), int(b)] for a, b in zip(flat[0::2], flat[1::2])]}
        if columns["category"][index] is not None:
            record["category"] = columns["category"][index]
        records.append(record)
    log.info("extend: %d conversations of %s count as done (%s generated tokens)", len(records), path,
             f"{sum(sum(r['new_tokens']) for r in records):,}")
    return records, manifest


def check_identity(meta_path: Path, wanted: dict) -> None:
    old = json.loads(meta_path.read_text())["identity"]
    if isinstance(old.get("self_prompts"), dict):
        old["self_prompts"] = {k: v for k, v in old["self_prompts"].items() if k != "count"}
    changed = [k for k in IDENTITY_KEYS if old.get(k) != wanted.get(k)]
    if changed == ["extend"]:
        raise HarnessError(f"{meta_path.parent} grows {'a dataset' if old.get('extend') else 'no dataset'} "
                           f"(extend sha256 {old.get('extend')}), this run {wanted.get('extend')}; pass the extend= "
                           "its shards were made with (unchanged since), or choose another out_dir")
    if changed:
        raise HarnessError(f"{meta_path.parent} was distilled with different {', '.join(changed)}; rerun with "
                           "the same settings or choose another out_dir")


def open_shard(cfg: DictConfig, out_dir: Path, shard: int, num_shards: int, extra: dict) -> tuple[JsonlLog, set]:
    """The shard's log and the ids it already finished; refuses a folder made with other settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = shard_stem(shard, num_shards)
    shard_log, meta = JsonlLog(out_dir / f"{stem}.jsonl"), out_dir / f"{stem}.meta.json"
    wanted = identity(cfg)
    for other in out_dir.glob("shard-*.meta.json"):
        check_identity(other, wanted)
        if not other.name.endswith(f"-of-{num_shards:05d}.meta.json"):
            raise HarnessError(f"{out_dir} holds shards of another num_shards ({other.name}); use the same "
                               "num_shards or another out_dir")
    done = {r["id"] for r in shard_log.records()}
    if done and not cfg.resume:
        raise HarnessError(f"{shard_log.path} already holds {len(done)} conversations; pass resume=true to "
                           "continue it or choose another out_dir")
    tmp = meta.with_suffix(".tmp")
    previous = json.loads(meta.read_text()) if meta.is_file() else {}
    tmp.write_text(json.dumps({"identity": wanted, "shard": shard, "num_shards": num_shards,
                               "config": OmegaConf.to_container(cfg, resolve=True), **extra,
                               "stats": previous.get("stats", []), "backend_info": previous.get("backend_info")},
                              indent=2, default=str))
    os.replace(tmp, meta)
    return shard_log, done


# ----------------------------------------------------------------------------------------------------- generation

class Distiller:
    """Conversations answered turn by turn, streamed: every conversation in flight has one request at the
    backend (its next user turn or answer); when it comes back the conversation's next request is submitted
    at once, and a finished conversation makes room for the next one. vLLM's batch thus stays full across
    turns and conversations (no round waits for its longest answer); hf at batch 1 runs the benchmark loop,
    one conversation after the other, so the backends differ only in speed.

    A self-written conversation (`Conversation.turns` empty, `planned_turns` > 0) first has the target write
    each user turn (Magpie, harness/data/self_prompts.py) and the filters pass it; a dropped turn 1 skips the
    conversation (recorded with the reason, so a resumed run does not redo it), a dropped turn 2 ends it."""

    def __init__(self, backend, template, cfg: DictConfig, prompt_filter: PromptFilter | None):
        from harness.data.backends import Params

        self.backend, self.template, self.tokenizer = backend, template, template.tokenizer
        self.max_length = int(cfg.max_length)
        self.max_new_tokens = int(cfg.max_new_tokens) if cfg.max_new_tokens else None
        self.seed = int(cfg.seed)
        self.stop_ids = sorted(self.template.stop_token_ids)
        self.answer_params = Params(float(cfg.decoding.temperature), float(cfg.decoding.top_p), 0, self.stop_ids,
                                    list(self.template.stop_strings))
        magpie = cfg.self_prompts
        self.user_stops = user_turn_stops(self.template)
        self.user_params = Params(float(magpie.temperature), float(magpie.top_p), int(magpie.max_tokens),
                                  self.stop_ids, self.user_stops)
        self.filter = prompt_filter
        self.user_tokens = 0             # tokens the target generated as user turns (kept or dropped)
        self._keys = 0

    def budget(self, prompt_len: int) -> int:
        room = self.max_length - prompt_len
        return min(room, self.max_new_tokens) if self.max_new_tokens else room

    def stop(self, budget: int) -> StopCriteria:
        return StopCriteria(frozenset(self.stop_ids), tuple(self.template.stop_strings), self.tokenizer, budget)

    def history(self, item: Answered) -> list[tuple[str, str]]:
        return list(zip(item.conversation.turns, item.answers))

    def _seed(self, item: Answered, turn: int, kind: str) -> int:
        return stable_hash(f"{self.seed}:{kind}:{turn}:{item.conversation.id}") % 2**31

    def next_request(self, item: Answered) -> tuple | None:
        """(kind, turn, prompt ids, params) of what `item` needs next; None once it is complete."""
        conversation, turn = item.conversation, len(item.answers)
        if not item.alive:
            return None
        if self.filter is not None and conversation.planned_turns > turn and len(conversation.turns) == turn:
            prompt = encode_prefix(self.template, open_user_turn(self.template, self.history(item)))
            room = self.max_length - len(prompt)
            if room <= 1:            # an earlier answer filled the conversation: no room for another turn
                item.alive = False
                if turn == 0:
                    item.skipped = "first prompt leaves no room under max_length"
                return None
            return "user", turn, prompt, dataclasses.replace(self.user_params, seed=self._seed(item, turn, "user"),
                                                             max_tokens=min(self.user_params.max_tokens, room))
        if len(conversation.turns) <= turn:
            return None
        prompt_ids = self.template.encode(self.history(item) + [(conversation.turns[turn], None)])
        budget = self.budget(len(prompt_ids))
        if budget <= 0:
            item.alive = False
            if turn == 0:
                item.skipped = "first prompt leaves no room under max_length"
            return None
        return "answer", turn, prompt_ids, dataclasses.replace(self.answer_params, max_tokens=budget,
                                                                seed=self._seed(item, turn, "answer"))

    def take(self, item: Answered, kind: str, turn: int, prompt_ids: list[int], params, completion) -> None:
        """A finished request of `item`: a user turn through the filters, or an answer cut at its stop."""
        if kind == "user":
            self.user_tokens += len(completion.token_ids)
            text = clean_user_turn(self.tokenizer.decode(completion.token_ids, skip_special_tokens=True),
                                   self.user_stops)
            truncated = completion.finish_reason == "length"
            reason = self.filter.check(f"{item.conversation.id}:{turn}", text, truncated, dedup=turn == 0)
            if reason is None:
                item.conversation.turns.append(text)
            else:
                item.alive = False
                if turn == 0:
                    item.skipped = f"self-written prompt dropped: {reason}"
            return
        kept, reason = self.stop(params.max_tokens).cut([], completion.token_ids)
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        item.answers.append(self.template.clean_answer(text))
        item.new_tokens.append(len(kept))
        item.stop_reasons.append(reason or "max_new_tokens")
        item.total_tokens = len(prompt_ids) + len(kept)
        item.prompt_ids, item.answer_ids = prompt_ids, kept

    def _advance(self, item: Answered, flying: dict) -> bool:
        """Submit `item`'s next request (True), or finish it (False: complete)."""
        request = self.next_request(item)
        if request is None:
            item.layout = token_layout(self.template, self.history(item), item.prompt_ids, item.answer_ids) \
                if item.answers else None
            return False
        self._keys += 1
        flying[self._keys] = (item, *request)
        self.backend.submit(self._keys, request[2], request[3])
        return True

    def stream(self, conversations: Iterable[Conversation], in_flight: int, stop=None,
               grace_s: float | None = None) -> Iterator[Answered]:
        """Each conversation once complete, in the order they complete, with at most `in_flight` of them at
        the backend. After `stop.requested` no new conversation starts; the ones in flight are finished, or
        after `grace_s` seconds left unwritten (a resumed run redoes them; on hf the answer running at the deadline
        still finishes). Which requests finish first depends on timing on vLLM, so the near-duplicate filter keeps
        the first prompt to finish, not the first by id."""
        pending, flying, live, stop_seen = iter(conversations), {}, 0, None
        while True:
            ready = []
            while live < in_flight and not (stop is not None and stop.requested):
                conversation = next(pending, None)
                if conversation is None:
                    break
                item = Answered(conversation)
                live += 1
                if not self._advance(item, flying):
                    ready.append(item)
            if ready:
                live -= len(ready)
                yield from ready
                continue
            if not flying:
                return
            timeout = None
            if stop is not None and stop.requested:
                stop_seen = stop_seen or time.monotonic()
                if grace_s is not None:
                    timeout = grace_s - (time.monotonic() - stop_seen)
                    if timeout <= 0:
                        log.warning("%d conversations still in flight %.0f s after the stop: left unwritten (a "
                                    "resumed run redoes them)", live, grace_s)
                        return
            try:
                finished = self.backend.poll(timeout)
            except HarnessError as exc:
                if stop is None or not stop.requested:
                    raise
                # the signal reached the backend too (a SLURM step's SIGTERM goes to vLLM's processes as well)
                log.warning("the backend ended after the stop (%s); %d conversations in flight left unwritten "
                            "(a resumed run redoes them)", exc, live)
                return
            for key, completion in finished:
                item, *request = flying.pop(key)
                self.take(item, *request, completion)
                if not self._advance(item, flying):
                    ready.append(item)
            live -= len(ready)
            yield from ready

    def run(self, conversations: list[Conversation]) -> list[Answered]:
        """All of `conversations` at once, returned in their order."""
        done = {id(item.conversation): item for item in self.stream(conversations, max(len(conversations), 1))}
        return [done[id(c)] for c in conversations]


def token_layout(template, pairs: list[tuple[str, str]], prompt_ids: list[int], answer_ids: list[int]) -> dict:
    """The tokens the target saw at the last turn (its prompt + its generated answer) and the [start, end)
    token spans of every answer in them: the last answer exactly as generated, earlier ones as the prompt
    re-tokenised them (found by text offsets, as harness.data.examples does for ShareGPT text)."""
    spans = []
    if len(pairs) > 1:
        found = answer_spans(template, pairs[:-1])
        text = template.prompt_text(pairs[:-1] + [(pairs[-1][0], None)])
        if found is not None and text.startswith(found[0]):
            encoded = template.tokenizer(text, add_special_tokens=template.add_special_tokens,
                                         return_offsets_mapping=True)
            if list(encoded["input_ids"]) == list(prompt_ids):
                for char_start, char_end in found[1]:
                    hit = [t for t, (b, e) in enumerate(encoded["offset_mapping"]) if e > b and b < char_end
                           and e > char_start]
                    if hit:
                        spans.append([hit[0], hit[-1] + 1])
    spans.append([len(prompt_ids), len(prompt_ids) + len(answer_ids)])
    return {"input_ids": list(prompt_ids) + list(answer_ids), "answer_spans": spans}


# ----------------------------------------------------------------------------------------------------- runs

def engine_seed(seed: int, done: int) -> int:
    """vLLM's engine seed for a run that starts with `done` conversations already written (its shard file and
    `extend`). A first run uses `seed` itself; a resumed or extended one a seed of its own: without per-request
    seeds (the CPU build) an engine seeded as before replays the first run's random stream, so the Magpie user
    turns it writes first come out as the first run's again and are dropped as near-duplicates (seen: 158 of
    the first 512 when growing the default model's dataset, against 25 of 5,000 before)."""
    return int(seed) if not done else stable_hash(f"{seed}:engine:{done}") % 2**31


def cpu_threads_bind(setting, tensor_parallel_size: int) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for vLLM's CPU build (a CUDA build ignores it). `all`: the worker computes on
    every core this process may use; vLLM's own `auto` keeps one core for its engine process, which on a 2-core
    machine halves the compute (measured here: 175 -> 303 generated tok/s over whole conversations). None: vLLM's
    default (also for tensor parallelism, where vLLM splits the cores per rank)."""
    if setting in (None, "auto") or tensor_parallel_size != 1:
        return None
    if setting != "all":
        return str(setting)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cores != list(range(cores[0], cores[-1] + 1)):
        return None       # not one range: leave the binding to vLLM
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])


def make_backend(cfg: DictConfig, out_dir: Path, shard_name: str, done: int = 0):
    """The generation backend and the template; vLLM gets the same weights folder the harness loads."""
    from harness.data.backends import HFBackend, VllmBackend
    from harness.model.loading import load_template, model_source

    if cfg.backend == "hf":
        loaded = load_model(cfg.model, cfg.device)
        return HFBackend(loaded, int(cfg.batch_size)), loaded.template
    if cfg.backend != "vllm":
        raise HarnessError(f"backend={cfg.backend} is not one of hf, vllm")
    settings = cfg.vllm
    folder = model_source(cfg.model)        # a local folder (model.path, the GGUF cache) or a hub id
    template = load_template(cfg.model, folder)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)}
    bind = cpu_threads_bind(settings.get("cpu_threads_bind", "all"), int(settings.tensor_parallel_size))
    if bind and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    # harness/data/vllm_worker.py: top_p_on_sampled_rows_only (CPU platforms only); "0" also overrides a "1" the
    # calling shell exported
    env["SPECDEC_VLLM_TOP_P_ROWS_ONLY"] = "1" if settings.get("top_p_rows_only", True) else "0"
    engine = {"dtype": str(settings.dtype), "tensor_parallel_size": int(settings.tensor_parallel_size),
              "max_model_len": int(cfg.max_length), "seed": engine_seed(int(cfg.seed), done),
              "trust_remote_code": bool(cfg.model.get("trust_remote_code", False)),
              "per_request_seed": bool(settings.per_request_seed),
              "engine_kwargs": OmegaConf.to_container(settings.engine_kwargs, resolve=True) or {}}
    python = str(settings.python) if settings.python else None
    backend = VllmBackend(str(folder), engine, out_dir / "logs" / f"vllm-{shard_name}.log", python, env)
    return backend, template


def record_run(meta_path: Path, summary: dict, run_id: float) -> None:
    """This run's counts and throughput in the shard's meta file, one entry per run (a resumed shard has several),
    updated in place every 30 s and at the end."""
    meta = json.loads(meta_path.read_text())
    runs = [r for r in meta.setdefault("stats", []) if r.get("run_id") != run_id]
    meta["stats"] = runs + [{**summary, "run_id": run_id, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}]
    if summary.get("vllm_version"):
        meta["backend_info"] = {"vllm": summary["vllm_version"]}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, meta_path)


def run_distill(cfg: DictConfig) -> dict:
    """One shard of a distillation (or the merge). Raises HarnessError on bad input."""
    check_settings(cfg, DISTILL)
    if cfg.merge:
        return merge(cfg)
    shard, num_shards = int(cfg.shard), int(cfg.num_shards)
    if not 0 <= shard < num_shards:
        raise HarnessError(f"shard={shard} is outside 0..{num_shards - 1}; pass shard=i num_shards=n with i < n")
    if int(cfg.batch_size) < 1 or int(cfg.max_length) < 2:
        raise HarnessError("batch_size must be >= 1 and max_length >= 2")
    if cfg.backend not in ("hf", "vllm"):
        raise HarnessError(f"backend={cfg.backend} is not one of hf, vllm")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    earlier, _ = extended_records(cfg)     # refused here, before out_dir is touched
    out_dir = Path(cfg.out_dir)
    stem = shard_stem(shard, num_shards)
    # one writer per shard file (shards of one out_dir run in parallel): a second job on this shard is refused
    # here, before the input is read, the model loads or the shard's files are touched
    with hold(out_dir, "shard or out_dir", key=stem), graceful_stop("the conversations in flight (at most stop_grace_s)") as stop:
        try:
            return _distill_shard(cfg, out_dir, stem, shard, num_shards, stop, earlier)
        except KeyboardInterrupt:   # a second signal: the conversations in flight are lost, the written ones kept
            raise Stopped(f"stopped at once by {stop.name}: the finished conversations are in "
                          f"{out_dir / (stem + '.jsonl')}; continue with: {resume_command('distill', out_dir, 'out_dir')}",
                          stop.signum or 2) from None


def _distill_shard(cfg: DictConfig, out_dir: Path, stem: str, shard: int, num_shards: int, stop,
                   earlier: list[dict]) -> dict:
    conversations, overlap = drop_eval_overlap(load_conversations(cfg), cfg)
    mine = [c for c in conversations if shard_of(c.id, num_shards) == shard]
    shard_log, done = open_shard(cfg, out_dir, shard, num_shards, {"eval_overlap": overlap})
    done_before = {r["id"] for r in earlier}
    todo = [c for c in mine if c.id not in done and c.id not in done_before]
    log.info("shard %d/%d: %d conversations, %d already done (%d of them in extend), %d to go -> %s", shard,
             num_shards, len(mine), len(mine) - len(todo), sum(shard_of(r["id"], num_shards) == shard for r in earlier),
             len(todo), shard_log.path)
    tracker = Tracker.start(cfg, out_dir, "distill", [cfg.model.name, "distill"], name=f"distill-{out_dir.name}-{stem}")
    failed, backend = True, None
    try:
        backend, template = make_backend(cfg, out_dir, stem, done=len(done) + len(earlier))
        prompt_filter = None
        if cfg.prompts != "input":
            magpie = cfg.self_prompts
            prompt_filter = PromptFilter(template, eval_overlap_checker(cfg), float(cfg.eval_overlap.max_fraction),
                                         float(magpie.dedup_threshold), int(magpie.min_chars))
            for record in earlier + shard_log.records():   # a resumed shard keeps deduplicating against what it kept
                turns = user_turns(record)
                if record.get("source") == "self" and turns:
                    prompt_filter.duplicates.add(f"{record['id']}:0", turns[0])
        distiller = Distiller(backend, template, cfg, prompt_filter)
        in_flight = int(cfg.in_flight) if cfg.in_flight else (int(cfg.batch_size) if cfg.backend == "hf" else 512)
        if in_flight > 1:  # similar lengths together: less padding in hf batches
            todo.sort(key=lambda c: len(c.turns[0]) if c.turns else 0)
        bar = tqdm(total=len(todo), desc=f"distill {stem}", unit="conv", disable=not cfg.progress, mininterval=5)
        tokens, written, started, run_id, reported = 0, 0, time.perf_counter(), time.time(), 0.0

        def progress(finished: bool) -> dict:
            elapsed = time.perf_counter() - started
            rates = {"written_now": written, "new_tokens_now": tokens, "user_tokens_now": distiller.user_tokens,
                     "seconds_now": round(elapsed, 1), "backend": cfg.backend,
                     "tokens_per_s_now": round(tokens / max(elapsed, 1e-9), 1),
                     # every generated token, the self-written user turns (kept or dropped) included
                     "generated_tokens_per_s_now": round((tokens + distiller.user_tokens) / max(elapsed, 1e-9), 1)}
            # this run's throughput so far, in the meta file: a killed run keeps its numbers
            record_run(out_dir / f"{stem}.meta.json", {**rates, "finished": finished}, run_id=run_id)
            return rates

        for item in distiller.stream(todo, in_flight, stop, float(cfg.stop_grace_s)):
            shard_log.append(item.record(cfg.model.name))     # whole conversations only
            written += 1
            tokens += sum(item.new_tokens)
            bar.update(1)
            if time.perf_counter() - reported >= 30 or written == len(todo):
                reported = time.perf_counter()
                rates = progress(False)
                bar.set_postfix(new_tok=tokens, tok_s=f"{rates['tokens_per_s_now']:.1f}",
                                all_tok_s=f"{rates['generated_tokens_per_s_now']:.1f}")
                tracker.log({"conversations": written, "new_tokens": tokens, "tokens_per_s": rates["tokens_per_s_now"],
                             "generated_tokens_per_s": rates["generated_tokens_per_s_now"]})
                if not cfg.progress:   # job logs (SLURM) still show progress
                    log.info("%s: %d/%d conversations, %d new tokens, %.1f tok/s (%.1f with the user turns)", stem,
                             written, len(todo), tokens, rates["tokens_per_s_now"], rates["generated_tokens_per_s_now"])
        bar.close()
        if stop.requested:
            progress(False)
            raise Stopped(f"stopped by {stop.name}: {written} conversations written now, {len(todo) - written} left "
                          f"(in {shard_log.path}); continue with: {resume_command('distill', out_dir, 'out_dir')}",
                          stop.signum)
        records = shard_log.records()
        summary = {"shard": shard, "num_shards": num_shards, "conversations": len(records),
                   "skipped": sum(1 for r in records if r.get("skipped")),
                   "new_tokens": sum(sum(r["new_tokens"]) for r in records), **progress(True),
                   "eval_overlap": overlap, "file": str(shard_log.path), "in_flight": in_flight,
                   "engine_seed": engine_seed(int(cfg.seed), len(done) + len(earlier)) if cfg.backend == "vllm" else None}
        if prompt_filter is not None:
            summary["self_prompts_now"] = prompt_filter.stats()
        if getattr(backend, "version", None):
            summary["vllm_version"] = backend.version
        record_run(out_dir / f"{stem}.meta.json", {**summary, "finished": True}, run_id=run_id)
        tracker.summary(summary)
        failed = False
        return summary
    finally:
        if backend is not None:
            backend.close()
        tracker.finish(failed=failed)


def merge(cfg: DictConfig) -> dict:
    """All shards -> one dataset in input order (`output` *.parquet: token ids + text and a manifest; *.json /
    *.jsonl: ShareGPT); refuses duplicates, missing (unless `merge_unfinished`) or foreign ids."""
    num_shards, out_dir = int(cfg.num_shards), Path(cfg.out_dir)
    conversations, _ = drop_eval_overlap(load_conversations(cfg), cfg)
    expected = [c.id for c in conversations]
    wanted = identity(cfg)
    metas = sorted(out_dir.glob("shard-*.meta.json"))
    if not metas:
        raise HarnessError(f"{out_dir} holds no shards; run specdec-distill with the same out_dir first")
    for meta in metas:
        check_identity(meta, wanted)
    earlier, earlier_manifest = extended_records(cfg)
    if earlier_manifest is not None:
        if manifest_path(Path(cfg.output).expanduser().resolve()) == manifest_path(Path(cfg.extend).expanduser().resolve()):
            raise HarnessError(f"output={cfg.output} would overwrite the dataset it extends (or its manifest); "
                               "merge into another folder or stem, or extend a copy")
        split = earlier_manifest.get("split") or {}
        if float(split.get("eval_fraction") or 0) != float(cfg.eval_fraction or 0) or \
                int(split.get("split_seed") or 0) != int(cfg.split_seed):
            raise HarnessError(f"extend={cfg.extend} was split with eval_fraction={split.get('eval_fraction')} "
                               f"split_seed={split.get('split_seed')}; merge with the same, so its held-out "
                               "conversations stay held out")
    by_id: dict[str, dict] = {r["id"]: r for r in earlier}
    duplicates = []
    for shard in range(num_shards):
        for record in JsonlLog(out_dir / f"{shard_stem(shard, num_shards)}.jsonl").records():
            if record["id"] in by_id:
                duplicates.append(record["id"])
            by_id[record["id"]] = record
    if duplicates:
        raise HarnessError(f"merge: {len(duplicates)} ids appear twice (e.g. {duplicates[0]}); the shards were "
                           "written by different runs - distil again into a fresh out_dir")
    missing = [i for i in expected if i not in by_id]
    if missing and not cfg.get("merge_unfinished", False):
        unfinished = sorted({shard_of(i, num_shards) for i in missing})
        raise HarnessError(f"merge: {len(missing)} of {len(expected)} conversations are missing (shards "
                           f"{', '.join(map(str, unfinished))} unfinished, num_shards={num_shards}); rerun those "
                           "shards (they resume) and merge again, or merge_unfinished=true to keep what is "
                           "finished (a later run extends it)")
    if missing:
        log.warning("merge_unfinished: %d of %d conversations not generated yet are left out; extend=%s with the "
                    "same settings generates them", len(missing), len(expected), cfg.output)
        expected = [i for i in expected if i in by_id]
    foreign = set(by_id) - set(expected)
    if foreign:
        raise HarnessError(f"merge: {len(foreign)} conversations in {out_dir} are not in the selected input "
                           f"(e.g. {sorted(foreign)[0]}); merge with the settings the shards were made with")
    records = [by_id[i] for i in expected if not by_id[i].get("skipped")]
    records, cross_duplicates = drop_cross_shard_duplicates(records, cfg)
    output = Path(cfg.output)
    parquet = is_token_dataset(output)
    write = write_parquet if parquet else write_sharegpt
    write(records, output)
    summary = {"conversations": len(records), "skipped": len(expected) - len(records), "output": str(output),
               "new_tokens": sum(sum(r["new_tokens"]) for r in records), "unfinished": len(missing)}
    splits = {"all": records}
    if cfg.eval_fraction:
        is_eval = [stable_hash(f"{cfg.split_seed}:{r['id']}") % 10**6 < float(cfg.eval_fraction) * 10**6
                   for r in records]
        stem = output.with_suffix("")
        splits["train"] = [r for r, e in zip(records, is_eval) if not e]
        splits["eval"] = [r for r, e in zip(records, is_eval) if e]
        train = write(splits["train"], f"{stem}.train{output.suffix}")
        held = write(splits["eval"], f"{stem}.eval{output.suffix}")
        summary.update(train=str(train), eval=str(held), eval_conversations=sum(is_eval))
    if parquet:
        manifest = dataset_manifest(cfg, metas, splits, summary, cross_duplicates)
        if earlier_manifest is not None:   # the dataset's whole history: the runs of the set it extends first
            manifest["extends"] = {"path": str(cfg.extend), "sha256": earlier_manifest["files"]["all"]["sha256"],
                                   "conversations": len(earlier),
                                   "generated_tokens": earlier_manifest["counts"]["all"]["generated_tokens"],
                                   "commit": earlier_manifest.get("commit"),
                                   "backend": earlier_manifest.get("backend"), "dtype": earlier_manifest.get("dtype"),
                                   "backend_info": earlier_manifest.get("backend_info"),
                                   "extends": earlier_manifest.get("extends")}   # its own parent, and so on
            manifest["distill_runs"] = list(earlier_manifest.get("distill_runs") or []) + manifest["distill_runs"]
        summary["manifest"] = str(write_manifest(output, manifest))
    log.info("merged %d conversations (%d skipped: no room under max_length or a dropped self-written prompt) "
             "into %s", len(records), summary["skipped"], output)
    # the dataset as a W&B artifact (its files: whole set, splits, manifest); a training run on one of them
    # declares it as input, so lineage reads dataset -> train run -> head -> bench runs
    tracker = Tracker.start(cfg, out_dir, "distill", [cfg.model.name, "dataset"], name=f"merge-{out_dir.name}")
    try:
        name, files = dataset_artifact(output)
        tracker.artifact(name, "dataset", files,
                         metadata={k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    finally:
        tracker.finish()
    return summary


def dataset_artifact(path: str | Path) -> tuple[str, list[Path]]:
    """The W&B artifact of a merged dataset, from any of its files (whole, .train, .eval): its name
    (`dataset-<stem>`) and files (the whole set, the splits, the manifest; those that exist). `merge` logs it, a
    training run on one of its files uses it: the same name and files, so the same artifact version."""
    path = Path(path)
    stem, suffix = path.name, path.suffix
    stem = stem.removesuffix(suffix).removesuffix(".train").removesuffix(".eval")
    files = [path.with_name(f"{stem}{part}{suffix}") for part in ("", ".train", ".eval")]
    files.append(manifest_path(path))    # where merge writes it (a dotted stem `d.v2` shares `d.manifest.json`)
    return f"dataset-{stem}", [f for f in files if f.is_file()]


def drop_cross_shard_duplicates(records: list[dict], cfg: DictConfig) -> tuple[list[dict], int]:
    """Shards deduplicate their own self-written prompts; across shards the merge does (first one kept)."""
    if cfg.prompts == "input" or int(cfg.num_shards) == 1:
        return records, 0
    index, kept, dropped = NearDuplicates(float(cfg.self_prompts.dedup_threshold)), [], 0
    for record in records:
        turns = user_turns(record)
        if record.get("source") == "self" and turns and not index.add(record["id"], turns[0]):
            dropped += 1
            continue
        kept.append(record)
    if dropped:
        log.info("merge: %d self-written conversations near-duplicate another shard's; dropped", dropped)
    return kept, dropped


def dataset_manifest(cfg: DictConfig, metas: list[Path], splits: dict[str, list[dict]], summary: dict,
                     cross_duplicates: int) -> dict:
    """What made the dataset and what it holds, with the sha256 of every file."""
    shard_meta = [json.loads(m.read_text()) for m in metas]
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def counts(records: list[dict]) -> dict:
        by_source = {}
        for record in records:
            by_source[record.get("source", "input")] = by_source.get(record.get("source", "input"), 0) + 1
        return {"conversations": len(records), "by_source": by_source,
                "turns": sum(len(r["new_tokens"]) for r in records),
                "two_turn_conversations": sum(1 for r in records if len(r["new_tokens"]) >= 2),
                "generated_tokens": sum(sum(r["new_tokens"]) for r in records),
                "tokens": sum(len(r.get("input_ids") or []) for r in records),
                "answers_at_token_cap": sum(s == "max_new_tokens" for r in records for s in r["stop_reasons"])}

    files = {name: summary[name if name != "all" else "output"] for name in splits}
    return {"model": cfg.model.name, "model_source": shard_meta[0]["config"]["model"],
            "backend": [m["config"].get("backend", "hf") for m in shard_meta][0],
            "backend_info": [m.get("backend_info") for m in shard_meta][0],
            "dtype": (resolved.get("vllm") or {}).get("dtype") if cfg.backend == "vllm" else cfg.model.get("dtype"),
            "answers_sampling": resolved["decoding"], "seed": cfg.seed, "max_length": cfg.max_length,
            "max_new_tokens": cfg.max_new_tokens, "prompts": cfg.prompts,
            "prompt_source": source_identity(cfg), "self_prompts": resolved["self_prompts"] if cfg.prompts != "input"
            else None, "eval_overlap": {**resolved["eval_overlap"], "eval_bench": cfg.eval_bench.name,
                                        "dropped_input_prompts": shard_meta[0].get("eval_overlap")},
            "cross_shard_duplicates_dropped": cross_duplicates, "num_shards": int(cfg.num_shards),
            # merge_unfinished: conversations of the selected input not generated yet (a later extend= does them)
            "unfinished_conversations": summary.get("unfinished", 0),
            "split": {"eval_fraction": cfg.eval_fraction, "split_seed": cfg.split_seed},
            "counts": {name: counts(records) for name, records in splits.items()},
            "files": {name: {"path": Path(path).name, "sha256": sha256_of(path), "bytes": Path(path).stat().st_size}
                      for name, path in files.items()},
            "distill_runs": [m.get("stats") for m in shard_meta], "commit": git_commit()}


main = hydra_app("distill", run_distill, lambda summary: print(json.dumps(summary, indent=1)))


if __name__ == "__main__":
    main()
