"""nanochat.locking: one writer per run, a lock that dies with its process, and children that inherit
their parent's lock and die with it. The tests that need a real process (a lock held by a process
that dies, a parent killed under its child) start a light Python that does not import torch, and
are marked slow."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, ckpt_dir, steps_of, train_tiny
from nanochat.common import UserError


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from nanochat.locking import acquire_run_lock
lock = acquire_run_lock({run_dir!r})
assert "torch" not in sys.modules
print("locked", flush=True)
time.sleep(120)
"""


def start_lock_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(repo=REPO, run_dir=run_dir)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow  # a lock held by another process, which is then killed
def test_a_second_writer_fails_at_once_naming_the_holder_and_the_lock_dies_with_it(base_dir):
    run_dir = ckpt_dir(base_dir)
    holder = start_lock_holder(run_dir)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            train_tiny("--num_iterations=1")
        assert time.monotonic() - t0 < 60  # refused up front, not after training
        assert steps_of(base_dir) == []
    finally:
        holder.kill()
        holder.wait()
    train_tiny("--num_iterations=1")  # SIGKILL released the lock: no stale lock blocks a rerun
    assert steps_of(base_dir) == [1]
    assert not os.path.exists(os.path.join(run_dir, ".lock")), "the lock file is removed on release"


def test_two_in_process_writers_cannot_both_hold_a_run(tmp_path):
    from nanochat.locking import acquire_run_lock
    first = acquire_run_lock(str(tmp_path / "run"))
    with pytest.raises(UserError, match=f"process {os.getpid()}"):
        acquire_run_lock(str(tmp_path / "run"))
    first.release()
    acquire_run_lock(str(tmp_path / "run")).release()


PARENT = """
import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
from nanochat.locking import acquire_run_lock, env_with_locks, parent_death_signal
lock = acquire_run_lock({run_dir!r}, trainer=False)  # as the orchestrator takes it
child = subprocess.Popen([sys.executable, "-c", {child!r}], env=env_with_locks(os.environ, [lock]),
                         preexec_fn=parent_death_signal())
print(child.pid, flush=True)
time.sleep(120)
"""


CHILD = """
import signal, sys, time
sys.path.insert(0, {repo!r})
from nanochat.locking import acquire_run_lock
lock = acquire_run_lock({run_dir!r})
assert lock.inherited
with open({marker!r}, "w") as f:
    f.write("inherited")
signal.signal(signal.SIGTERM, lambda *a: (open({marker!r}, "w").write("terminated"), sys.exit(143)))
time.sleep(120)
"""


@pytest.mark.slow  # a parent process killed under its child
def test_a_child_inherits_the_parents_lock_and_dies_with_the_parent(tmp_path):
    run_dir, marker = str(tmp_path / "run"), str(tmp_path / "marker")
    child = CHILD.format(repo=REPO, run_dir=run_dir, marker=marker)
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(repo=REPO, run_dir=run_dir, child=child)],
                              stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not (os.path.exists(marker) and open(marker).read()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open(marker).read() == "inherited"
    parent.kill()  # SIGKILL: the parent cannot clean up; the kernel (or the child's watch) must
    parent.wait()
    deadline = time.monotonic() + 30
    while open(marker).read() != "terminated" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open(marker).read() == "terminated"
    from nanochat.locking import _pid_alive
    while _pid_alive(child_pid) and time.monotonic() < deadline:
        try:
            os.waitpid(child_pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
