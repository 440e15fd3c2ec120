"""One writer per output folder: an exclusive `fcntl.flock` on a lock file inside it, held for the whole run.

    with hold(run_dir, "run_dir"):          # refused at once, with who holds it, when another job writes there
        ...                                 # load the model, write answers, summary

The lock file (`<folder>/.lock`, or `<folder>/.<key>.lock` for one file of a folder, e.g. a distill shard)
holds the holder's pid, host and start time, for the refusal message; it is emptied on release. The OS drops
a flock when its process dies, so a free flock over a non-empty file is a crashed run's lock: taken over
with one log line. The pid check is for the message and for filesystems without flock. A lock written on
another host is never assumed stale (its flock may not be visible here): the message says how to remove it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

try:
    import fcntl
except ImportError:      # not POSIX: the pid check alone
    fcntl = None

from harness.infra.errors import HarnessError

log = logging.getLogger(__name__)

LOCK = ".lock"
# Free space a folder's disk must have when a job takes it: answers, logs and W&B's offline files of one run
# (a full disk found after the model has loaded cost a finished record before)
MIN_FREE_BYTES = 64 * 2**20
# flock errors that mean "this filesystem cannot flock" (not "someone holds it")
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.ENOSYS, errno.EINVAL}


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process
        return True
    return True


def _holder(fd: int) -> dict:
    """The pid/host/since a lock file holds; {} when empty (released cleanly) or unreadable."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        holder["pid"] = int(holder["pid"])
        return holder
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def _refusal(subject: str, what: str, holder: dict, path: Path) -> HarnessError:
    if not holder:
        return HarnessError(f"{subject} is being written by another process (lock {path}); wait for it, "
                            f"or choose another {what}")
    text = (f"{subject} is being written by pid {holder['pid']} on host {holder.get('host', '?')} since "
            f"{holder.get('since', '?')}; wait for it, or choose another {what}")
    if holder.get("host") != socket.gethostname():
        text += f" (a lock from another host is never assumed stale: if that job is dead, delete {path})"
    return HarnessError(text)


def _acquire(fd: int, path: Path, subject: str, what: str) -> bool:
    """Take the lock or raise the refusal; returns whether flock holds it (False: the pid check alone)."""
    flocked = False
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            raise _refusal(subject, what, _holder(fd), path) from None
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                raise
            log.warning("%s: this filesystem has no flock (%s); the lock relies on the pid in it", path,
                        exc.strerror)
    holder = _holder(fd)
    if holder:
        # flock free but the file not emptied: its writer ended without releasing it (killed), unless it runs
        # on another host (whose flock may not reach here) or, without flock, its pid is still alive
        if holder.get("host") != socket.gethostname() or (not flocked and pid_alive(holder["pid"])):
            raise _refusal(subject, what, holder, path)
        log.warning("%s: taking over the lock of pid %d (since %s), which ended without releasing it", subject,
                    holder["pid"], holder.get("since", "?"))
    return flocked


def check_free_space(folder: Path, what: str, need: int | None = None) -> None:
    """One line, before any work, when `folder`'s disk has less than `need` bytes (MIN_FREE_BYTES) free."""
    import shutil

    need = MIN_FREE_BYTES if need is None else need
    free = shutil.disk_usage(folder).free
    if free < need:
        raise HarnessError(f"{folder} has {free / 2**20:.1f} MiB free on its disk, under the {need / 2**20:.0f} MiB a "
                           f"run needs for its records, logs and W&B files; free space or choose another {what}")


@contextmanager
def hold(folder: str | Path, what: str, key: str | None = None) -> Iterator[Path]:
    """Hold `folder`'s lock (or, with `key`, the lock of `folder/key`) for the with-block; creates the folder and
    checks it is writable with MIN_FREE_BYTES free (one line otherwise: read-only folders, full disks).

    A second holder, in this process or another, gets one HarnessError line naming the holder's pid, host
    and start time and the fix ("choose another <what>"). Released at the end, on exceptions too.
    """
    folder = Path(folder)
    path = folder / (f".{key}.lock" if key else LOCK)
    subject = str(folder / key) if key else str(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)     # not inherited by child processes
    except OSError as exc:
        raise HarnessError(f"cannot create the lock file {path} ({exc.strerror}); choose a writable {what}") from None
    try:
        check_free_space(folder, what)
        flocked = _acquire(fd, path, subject, what)
    except BaseException:
        os.close(fd)
        raise
    try:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now().astimezone().isoformat(timespec="seconds"), "command": sys.argv}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
        except OSError as exc:
            raise HarnessError(f"cannot write the lock file {path} ({exc.strerror}); free space or choose a "
                               f"writable {what}") from None
        yield path
    finally:
        try:
            os.ftruncate(fd, 0)       # empty = released cleanly (a non-empty, unheld lock is a crashed run's)
        except OSError:
            pass
        if flocked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
