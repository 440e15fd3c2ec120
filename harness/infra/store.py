"""The results store: one folder per run, `run.json` + `answers.jsonl` (+ `summary.json` at the end).
The one reader and writer of run folders: the bench writes through `RunStore`, reports read through
`read_records` / `read_json`, so both agree on the file names and on what a record is.

A run folder has one writer: `RunStore.lock()` (harness.infra.locks) is held for the whole run, so a second run or
resume into the same run_dir is refused before it loads a model or writes a line.

answers.jsonl gets one record per question, appended, flushed and fsync'd as each question finishes,
so a killed run loses at most the question in flight, and `resume=true` continues where it stopped.

The torn-line rule, for writer and reader alike: a record is a line ended by a newline. Bytes after the
last newline are a write cut by a kill: never a record (even when they happen to parse as JSON), so that
question counts as not answered. Readers skip them and change nothing (the run may still be writing that
line); the writer cuts them off when it opens the folder, before it appends. A newline-ended line that is
not JSON is damage, not a kill: a one-line HarnessError naming the line, never silently skipped.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from harness import REPO_ROOT
from harness.infra.errors import HarnessError
from harness.infra.locks import hold

ANSWERS = "answers.jsonl"
RUN_INFO = "run.json"
SUMMARY = "summary.json"
# Config keys that must agree between a run folder and a resumed run into it: they decide the tokens (the
# question selection may grow: resuming with a larger bench.limit extends a run). Never forced.
IDENTITY_KEYS = ("model", "method", "bench", "decoding", "max_new_tokens", "seed", "context")
BENCH_IDENTITY = ("name", "max_turns")
# What the timings (and the question texts) were measured with: a resume that differs is refused unless
# force_resume=true, and then run.json lists every difference under `mixed_provenance` (the reports keep such a
# run apart: its hardware reads "mixed").
PROVENANCE_KEYS = ("hardware.cpu", "hardware.cpu_count", "hardware.torch_threads", "hardware.gpu", "hardware.device",
                   "questions.sha256")
PACKAGES = ("torch", "transformers", "accelerate", "hydra-core", "fschat", "wandb", "specdec-harness")


def git_commit() -> str | None:
    """The checkout's commit (+ "-dirty"); None for an installed wheel (its version is in `versions`), whose
    folder may sit inside some other repository."""
    import harness

    if not harness._IN_SOURCE_TREE:
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device | None = None) -> dict:
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())     # as a loaded model's device reads
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": None}
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        info["gpu"] = torch.cuda.get_device_name(device or 0)
    info["device"] = str(device) if device is not None else ("cuda" if info["gpu"] else "cpu")
    return info


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _complete_part(data: bytes) -> bytes:
    """The bytes up to and including the last newline: every finished record (the torn-line rule)."""
    return data[: data.rfind(b"\n") + 1]


def read_records(path: str | Path) -> list[dict]:
    """The finished records of an answers.jsonl (missing file: none), by the torn-line rule; reads only."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    # split on b"\n" only: str.splitlines() would also break at characters a JSON string may hold
    for number, line in enumerate(_complete_part(path.read_bytes()).split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:             # not JSON, or not UTF-8
            raise HarnessError(f"{path} line {number} is not a JSON record; delete that line (resume=true re-runs "
                               "its question) or leave the folder out") from None
    return records


def write_json(path: str | Path, data: dict) -> None:
    """JSON written whole or not at all (a temp file renamed into place): run.json, summary.json, head files."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict | None:
    """run.json / summary.json, or None when it is missing or not JSON (an unfinished or broken run)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def file_sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _dotted(info: dict, key: str):
    value = info
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def provenance_differences(old: dict, new: dict) -> list[str]:
    """PROVENANCE_KEYS that differ between a run folder's run.json and a resume into it ("key (old vs new)");
    a key either side did not record (an older harness, a direct API call) is not compared."""
    changed = []
    for key in PROVENANCE_KEYS:
        before, now = _dotted(old, key), _dotted(new, key)
        if key == "hardware.device":          # older runs recorded a bare "cuda" for cuda:0
            before, now = (None if v is None else ("cuda:0" if v == "cuda" else v) for v in (before, now))
        if before is not None and now is not None and before != now:
            changed.append(f"{key} ({before} vs {now})")
    return changed


def _identity(cfg: dict) -> dict:
    identity = {key: cfg.get(key) for key in IDENTITY_KEYS}
    identity["bench"] = {key: (cfg.get("bench") or {}).get(key) for key in BENCH_IDENTITY}
    return identity


class RunStore:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.answers = self.dir / ANSWERS
        self._summary_removed = False      # append() removes summary.json once, at this run's first record

    def lock(self):
        """Hold the folder for this run (a context manager); a second writer gets one HarnessError line."""
        return hold(self.dir, "run_dir")

    def open(self, cfg: DictConfig, resume: bool, extra: dict | None = None, force: bool = False) -> set[int]:
        """Create or reopen the folder; returns the question ids already finished (resume).

        A resume must match the folder's run in every IDENTITY_KEYS setting (always) and in its PROVENANCE_KEYS
        (hardware, threads, device, question file: unless `force`, and then the differences are recorded).
        summary.json goes with the first new record (append): a run that is extended and killed never shows the
        old summary against more records, and one that fails before adding any keeps a summary still true."""
        resolved = OmegaConf.to_container(cfg, resolve=True)
        extra = dict(extra or {})
        self.dir.mkdir(parents=True, exist_ok=True)
        done = self.finished_ids()
        if done and not resume:
            raise HarnessError(f"{self.dir} already holds {len(done)} answers; pass resume=true to continue it "
                               "or choose a new run_dir")
        info_path = self.dir / RUN_INFO
        if resume and info_path.is_file():
            old = json.loads(info_path.read_text())
            if _identity(old.get("config", {})) != _identity(resolved):
                before, now = _identity(old.get("config", {})), _identity(resolved)
                changed = [k for k in IDENTITY_KEYS if before[k] != now[k]]
                raise HarnessError(f"cannot resume {self.dir}: its run used different {', '.join(changed)}; "
                                   "resume with the same settings or start a new run_dir")
            # the same head_path with other weights in it (a head retrained or shipped again since): the answers
            # so far were drafted by another head, their acceptance would be mixed with the new one's
            before, now = ((record.get("head") or {}).get("sha256") for record in (old, extra))
            if before and now and before != now:
                raise HarnessError(f"cannot resume {self.dir}: its answers were drafted by other head weights "
                                   f"(sha256 {before[:12]}, now {now[:12]} in {(extra.get('head') or {}).get('path')}); "
                                   "the head changed since the run began: start a new run_dir")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        info = {"config": resolved, "created": now, "git_commit": git_commit(), "versions": versions(), **extra}
        if resume and info_path.is_file():
            old = json.loads(info_path.read_text())
            changed = provenance_differences(old, info)
            if changed and not force:
                raise HarnessError(f"cannot resume {self.dir}: its timings were measured with different "
                                   f"{', '.join(changed)}; resume on the same machine and settings, start a new "
                                   "run_dir, or pass force_resume=true (run.json then records the mix and reports "
                                   "keep this run apart)")
            info["created"] = old.get("created", now)       # the run's start; each resume is listed below
            info["resumes"] = [*old.get("resumes", []), now]
            info["mixed_provenance"] = [*old.get("mixed_provenance", []),
                                        *([{"resumed": now, "differences": changed}] if changed else [])]
            if not info["mixed_provenance"]:
                del info["mixed_provenance"]
            if old.get("host_probes"):                      # the machine's speed at each earlier sitting
                info["host_probes"] = old["host_probes"]
            if old.get("before_resume"):
                info["before_resume"] = old["before_resume"]
            for key in ("hardware", "questions"):          # what the finished records were measured with
                if old.get(key) is not None and changed:      # the earliest recorded one stays
                    info.setdefault("before_resume", {}).setdefault(key, old[key])
        self._cut_torn_tail()      # only once this run may write here: a refused resume changes nothing
        write_json(info_path, info)
        return done

    def update_info(self, fields: dict) -> None:
        """Add what the run learns after opening the folder (the loaded model's source, weight bytes) to run.json."""
        path = self.dir / RUN_INFO
        write_json(path, {**(read_json(path) or {}), **fields})

    def _cut_torn_tail(self) -> None:
        """The writer's half of the torn-line rule: drop what follows the last newline before appending,
        so the next record starts on its own line (its question is re-run)."""
        if not self.answers.is_file():
            return
        data = self.answers.read_bytes()
        keep = len(_complete_part(data))
        if keep < len(data):
            with open(self.answers, "r+b") as handle:
                handle.truncate(keep)

    def records(self) -> list[dict]:
        return read_records(self.answers)

    def finished_ids(self) -> set[int]:
        return {record["question_id"] for record in self.records()}

    def append(self, record: dict) -> None:
        """One finished question, flushed and fsync'd. The first record a run appends removes summary.json: from
        then on the folder holds more than that summary counted (a run that ends writes it again)."""
        if not self._summary_removed:
            (self.dir / SUMMARY).unlink(missing_ok=True)
            self._summary_removed = True
        line = json.dumps(record, separators=(",", ":")) + "\n"
        try:
            with open(self.answers, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:      # a full disk or a folder made read-only mid-run: the finished records stay
            raise HarnessError(f"cannot write question {record.get('question_id')} to {self.answers} "
                               f"({exc.strerror}); the questions before it are kept: free space (or fix the "
                               "folder's permissions) and resume=true re-runs it") from None

    def write_summary(self, summary: dict) -> None:
        write_json(self.dir / SUMMARY, summary)
