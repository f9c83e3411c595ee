"""Cache locks of either kind: exclusive across processes, naming their holder; `file` locks broken only when stale."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from fidbench import lock

# Each process loads fidbench/lock.py alone (no torch import), waits until both are ready, then takes the
# lock 20 times, logging when it enters and leaves.
WORKER = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("fidlock", sys.argv[1])
fidlock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fidlock)
d = sys.argv[2]
open(os.path.join(d, f"ready-{os.getpid()}"), "w").close()
while sum(n.startswith("ready-") for n in os.listdir(d)) < 2:
    time.sleep(0.01)
for _ in range(20):
    held = fidlock.new(os.path.join(d, "sample"))
    held.wait()
    with open(os.path.join(d, "log"), "a") as log:
        log.write(f"enter {os.getpid()}\\n")
    time.sleep(0.005)
    with open(os.path.join(d, "log"), "a") as log:
        log.write(f"leave {os.getpid()}\\n")
    held.release()
"""


@pytest.mark.parametrize("kind", lock.KINDS)
def test_two_processes_never_hold_the_lock_at_once(tmp_path, kind):
    env = {**os.environ, "FIDBENCH_LOCK": kind}
    worker = [sys.executable, "-c", WORKER, str(ROOT / "fidbench" / "lock.py"), str(tmp_path)]
    procs = [subprocess.Popen(worker, env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = (tmp_path / "log").read_text().split("\n")[:-1]
    assert len(lines) == 80 and len({line.split()[1] for line in lines}) == 2
    for enter, leave in zip(lines[::2], lines[1::2]):  # every critical section closed before the next opened
        assert enter.split()[0] == "enter" and leave == enter.replace("enter", "leave")
    assert not (tmp_path / "sample.lock.holder").exists()
    if kind == "file":
        assert not (tmp_path / "sample.lock").exists()  # released lock files are removed


def test_the_kind_is_chosen_by_FIDBENCH_LOCK(tmp_path, monkeypatch):
    assert isinstance(lock.new(tmp_path / "x"), lock.Flock)
    monkeypatch.setenv("FIDBENCH_LOCK", "file")
    assert isinstance(lock.new(tmp_path / "x"), lock.LockFile)
    monkeypatch.setenv("FIDBENCH_LOCK", "nfs")
    with pytest.raises(ValueError, match="FIDBENCH_LOCK must be one of flock, file, got 'nfs'"):
        lock.new(tmp_path / "x")
    monkeypatch.setenv("FIDBENCH_LOCK_STALE", "-3")
    with pytest.raises(ValueError, match="FIDBENCH_LOCK_STALE must be a number of seconds >= 0, got '-3'"):
        lock.stale_after()


def holder(path, pid, host, age=0.0):
    """A lock file left by process ``pid`` on ``host``, last touched ``age`` seconds ago."""
    path.write_text(json.dumps({"pid": pid, "host": host, "since": "2024-01-01 00:00:00", "token": "theirs"}))
    os.utime(path, (time.time() - age, time.time() - age))


def exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_file_of_an_exited_process_of_this_host_is_broken(tmp_path):
    held = lock.LockFile(tmp_path / "s")
    pid = exited_pid()
    holder(held.path, pid, socket.gethostname())
    with pytest.warns(lock.LockWarning, match=f"broke the stale lock .*s.lock: its holder, pid {pid} on .* has exited"):
        held.acquire(0)
    assert json.loads(held.path.read_text())["pid"] == os.getpid()
    held.release()
    assert not held.path.exists()


def test_a_lock_file_of_another_host_is_broken_only_after_its_heartbeat_stops(tmp_path, monkeypatch):
    held = lock.LockFile(tmp_path / "s")
    holder(held.path, 1, "elsewhere", age=100)  # alive as far as we can tell: its heartbeat is recent enough
    with pytest.raises(lock.Timeout):
        held.acquire(0.3)
    assert held.who() == "pid 1 on elsewhere (since 2024-01-01 00:00:00)"
    monkeypatch.setenv("FIDBENCH_LOCK_STALE", "60")
    with pytest.warns(lock.LockWarning,
                      match="pid 1 on elsewhere .* has not touched it for 100 s .*FIDBENCH_LOCK_STALE=60"):
        held.acquire(0)
    held.release()


def test_a_held_lock_file_is_touched_while_held_and_released_only_if_still_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    held = lock.LockFile(tmp_path / "s")
    held.acquire(0)
    os.utime(held.path, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.5)
    assert time.time() - held.path.stat().st_mtime < 10  # the heartbeat touched it
    assert lock.LockFile(tmp_path / "s").stale() is None
    holder(held.path, 1, "elsewhere")  # broken as stale by another host and taken: not ours to remove
    held.release()
    assert json.loads(held.path.read_text())["host"] == "elsewhere"


@pytest.mark.parametrize("pid", [2**40, -1, 0, "12", True])
def test_a_lock_file_naming_no_valid_pid_of_this_host_is_broken_with_a_clear_message(tmp_path, pid):
    """A pid out of range crashed every run with OverflowError; 0 and -1 are process groups os.kill would find
    alive; a string is no process id."""
    held = lock.LockFile(tmp_path / "s")
    holder(held.path, pid, socket.gethostname())
    with pytest.warns(lock.LockWarning, match=rf"broke the stale lock .*s.lock: it names pid {json.dumps(pid)}, "
                                              "which is not a process id"):
        held.acquire(0)
    held.release()
    holder(held.path, pid, "elsewhere")  # another host's: judged by its heartbeat only
    with pytest.raises(lock.Timeout):
        held.acquire(0.2)


WAITER = """
import pytest
from fidbench import lock

def test_waits(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "NOTICE_S", 0.2)
    monkeypatch.setenv("FIDBENCH_LOCK_TIMEOUT", "3")  # the notice comes after 0.2 s, however busy the machine
    held = lock.Flock(tmp_path / "x", "reference lock")
    held.acquire(0)
    with pytest.raises(TimeoutError):
        lock.new(tmp_path / "x", "reference lock").wait()
    held.release()
"""


@pytest.mark.parametrize("args", [(), pytest.param(("-n", "1"), marks=pytest.mark.slow)])
def test_the_waiting_notice_reaches_the_terminal_under_capture(pytester, args):
    """Under pytest's default fd capture (and in an xdist worker) a test's stderr is a capture file shown only on
    failure: the notice goes to the stderr fidbench found when pytest loaded it, so a blocked run does not look
    like a hang."""
    pytester.makepyfile(test_waiter=WAITER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore::fidbench.lock.LockWarning", *args)
    assert result.ret == 0, result.stdout.str()
    result.stderr.re_match_lines([r"fidbench: waiting \d+ s for reference lock .*x\.lock, held by pid \d+"])
