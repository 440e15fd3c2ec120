"""SIGTERM (SLURM's time limit, `kill`) and SIGINT (Ctrl-C) stop a job between records, never inside one.

    with graceful_stop() as stop:
        for question in todo:
            if stop.requested:
                break                    # the records written so far are whole; the job ends with Stopped
            ...

The first signal only sets `stop.requested`: the record in flight (a question, the conversations in flight, a
training step) is finished and written, W&B is closed by the app's `finally`, and the app raises `Stopped`
with the command that resumes it. A second signal stops at once (KeyboardInterrupt): the record in flight is
lost, the finished ones are not (the store's torn-line rule, the trainer's complete-checkpoint rule), and the
entry point prints the same resume hint without a traceback. Exit status 128 + the signal's number (130, 143),
as a shell reports a job killed by it.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.infra.errors import HarnessError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(HarnessError):
    """A job stopped by a signal: one line with what was kept and the resume command; exit 128 + signum."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopRequest:
    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"


@contextmanager
def graceful_stop(what: str = "the record in flight") -> Iterator[StopRequest]:
    """Install the two-stage handlers for SIGTERM and SIGINT for the with-block (main thread only; elsewhere the
    default handlers stay and `requested` is never set)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame):
        if stop.requested:                      # the second signal: stop now
            raise KeyboardInterrupt
        stop.signum = signum
        log.warning("%s: stopping after %s (send it again to stop at once)", signal.Signals(signum).name, what)

    def stopping(signum, frame):      # the job is already on its way out: printing its resume line, exiting
        log.warning("%s: already stopping", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            # a job that was stopped keeps ignoring signals until it exits (a second Ctrl-C arriving while it
            # prints its resume line would otherwise kill it with a traceback); otherwise the old handlers return
            signal.signal(sig, stopping if stop.requested else handler)


def resume_command(app: str, folder: str | Path, key: str) -> str:
    """The command line that continues this job: its own overrides (Hydra's task overrides; in a sweep, this
    job's) with `key=folder resume=true`."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = [o for o in HydraConfig.get().overrides.task
                         if o.lstrip("+~").split("=", 1)[0] not in (key, "resume")]
    except Exception:  # noqa: BLE001 - outside a Hydra app: the bare command
        overrides = []
    return shlex.join([f"specdec-{app}", *overrides, f"{key}={folder}", "resume=true"])
