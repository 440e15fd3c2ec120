"""`specdec-distill`: regenerate the assistant turns of a ShareGPT file or a question file with the target
model itself (self-distillation data for Medusa, ours and EAGLE heads: a head learns what *this* model
says, not what ChatGPT said).

    specdec-distill out_dir=data/distill/specbench                      # Spec-Bench minus MT-Bench (default)
    specdec-distill data_path=ShareGPT_V4.3_unfiltered_cleaned_split.json max_length=2048 out_dir=data/sg
    specdec-distill -m shard=0,1,2,3 num_shards=4 out_dir=data/sg ...     # 4 jobs (SLURM array / multirun)
    specdec-distill merge=true num_shards=4 out_dir=data/sg eval_fraction=0.05   # final ShareGPT file(s)

Each human turn is followed by the model's own answer: turn 1 is answered, the answer appended, then
turn 2 is answered with it in the prompt (as MT-Bench prompts are built). `max_length` bounds the tokens
of the whole conversation: a turn whose prompt leaves no room ends the conversation there.

A shard appends one conversation a line to `out_dir/shard-<i>-of-<n>.jsonl`, fsync'd per conversation, so
a killed job loses at most the conversation in flight; rerunning the same command skips finished ids.
Conversations go to shard `sha1(id) mod n`, so a shard's share does not depend on the input order.

Generation: batch_size=1 uses the harness loop (`decode_turn` with the vanilla `Proposer`), the same
greedy tokens the benchmark's vanilla runs produce. batch_size>1 uses transformers `generate` with left
padding (for GPUs); padded batches may differ from batch 1 in the last bits of fp16 logits, which is
harmless for training data but means the two paths are not token-identical there.

First human turns that appear in the evaluation benchmark (MT-Bench, Spec-Bench ids 81-160; compared after
`sharegpt.normalise`) are dropped with one line saying how many, unless `allow_eval_overlap=true`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from harness.acceptance import Sampling
from harness.app import hydra_app
from harness.data import load_questions
from harness.decoding import Proposer, StopCriteria, decode_turn
from harness.errors import HarnessError
from harness.models import LoadedModel, load_model
from harness.sharegpt import JsonlLog, normalise, read_sharegpt, user_turns, write_sharegpt
from harness.target import Target
from harness.tracking import Tracker

log = logging.getLogger(__name__)

# Settings that must agree between a shard file and a run that continues or merges it
IDENTITY_KEYS = ("model", "source", "decoding", "max_length", "max_new_tokens", "seed", "allow_eval_overlap")


@dataclass
class Conversation:
    id: str
    turns: list[str]                     # human turns, in order
    category: str | None = None


@dataclass
class Answered:
    """One conversation with the model's own answers; `record()` is its ShareGPT line."""
    conversation: Conversation
    answers: list[str] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    stop_reasons: list[str] = field(default_factory=list)
    total_tokens: int = 0                # prompt of the last answered turn + its answer
    seconds: float = 0.0

    def record(self, model_name: str) -> dict:
        turns = []
        for user, answer in zip(self.conversation.turns, self.answers):
            turns += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
        record = {"id": self.conversation.id, "conversations": turns, "model": model_name,
                  "new_tokens": self.new_tokens, "stop_reasons": self.stop_reasons,
                  "total_tokens": self.total_tokens}
        if self.conversation.category is not None:
            record["category"] = self.conversation.category
        if not self.answers:
            record["skipped"] = "first prompt leaves no room under max_length"
        return record


def stable_hash(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16)


def shard_of(conversation_id: str, num_shards: int) -> int:
    return stable_hash(conversation_id) % num_shards


# ----------------------------------------------------------------------------------------------------- input

def source_identity(cfg: DictConfig) -> dict:
    if cfg.data_path:
        return {"data_path": str(Path(cfg.data_path).expanduser().resolve())}
    bench = OmegaConf.to_container(cfg.bench, resolve=True)
    return {"questions": {k: bench.get(k) for k in ("name", "id_range", "question_ids", "categories", "limit",
                                                    "max_turns")}}


def load_conversations(cfg: DictConfig) -> list[Conversation]:
    """The input, ids unique (a repeated id keeps its first conversation), empty conversations dropped."""
    if cfg.data_path:
        found = [Conversation(r["id"], user_turns(r)) for r in read_sharegpt(cfg.data_path)]
    else:
        found = [Conversation(str(q.question_id), list(q.turns), q.category) for q in load_questions(cfg.bench)]
    seen, conversations, repeated = set(), [], 0
    for conversation in found:
        if conversation.id in seen:
            repeated += 1
            continue
        seen.add(conversation.id)
        if conversation.turns:
            conversations.append(conversation)
    if repeated:
        log.warning("%d conversations repeat an earlier id; kept the first of each", repeated)
    if not conversations:
        raise HarnessError("the input holds no conversation with a human turn; check data_path / bench selection")
    return conversations


def drop_eval_overlap(conversations: list[Conversation], cfg: DictConfig) -> tuple[list[Conversation], int]:
    """Drop conversations whose first human turn is an evaluation question (normalised text match)."""
    try:
        eval_questions = load_questions(cfg.eval_bench)
    except HarnessError:
        if cfg.allow_eval_overlap:
            log.warning("eval overlap: not checked (no %s question file) and allowed by allow_eval_overlap=true",
                        cfg.eval_bench.name)
            return conversations, 0
        raise
    eval_texts = {normalise(turn): q.question_id for q in eval_questions for turn in q.turns}
    overlapping = [c for c in conversations if normalise(c.turns[0]) in eval_texts]
    if not overlapping:
        log.info("eval overlap: none of %d prompts appears in %s", len(conversations), cfg.eval_bench.name)
        return conversations, 0
    ids = sorted({eval_texts[normalise(c.turns[0])] for c in overlapping})
    shown = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
    if cfg.allow_eval_overlap:
        log.warning("eval overlap: %d of %d prompts appear in %s (question ids %s); KEPT because "
                    "allow_eval_overlap=true", len(overlapping), len(conversations), cfg.eval_bench.name, shown)
        return conversations, len(overlapping)
    log.warning("eval overlap: %d of %d prompts appear in %s (question ids %s); refused them (no training on "
                "the benchmark; allow_eval_overlap=true keeps them)", len(overlapping), len(conversations),
                cfg.eval_bench.name, shown)
    dropped = {c.id for c in overlapping}
    return [c for c in conversations if c.id not in dropped], len(overlapping)


# ----------------------------------------------------------------------------------------------------- shards

def shard_stem(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def identity(cfg: DictConfig) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {"model": cfg.model.name, "source": source_identity(cfg), "decoding": resolved["decoding"],
            "max_length": cfg.max_length, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
            "allow_eval_overlap": bool(cfg.allow_eval_overlap)}


def check_identity(meta_path: Path, wanted: dict) -> None:
    old = json.loads(meta_path.read_text())["identity"]
    changed = [k for k in IDENTITY_KEYS if old.get(k) != wanted.get(k)]
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
    tmp.write_text(json.dumps({"identity": wanted, "shard": shard, "num_shards": num_shards,
                               "config": OmegaConf.to_container(cfg, resolve=True), **extra}, indent=2, default=str))
    os.replace(tmp, meta)
    return shard_log, done


# ----------------------------------------------------------------------------------------------------- generation

class Distiller:
    """Answers conversations turn by turn with the target; one at a time (harness loop) or batched (generate)."""

    def __init__(self, loaded: LoadedModel, cfg: DictConfig):
        self.loaded, self.template, self.tokenizer = loaded, loaded.template, loaded.tokenizer
        self.target = Target(loaded.model)
        self.sampling = Sampling(float(cfg.decoding.temperature), float(cfg.decoding.top_p))
        self.max_length = int(cfg.max_length)
        self.max_new_tokens = int(cfg.max_new_tokens) if cfg.max_new_tokens else None
        self.seed = int(cfg.seed)
        self.stop_ids = frozenset(self.template.stop_token_ids)

    def budget(self, prompt_len: int) -> int:
        room = self.max_length - prompt_len
        return min(room, self.max_new_tokens) if self.max_new_tokens else room

    def stop(self, budget: int) -> StopCriteria:
        return StopCriteria(self.stop_ids, tuple(self.template.stop_strings), self.tokenizer, budget)

    def finish_turn(self, item: Answered, user: str, prompt_len: int, token_ids: list[int], reason: str) -> None:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        item.answers.append(self.template.clean_answer(text))
        item.new_tokens.append(len(token_ids))
        item.stop_reasons.append(reason)
        item.total_tokens = prompt_len + len(token_ids)

    def history(self, item: Answered) -> list[tuple[str, str | None]]:
        return list(zip(item.conversation.turns, item.answers))

    def answer_one(self, conversation: Conversation) -> Answered:
        """The harness loop, batch 1: the same tokens as the benchmark's vanilla runs."""
        item, start = Answered(conversation), time.perf_counter()
        generator = torch.Generator(device=self.target.device).manual_seed(
            self.seed * 1_000_003 + stable_hash(conversation.id) % 2**31)
        for user in conversation.turns:
            prompt_ids = self.template.encode(self.history(item) + [(user, None)])
            budget = self.budget(len(prompt_ids))
            if budget <= 0:
                break
            result = decode_turn(self.target, Proposer(), prompt_ids, self.sampling, self.stop(budget), generator)
            self.finish_turn(item, user, len(prompt_ids), result.token_ids, result.stop_reason)
        item.seconds = time.perf_counter() - start
        return item

    @torch.inference_mode()
    def answer_batch(self, conversations: list[Conversation]) -> list[Answered]:
        """transformers `generate` over a left-padded batch, one turn index at a time."""
        from transformers import GenerationConfig

        items, start = [Answered(c) for c in conversations], time.perf_counter()
        active = list(range(len(items)))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.stop_ids or {0})
        turn = 0
        while active:
            rows = []
            for index in active:
                item = items[index]
                if turn >= len(item.conversation.turns):
                    continue
                user = item.conversation.turns[turn]
                prompt_ids = self.template.encode(self.history(item) + [(user, None)])
                if self.budget(len(prompt_ids)) > 0:
                    rows.append((index, user, prompt_ids))
            if not rows:
                break
            width = max(len(p) for _, _, p in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for row, (_, _, prompt_ids) in enumerate(rows):
                input_ids[row, width - len(prompt_ids):] = torch.tensor(prompt_ids)
                attention[row, width - len(prompt_ids):] = 1
            longest = max(self.budget(len(p)) for _, _, p in rows)
            greedy = self.sampling.temperature == 0
            config = GenerationConfig(max_new_tokens=longest, do_sample=not greedy,
                                      temperature=None if greedy else self.sampling.temperature,
                                      top_p=None if greedy else self.sampling.top_p, top_k=None,
                                      eos_token_id=sorted(self.stop_ids) or None, pad_token_id=pad_id)
            if not greedy:  # reproducible for the same batches; not per conversation as at batch 1
                torch.manual_seed(self.seed * 1_000_003 + stable_hash(conversations[rows[0][0]].id) % 2**31 + turn)
            out = self.loaded.model.generate(input_ids=input_ids.to(self.target.device),
                                             attention_mask=attention.to(self.target.device),
                                             generation_config=config)
            new = out[:, width:].tolist()
            for (index, user, prompt_ids), tokens in zip(rows, new):
                kept, reason = self.stop(self.budget(len(prompt_ids))).cut([], tokens)
                self.finish_turn(items[index], user, len(prompt_ids), kept, reason or "max_new_tokens")
            active = [index for index, _, _ in rows]
            turn += 1
        seconds = (time.perf_counter() - start) / max(len(items), 1)
        for item in items:
            item.seconds = seconds
        return items


# ----------------------------------------------------------------------------------------------------- runs

def run_distill(cfg: DictConfig) -> dict:
    """One shard of a distillation (or the merge). Raises HarnessError on bad input."""
    if cfg.merge:
        return merge(cfg)
    shard, num_shards = int(cfg.shard), int(cfg.num_shards)
    if not 0 <= shard < num_shards:
        raise HarnessError(f"shard={shard} is outside 0..{num_shards - 1}; pass shard=i num_shards=n with i < n")
    if int(cfg.batch_size) < 1 or int(cfg.max_length) < 2:
        raise HarnessError("batch_size must be >= 1 and max_length >= 2")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    conversations, overlap = drop_eval_overlap(load_conversations(cfg), cfg)
    mine = [c for c in conversations if shard_of(c.id, num_shards) == shard]
    out_dir = Path(cfg.out_dir)
    shard_log, done = open_shard(cfg, out_dir, shard, num_shards, {"eval_overlap": overlap})
    todo = [c for c in mine if c.id not in done]
    log.info("shard %d/%d: %d conversations, %d already done, %d to go -> %s", shard, num_shards, len(mine),
             len(mine) - len(todo), len(todo), shard_log.path)
    tracker = Tracker.start(cfg, out_dir, "distill", [cfg.model.name, "distill"],
                            name=f"distill-{out_dir.name}-{shard_stem(shard, num_shards)}")
    failed = True
    try:
        distiller = Distiller(load_model(cfg.model, cfg.device), cfg)
        batch = int(cfg.batch_size)
        if batch > 1:  # similar lengths together: less padding
            todo.sort(key=lambda c: len(c.turns[0]))
        bar = tqdm(total=len(todo), desc=f"distill {shard_stem(shard, num_shards)}", unit="conv",
                   disable=not cfg.progress)
        tokens, seconds, written = 0, 0.0, 0
        for first in range(0, len(todo), batch):
            chunk = todo[first: first + batch]
            items = [distiller.answer_one(chunk[0])] if batch == 1 else distiller.answer_batch(chunk)
            for item in items:
                shard_log.append(item.record(cfg.model.name))
                written += 1
                tokens += sum(item.new_tokens)
                seconds += item.seconds
                tracker.log({"new_tokens": sum(item.new_tokens), "turns": len(item.answers),
                             "tokens_per_s": sum(item.new_tokens) / max(item.seconds, 1e-9)})
            bar.update(len(items))
            bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.1f}")
        bar.close()
        records = shard_log.records()
        summary = {"shard": shard, "num_shards": num_shards, "conversations": len(records),
                   "written_now": written, "skipped": sum(1 for r in records if r.get("skipped")),
                   "new_tokens": sum(sum(r["new_tokens"]) for r in records), "eval_overlap": overlap,
                   "file": str(shard_log.path)}
        tracker.summary(summary)
        failed = False
        return summary
    finally:
        tracker.finish(failed=failed)


def merge(cfg: DictConfig) -> dict:
    """All shards -> one ShareGPT file in input order; refuses duplicates, missing or foreign ids."""
    num_shards, out_dir = int(cfg.num_shards), Path(cfg.out_dir)
    conversations, _ = drop_eval_overlap(load_conversations(cfg), cfg)
    expected = [c.id for c in conversations]
    wanted = identity(cfg)
    metas = sorted(out_dir.glob("shard-*.meta.json"))
    if not metas:
        raise HarnessError(f"{out_dir} holds no shards; run specdec-distill with the same out_dir first")
    for meta in metas:
        check_identity(meta, wanted)
    by_id: dict[str, dict] = {}
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
    if missing:
        unfinished = sorted({shard_of(i, num_shards) for i in missing})
        raise HarnessError(f"merge: {len(missing)} of {len(expected)} conversations are missing (shards "
                           f"{', '.join(map(str, unfinished))} unfinished, num_shards={num_shards}); rerun those "
                           "shards (they resume) and merge again")
    foreign = set(by_id) - set(expected)
    if foreign:
        raise HarnessError(f"merge: {len(foreign)} conversations in {out_dir} are not in the selected input "
                           f"(e.g. {sorted(foreign)[0]}); merge with the settings the shards were made with")
    records = [by_id[i] for i in expected if not by_id[i].get("skipped")]
    output = write_sharegpt(records, cfg.output)
    summary = {"conversations": len(records), "skipped": len(expected) - len(records), "output": str(output),
               "new_tokens": sum(sum(r["new_tokens"]) for r in records)}
    if cfg.eval_fraction:
        is_eval = [stable_hash(f"{cfg.split_seed}:{r['id']}") % 10**6 < float(cfg.eval_fraction) * 10**6
                   for r in records]
        stem = output.with_suffix("")
        train = write_sharegpt([r for r, e in zip(records, is_eval) if not e], f"{stem}.train{output.suffix}")
        held = write_sharegpt([r for r, e in zip(records, is_eval) if e], f"{stem}.eval{output.suffix}")
        summary.update(train=str(train), eval=str(held), eval_conversations=sum(is_eval))
    log.info("merged %d conversations (%d skipped: no room under max_length) into %s", len(records),
             summary["skipped"], output)
    return summary


main = hydra_app("distill", run_distill, lambda summary: print(json.dumps(summary, indent=1)))


if __name__ == "__main__":
    main()
