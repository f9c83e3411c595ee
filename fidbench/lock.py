"""Locks on the shared cache (references, converted models) that name their holder, of a selectable kind.

``FIDBENCH_LOCK=flock`` (default): ``flock`` on a lock file, freed by the kernel when its holder exits;
reliable on local disks, unreliable or refused on some network filesystems. ``FIDBENCH_LOCK=file``: a
lock file created with ``O_CREAT | O_EXCL`` (atomic on local disks and NFS v3+) that holds its holder's
pid, host and start time and is touched every ``HEARTBEAT_S`` while held; it is stale, and broken by a
waiter, when its holder is a process of this host that has exited (or the file names no valid pid), or when
it has not been touched for ``FIDBENCH_LOCK_STALE`` seconds (default 300: above NFS attribute caching).
Breaking a stale lock can race only with another waiter breaking the same lock, and the cache tolerates it:
files are written atomically, so at worst a sample is generated twice. A run waiting on a lock says so on
the terminal (``tell``), also from inside a test that pytest captures.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

from filelock import FileLock, Timeout

KINDS = ("flock", "file")
NOTICE_S = 5.0  # a run waiting on a lock says who holds it after this long, then every minute
HEARTBEAT_S = 15.0  # a held `file` lock is touched this often
POLL_S = 0.1  # a `file` lock is retried this often while it is held by another

__all__ = ["KINDS", "LockWarning", "Timeout", "kind", "new", "stale_after", "timeout"]


def _terminal() -> int | None:
    """A copy of stderr's descriptor as it is when fidbench loads: pytest loads its plugins (this module with
    them) before it captures fd 2, and a test's fd 2 is then a capture file shown only if the test fails, so a
    run waiting on a lock would look like a hang (an xdist worker's fd 2 is its controller's stderr alike)."""
    try:
        return os.dup(2)
    except OSError:  # no stderr at all
        return None


_TERMINAL = _terminal()


def _same(fd: int, other: int) -> bool:
    try:
        a, b = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def tell(message: str) -> None:
    """``message`` on the stderr fidbench was loaded with (live, even under pytest's capture), and on the current
    stderr where that is another file (a captured test's output then holds it too)."""
    if _TERMINAL is not None:
        with contextlib.suppress(OSError):
            os.write(_TERMINAL, f"{message}\n".encode())
        if _same(_TERMINAL, 2):
            return
    print(message, file=sys.__stderr__, flush=True)


class LockWarning(UserWarning):
    """A run is waiting on a lock, or broke a stale one."""


def _seconds(name: str) -> float | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return seconds


def timeout() -> float | None:
    """``FIDBENCH_LOCK_TIMEOUT``: seconds a run waits on another's lock before it gives up (unset: no limit)."""
    return _seconds("FIDBENCH_LOCK_TIMEOUT")


def stale_after() -> float:
    """``FIDBENCH_LOCK_STALE``: seconds without a heartbeat after which a `file` lock is stale (default 300)."""
    seconds = _seconds("FIDBENCH_LOCK_STALE")
    return 300.0 if seconds is None else seconds


def kind() -> str:
    """``FIDBENCH_LOCK``: ``flock`` (default) or ``file``."""
    value = os.environ.get("FIDBENCH_LOCK", "").strip() or "flock"
    if value not in KINDS:
        raise ValueError(f"FIDBENCH_LOCK must be one of {', '.join(KINDS)}, got {value!r}")
    return value


def new(path, label: str = "lock"):
    """The lock of ``path`` (lock file ``<path>.lock``) of the kind ``FIDBENCH_LOCK`` selects."""
    return (Flock if kind() == "flock" else LockFile)(Path(path), label)


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(h: dict | None) -> str:
    if not h:
        return "a process that left no holder file"
    return f"pid {h['pid']} on {h['host']} (since {h['since']})"


def _read(path: Path) -> dict | None:
    try:
        h = json.loads(path.read_text())
        return h if isinstance(h, dict) and {"pid", "host", "since"} <= set(h) else None
    except (OSError, ValueError):
        return None


class _Lock:
    """What both kinds share: acquire(timeout) raising ``Timeout``, release(), who(), and wait()."""

    def __init__(self, path: Path, label: str):
        self.path = Path(f"{path}.lock")
        self.label = label

    def who(self) -> str:
        raise NotImplementedError

    def wait(self) -> None:
        """Acquire, however long it takes (or ``timeout()``), saying after ``NOTICE_S`` and then every minute
        which lock is held by whom."""
        limit, start, notice = timeout(), time.monotonic(), NOTICE_S
        while True:
            waited = time.monotonic() - start
            try:
                self.acquire(NOTICE_S if limit is None else max(0.0, min(NOTICE_S, limit - waited)))
                return
            except Timeout:
                waited = time.monotonic() - start
            if limit is not None and waited >= limit:
                raise TimeoutError(
                    f"{self.label} {self.path} is still held by {self.who()} after {waited:.0f} s "
                    f"(FIDBENCH_LOCK_TIMEOUT={limit:g}); if that process is stopped, resume or end it") from None
            if waited >= notice:
                message = f"fidbench: waiting {waited:.0f} s for {self.label} {self.path}, held by {self.who()}"
                tell(message)
                if notice == NOTICE_S:
                    warnings.warn(message, LockWarning, stacklevel=2)
                notice = waited + 60


class Flock(_Lock):
    """``flock`` on ``<path>.lock``, with the holder written to ``<path>.lock.holder``. The kernel frees it when
    its holder exits; a stopped holder keeps it."""

    def __init__(self, path: Path, label: str = "lock"):
        super().__init__(path, label)
        self.holder = Path(f"{path}.lock.holder")
        self._lock = FileLock(str(self.path))

    def acquire(self, timeout: float) -> None:
        self._lock.acquire(timeout=timeout)
        self.holder.write_text(json.dumps(_holder()))

    def release(self) -> None:
        self.holder.unlink(missing_ok=True)  # before the lock: the next holder writes its own
        self._lock.release()

    def who(self) -> str:
        return _describe(_read(self.holder))


class LockFile(_Lock):
    """``<path>.lock`` created exclusively, holding its holder; touched by a heartbeat while held, broken when stale
    (see the module's docstring)."""

    def __init__(self, path: Path, label: str = "lock"):
        super().__init__(path, label)
        self.holder = self.path
        self._token: str | None = None
        self._stop = threading.Event()

    def _try(self) -> bool:
        token = uuid.uuid4().hex
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({**_holder(), "token": token}))
        self._token = token
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True).start()
        return True

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def stale(self) -> str | None:
        """Why the lock file present now is stale, or None when its holder may be alive."""
        h = _read(self.path)
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if h and h["host"] == socket.gethostname():
            if not _pid(h["pid"]):  # a corrupt or hand-edited file: no process of this host can hold it
                return f"it names pid {json.dumps(h['pid'])[:40]}, which is not a process id"
            if not _alive(h["pid"]):
                return f"its holder, {_describe(h)}, has exited"
        if age > stale_after():
            return (f"its holder, {_describe(h)}, has not touched it for {age:.0f} s "
                    f"(FIDBENCH_LOCK_STALE={stale_after():g})")
        return None

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._try():
            reason = self.stale()
            if reason is not None:
                warnings.warn(f"fidbench: broke the stale {self.label} {self.path}: {reason}", LockWarning,
                              stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            if time.monotonic() >= deadline:
                raise Timeout(str(self.path))
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def release(self) -> None:
        self._stop.set()
        h = _read(self.path)
        if h is not None and h.get("token") == self._token:  # still ours (not broken as stale and retaken)
            self.path.unlink(missing_ok=True)
        self._token = None

    def who(self) -> str:
        return _describe(_read(self.path))


def _pid(pid) -> bool:
    """Whether ``pid`` can be a process id (``os.kill`` takes 0 and negative numbers as process groups)."""
    return isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:
        return e.errno == errno.EPERM
    return True
