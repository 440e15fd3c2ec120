"""specdec-distill on a tiny chat model: own answers turn by turn, resume after a kill, shards + merge,
the MT-Bench overlap refusal, batched generate == the harness loop."""

from __future__ import annotations

import json
import logging

import pytest
from omegaconf import open_dict

from conftest import compose_config
from harness.engine.acceptance import Sampling
from harness.engine.loop import Proposer, StopCriteria, decode_turn
from harness.distill import Distiller, run_distill, shard_of
from harness.data.backends import HFBackend
from harness.infra.errors import HarnessError
from harness.infra.signals import Stopped
from harness.model.loading import load_model
from harness.data.sharegpt import JsonlLog, read_sharegpt, write_sharegpt
from harness.engine.target import Target
from helpers import MT_BENCH_81, distill_cfg, sharegpt_input


def test_each_turn_is_answered_with_the_models_own_previous_answers(chat_model, questions_path, tmp_path):
    data = sharegpt_input(tmp_path / "in.json", count=3)
    cfg = distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "max_length=96",
                      "max_new_tokens=16")
    summary = run_distill(cfg)
    assert summary["conversations"] == 3 and summary["skipped"] == 0
    records = {r["id"]: r for r in JsonlLog(summary["file"]).records()}
    two_turns = records["c0"]["conversations"]
    assert [m["from"] for m in two_turns] == ["human", "gpt", "human", "gpt"]
    assert "old" not in (two_turns[1]["value"], two_turns[3]["value"])

    # the same answers by hand: turn 2's prompt carries the model's own turn-1 answer
    loaded = load_model(cfg.model, "cpu")
    target, template = Target(loaded.model), loaded.template
    history = []
    for turn, message in zip(range(2), two_turns[0::2]):
        prompt = template.encode(history + [(message["value"], None)])
        result = decode_turn(target, Proposer(), prompt, Sampling(),
                             StopCriteria(frozenset(template.stop_token_ids), (), loaded.tokenizer, 16))
        answer = template.clean_answer(loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True))
        assert answer == two_turns[2 * turn + 1]["value"]
        assert records["c0"]["new_tokens"][turn] == len(result.token_ids)
        history.append((message["value"], answer))


def test_max_length_bounds_the_whole_conversation(chat_model, questions_path, tmp_path):
    data = sharegpt_input(tmp_path / "in.json", count=3)
    summary = run_distill(distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "max_length=60"))
    for record in JsonlLog(summary["file"]).records():
        assert record["total_tokens"] <= 60
        # turn 1 fills the conversation up to max_length, so a second turn never fits
        assert len(record["conversations"]) == 2 and record["stop_reasons"] == ["max_new_tokens"]
    cfg = distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "max_length=20",
                      f"out_dir={tmp_path / 'short'}")
    summary = run_distill(cfg)
    assert summary["skipped"] == 3   # prompts longer than max_length: marked done, left out of the merge
    with open_dict(cfg):
        cfg.merge = True
    assert run_distill(cfg)["conversations"] == 0


def test_resume_after_a_kill_skips_finished_ids_and_duplicates_nothing(chat_model, questions_path, tmp_path,
                                                                      monkeypatch):
    data = sharegpt_input(tmp_path / "in.json", count=5)
    cfg = distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "max_new_tokens=8")
    real, calls = HFBackend.poll, []
    shard_file = tmp_path / "out" / "shard-00000-of-00001.jsonl"

    def dies_on_the_third(self, timeout_s=None):
        calls.append([key for key, _, _ in self.queue])   # batch_size=1: one conversation at a time
        if len(JsonlLog(shard_file).records()) == 2:
            raise KeyboardInterrupt  # a kill while conversation 3 is being generated
        return real(self, timeout_s)

    monkeypatch.setattr(HFBackend, "poll", dies_on_the_third)
    with pytest.raises(Stopped, match="stopped at once"):
        run_distill(cfg)
    assert {len(c) for c in calls} == {1}
    before = JsonlLog(shard_file).records()
    assert len(before) == 2
    with open(shard_file, "a") as handle:   # and a torn line from a kill in the middle of a write
        handle.write('{"id": "c4", "conversa')
    monkeypatch.setattr(HFBackend, "poll", real)
    summary = run_distill(cfg)
    after = JsonlLog(shard_file).records()
    assert summary["written_now"] == 3
    assert sorted(r["id"] for r in after) == [f"c{i}" for i in range(5)]   # each id exactly once
    assert after[:2] == before


def test_resume_refuses_other_settings(chat_model, questions_path, tmp_path):
    data = sharegpt_input(tmp_path / "in.json", count=2)
    run_distill(distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "max_new_tokens=4"))
    with pytest.raises(HarnessError, match="different max_length"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "max_new_tokens=4",
                                "max_length=80"))


def test_shards_partition_the_input_and_merge_checks_completeness(chat_model, questions_path, tmp_path):
    data = sharegpt_input(tmp_path / "in.json", count=8)
    common = [f"data_path={data}", "max_new_tokens=4", "num_shards=2", "eval_fraction=0.25"]
    run_distill(distill_cfg(chat_model, questions_path, tmp_path, *common, "shard=0"))
    with pytest.raises(HarnessError, match=r"merge: \d+ of 8 conversations are missing \(shards 1 unfinished"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, *common, "merge=true"))
    run_distill(distill_cfg(chat_model, questions_path, tmp_path, *common, "shard=1"))
    summary = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *common, "merge=true"))

    merged = read_sharegpt(summary["output"])
    assert [r["id"] for r in merged] == [f"c{i}" for i in range(8)]       # input order, no duplicates
    for shard in (0, 1):
        ids = [r["id"] for r in JsonlLog(tmp_path / "out" / f"shard-0000{shard}-of-00002.jsonl").records()]
        assert ids and all(shard_of(i, 2) == shard for i in ids)
    train, held = read_sharegpt(summary["train"]), read_sharegpt(summary["eval"])
    assert sorted(r["id"] for r in train + held) == sorted(r["id"] for r in merged)
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    with pytest.raises(HarnessError, match="another num_shards"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}", "max_new_tokens=4",
                                "num_shards=3"))


def test_an_unfinished_run_is_merged_and_a_later_run_extends_it(chat_model, questions_path, tmp_path):
    """merge_unfinished=true: what is finished becomes a dataset a machine can keep (commit) before it goes; a run
    on another machine extends it and generates only what was left."""
    from harness.data.token_data import read_parquet

    data = sharegpt_input(tmp_path / "in.json", count=6)
    common = [f"data_path={data}", "max_new_tokens=4", "num_shards=2", "eval_fraction=0.5"]
    run_distill(distill_cfg(chat_model, questions_path, tmp_path, *common, "shard=0"))      # shard 1 never ran
    done = [r["id"] for r in JsonlLog(tmp_path / "out" / "shard-00000-of-00002.jsonl").records()]
    partial = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *common, "merge=true",
                                      "merge_unfinished=true", f"output={tmp_path / 'part' / 'd.parquet'}"))
    assert read_parquet(partial["output"])["id"] == done and partial["unfinished"] == 6 - len(done) > 0
    assert json.loads(open(partial["manifest"]).read())["unfinished_conversations"] == 6 - len(done)

    grown = [*common, f"out_dir={tmp_path / 'later'}", f"extend={partial['output']}"]
    written = [run_distill(distill_cfg(chat_model, questions_path, tmp_path, *grown, f"shard={k}"))["written_now"]
               for k in (0, 1)]
    assert written == [0, 6 - len(done)]
    whole = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *grown, "merge=true",
                                    f"output={tmp_path / 'whole' / 'd.parquet'}"))
    assert read_parquet(whole["output"])["id"] == [f"c{i}" for i in range(6)] and whole["unfinished"] == 0


def test_mt_bench_prompts_are_refused_unless_allowed(chat_model, questions_path, tmp_path, caplog):
    records = [{"id": "leak", "conversations": [{"from": "human", "value": "  " + MT_BENCH_81.upper() + "!! "}]},
               {"id": "fine", "conversations": [{"from": "human", "value": "hello world"}]}]
    data = write_sharegpt(records, tmp_path / "in.jsonl")
    with caplog.at_level(logging.WARNING):
        summary = run_distill(distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}",
                                          "max_new_tokens=4"))
    assert summary["eval_overlap"] == 1 and summary["conversations"] == 1
    assert [r["id"] for r in JsonlLog(summary["file"]).records()] == ["fine"]
    line = [r.getMessage() for r in caplog.records if "eval overlap" in r.getMessage()]
    assert line == ["eval overlap: 1 of 2 prompts overlap mt_bench (ids leak); refused them (no training on the "
                    "benchmark; allow_eval_overlap=true keeps them)"]
    allowed = run_distill(distill_cfg(chat_model, questions_path, tmp_path, f"data_path={data}",
                                      "max_new_tokens=4", "allow_eval_overlap=true", f"out_dir={tmp_path / 'a'}"))
    assert allowed["conversations"] == 2 and allowed["eval_overlap"] == 1


def test_question_file_input_selects_categories_and_never_mt_bench(chat_model, questions_path, tmp_path):
    cfg = distill_cfg(chat_model, questions_path, tmp_path, "bench.categories=[qa,writing]", "max_length=40",
                      "max_new_tokens=2")
    with open_dict(cfg):
        cfg.bench.question_ids = [81, 82, 321, 322]   # writing = MT-Bench; refused by text, not by id
    summary = run_distill(cfg)
    records = JsonlLog(summary["file"]).records()
    assert summary["eval_overlap"] == 2
    assert sorted(r["id"] for r in records) == ["321", "322"] and {r["category"] for r in records} == {"qa"}


def test_batched_generate_matches_the_harness_loop(chat_model, questions_path, tmp_path):
    cfg = distill_cfg(chat_model, questions_path, tmp_path, "max_length=80", "max_new_tokens=12")
    loaded = load_model(cfg.model, "cpu")
    data = sharegpt_input(tmp_path / "in.json", count=4)
    from harness.distill import Conversation
    from harness.data.backends import HFBackend
    from harness.data.sharegpt import user_turns

    def conversations():
        found = [Conversation(r["id"], user_turns(r)) for r in read_sharegpt(data)]
        found[1].turns[0] += " please answer the question about the red car and the blue house"
        return found

    one_by_one = Distiller(HFBackend(loaded, 1), loaded.template, cfg, None).run(conversations())
    # different prompt lengths: real left padding
    batched = Distiller(HFBackend(loaded, 4), loaded.template, cfg, None).run(conversations())
    assert [b.answers for b in batched] == [o.answers for o in one_by_one]
    assert [b.new_tokens for b in batched] == [o.new_tokens for o in one_by_one]


@pytest.mark.integration
def test_real_model_distils_two_questions(questions_path, tmp_path):
    cfg = compose_config(f"bench.path={questions_path}", "logger=none", f"out_dir={tmp_path}", "max_length=256",
                         "max_new_tokens=12", "bench.limit=2", "device=cpu", "progress=false",
                         config_name="distill")
    summary = run_distill(cfg)
    records = JsonlLog(summary["file"]).records()
    assert len(records) == 2 and all(0 < r["new_tokens"][0] <= 12 for r in records)
    assert all(r["conversations"][1]["value"].strip() for r in records)
    with open_dict(cfg):
        cfg.merge = True
    merged = run_distill(cfg)
    assert [r["id"] for r in json.loads((tmp_path / "distilled.json").read_text())] == ["161", "162"]
    assert merged["conversations"] == 2


def test_extend_grows_a_merged_dataset_without_its_shard_files(chat_model, questions_path, tmp_path):
    """A fresh machine keeps only the merged parquet: `extend=` counts its conversations as done, generates only
    the new ones, and the merge writes the old rows back unchanged, with the dataset's whole history."""
    from harness.data.token_data import read_parquet, sha256_of

    data = sharegpt_input(tmp_path / "in.json", count=4)
    first = [f"data_path={data}", "max_new_tokens=4", f"output={tmp_path / 'v1' / 'd.parquet'}", "eval_fraction=0.5"]
    run_distill(distill_cfg(chat_model, questions_path, tmp_path, *first))
    old = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *first, "merge=true"))
    old_rows = read_parquet(old["output"])
    manifest = json.loads(open(old["manifest"]).read())   # a set merged before the seed was recorded still grows
    del manifest["seed"]
    open(old["manifest"], "w").write(json.dumps(manifest))

    data = sharegpt_input(tmp_path / "in.json", count=6)          # the input grew by two conversations
    grown = [f"data_path={data}", "max_new_tokens=4", f"out_dir={tmp_path / 'fresh'}", f"extend={old['output']}",
             f"output={tmp_path / 'v2' / 'd.parquet'}", "eval_fraction=0.5"]
    summary = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *grown))
    assert summary["written_now"] == 2
    assert [r["id"] for r in JsonlLog(summary["file"]).records()] == ["c4", "c5"]
    new = run_distill(distill_cfg(chat_model, questions_path, tmp_path, *grown, "merge=true"))
    rows = read_parquet(new["output"])
    assert rows["id"] == [f"c{i}" for i in range(6)]
    for column, values in old_rows.items():           # the old conversations, byte for byte the same row
        assert rows[column][:4] == values, column
    manifest = json.loads(open(new["manifest"]).read())
    assert manifest["extends"]["sha256"] == sha256_of(old["output"]) and manifest["extends"]["conversations"] == 4
    assert manifest["counts"]["all"]["conversations"] == 6 and len(manifest["distill_runs"]) == 2
    old_eval = set(read_parquet(old["eval"])["id"])    # the split is a hash of the id: old eval ids stay eval
    assert old_eval <= set(read_parquet(new["eval"])["id"])

    # refused in one line, before any generation: other settings, a split instead of the whole set, no manifest
    with pytest.raises(HarnessError, match="other max_new_tokens"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, *grown[1:], "max_new_tokens=5",
                                f"data_path={data}", f"out_dir={tmp_path / 'other'}"))
    with pytest.raises(HarnessError, match="not the whole set"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, *grown, f"extend={old['train']}"))
    with pytest.raises(HarnessError, match="needs a merged dataset and its manifest"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, *grown, f"extend={tmp_path / 'none.parquet'}"))
    assert not (tmp_path / "other").exists()
    # the merge: never over the set it extends, the same split; the shards remember what they extend
    with pytest.raises(HarnessError, match="would overwrite the dataset it extends"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, *grown, "merge=true", f"output={old['output']}"))
    with pytest.raises(HarnessError, match="so its held-out conversations stay held out"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, *grown, "merge=true", "eval_fraction=0.2"))
    without = [g for g in grown if not g.startswith("extend=")]
    with pytest.raises(HarnessError, match="pass the extend= its shards were made with"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, *without, "merge=true"))
    with pytest.raises(HarnessError, match="pass the extend= its shards were made with"):
        run_distill(distill_cfg(chat_model, questions_path, tmp_path, *without))

    # a second round extends the grown set: the manifest keeps the whole lineage
    data = sharegpt_input(tmp_path / "in.json", count=7)
    third = [f"data_path={data}", "max_new_tokens=4", f"out_dir={tmp_path / 'fresh3'}", f"extend={new['output']}",
             f"output={tmp_path / 'v3' / 'd.parquet'}", "eval_fraction=0.5"]
    assert run_distill(distill_cfg(chat_model, questions_path, tmp_path, *third))["written_now"] == 1
    lineage = json.loads(open(run_distill(distill_cfg(chat_model, questions_path, tmp_path, *third,
                                                      "merge=true"))["manifest"]).read())
    assert lineage["extends"]["sha256"] == sha256_of(new["output"])
    assert lineage["extends"]["extends"]["sha256"] == sha256_of(old["output"]) and lineage["seed"] == 0
    assert len(lineage["distill_runs"]) == 3 and lineage["counts"]["all"]["conversations"] == 7


def test_shard_log_reads_back_text_with_unicode_line_separators(tmp_path):
    """json.dumps(ensure_ascii=False) keeps U+2028 / U+0085 raw inside a string; the log splits records on
    newlines only, so such an answer (distilled from the default model) reads back whole."""
    log = JsonlLog(tmp_path / "shard.jsonl")
    records = [{"id": "a", "text": "one\u2028two\x85three\u2029four\x1cfive"}, {"id": "b", "text": "plain"}]
    for record in records:
        log.append(record)
    assert JsonlLog(tmp_path / "shard.jsonl").records() == records


class Reversed(HFBackend):
    """Finishes the newest request first (vLLM finishes in any order) and records how many conversations
    the distiller keeps at the backend."""

    def __init__(self, loaded):
        super().__init__(loaded, 1)
        self.busy: list[int] = []

    def poll(self, timeout_s=None):
        self.busy.append(len(self.queue))
        key, prompt, params = self.queue.pop()
        return [(key, self._one(prompt, params))]


def test_streaming_keeps_in_flight_conversations_busy_and_any_finishing_order_gives_the_same_answers(
        chat_model, questions_path, tmp_path):
    cfg = distill_cfg(chat_model, questions_path, tmp_path, "max_length=80", "max_new_tokens=6")
    loaded = load_model(cfg.model, "cpu")
    data = sharegpt_input(tmp_path / "in.json", count=7)
    from harness.distill import Conversation
    from harness.data.sharegpt import user_turns

    def conversations():
        return [Conversation(r["id"], user_turns(r)) for r in read_sharegpt(data)]

    in_order = Distiller(HFBackend(loaded, 1), loaded.template, cfg, None).run(conversations())
    backend = Reversed(loaded)
    streamed = list(Distiller(backend, loaded.template, cfg, None).stream(conversations(), 3))
    assert sorted(i.conversation.id for i in streamed) == [c.id for c in conversations()]
    assert [i.conversation.id for i in streamed] != [c.id for c in conversations()]     # out of order ...
    by_id = {i.conversation.id: i for i in streamed}
    for item in in_order:                                                                # ... same answers
        assert by_id[item.conversation.id].answers == item.answers
        assert by_id[item.conversation.id].layout == item.layout
    # one request per conversation in flight: 3 at the backend until fewer than 3 are left to start
    assert max(backend.busy) == 3 and backend.busy[: 4] == [3, 3, 3, 3]


def test_a_stop_lets_the_conversations_in_flight_finish_within_the_grace(chat_model, questions_path, tmp_path):
    cfg = distill_cfg(chat_model, questions_path, tmp_path, "max_length=80", "max_new_tokens=6")
    loaded = load_model(cfg.model, "cpu")
    data = sharegpt_input(tmp_path / "in.json", count=6)
    from harness.distill import Conversation
    from harness.data.sharegpt import user_turns
    from harness.infra.signals import StopRequest

    def conversations():
        return [Conversation(r["id"], user_turns(r)) for r in read_sharegpt(data)]

    for grace, written in ((3600.0, 2), (0.0, 1)):
        stop, out = StopRequest(), []
        for item in Distiller(HFBackend(loaded, 1), loaded.template, cfg, None).stream(conversations(), 2, stop,
                                                                                       grace):
            out.append(item)
            stop.signum = 15             # a signal once the first is written: the one still in flight
        # finishes within a long grace; with none, it is left unwritten for a resumed run
        assert len(out) == written
