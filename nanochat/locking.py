"""One writer per run directory: an exclusive `fcntl.flock` on `<run_dir>/.lock`, held for the life
of the process; the kernel frees it when the process dies, even by SIGKILL (docs/SAFETY.md).

The orchestrator holds its experiments' locks and names them to its children in NANOCHAT_HELD_LOCKS;
a script whose lock is held by one of its ancestors takes only `<run_dir>/.lock.child` (so one child
trains per run, even while a child of a killed orchestrator is still stopping) and stops itself
when that holder dies. Linux children also get PR_SET_PDEATHSIG (`parent_death_signal`).
"""

import ctypes
import fcntl
import os
import signal
import sys
import threading
import time

ENV_HELD = "NANOCHAT_HELD_LOCKS"


def _user_error(message):
    from nanochat.common import UserError  # on use: this module stays importable without torch
    return UserError(message)


class RunLock:
    """Locks this process holds ([(file, fd)], in the order taken); release() or exit frees them."""

    def __init__(self, path, held, inherited=False):
        self.path, self._held, self.inherited = path, held, inherited

    def release(self):
        while self._held:  # remove each file while still holding it: see the inode check in _lock
            lock_file, fd = self._held.pop()
            try:
                if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                    os.remove(lock_file)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)  # not just close(): a forked process may share the fd
            os.close(fd)


def _holder(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _lock(path, what, wait_s=0.0):
    """An fd holding an exclusive lock on `path`, with our pid written in it; or a UserError."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _user_error(f"cannot create the lock file {path}: {e.strerror or e}; is the base dir writable?")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            for _ in range(20):  # the holder may have locked but not yet written its pid
                if (holder := _holder(path)) is not None:
                    break
                time.sleep(0.05)
            who = f"process {holder}" if holder else "another process"
            raise _user_error(f"{what} is in use by {who} (lock {path}); wait for it to finish or stop it first: "
                              "two writers would overwrite each other's checkpoints and logs") from None
        try:  # a holder that released meanwhile removed the file: a lock on that inode guards nothing
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except FileNotFoundError:
            pass
        except OSError as e:  # a full disk (ENOSPC) or a failing filesystem: one line, not a traceback
            os.close(fd)
            raise _user_error(f"cannot write the lock file {path}: {e.strerror or e}; free some space (or fix the "
                              "base dir) and rerun") from None
        os.close(fd)


def _ancestors():
    """Pids of this process's ancestors (Linux /proc; just the parent elsewhere)."""
    found, pid = [], os.getppid()
    while pid > 1 and len(found) < 64:
        found.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _watch_holder(pid):
    """Stop this process (SIGTERM to itself: a clean shutdown) when the lock holder dies."""
    def watch():
        while _pid_alive(pid):
            time.sleep(0.5)
        print(f"error: the process holding this run's lock ({pid}) died; stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="lock-holder-watch", daemon=True).start()


def held_locks():
    return [p for p in os.environ.get(ENV_HELD, "").split(os.pathsep) if p]


def acquire_run_lock(run_dir, what=None, trainer=True):
    """Lock `run_dir` for this process; a trainer also holds the child lock (the orchestrator, trainer=False, does not)."""
    what = what or f"run directory {run_dir}"
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise _user_error(f"cannot create {run_dir}: {e.strerror or e}; is the base dir writable?") from None
    path = os.path.join(os.path.realpath(run_dir), ".lock")
    child = path + ".child"
    holder = _holder(path) if path in held_locks() else None
    if holder is not None and holder in _ancestors():
        # A short wait: the previous child of a killed orchestrator may still be shutting down.
        lock = RunLock(path, [(child, _lock(child, what, wait_s=15.0))], inherited=True)
        _watch_holder(holder)
        return lock
    lock = RunLock(path, [(path, _lock(path, what))])
    if trainer:
        try:
            lock._held.append((child, _lock(child, what, wait_s=15.0)))
        except BaseException:
            lock.release()
            raise
    return lock


def env_with_locks(env, locks):
    """A copy of `env` naming `locks` (RunLocks held by this process) for child processes."""
    paths = held_locks() + [lock.path for lock in locks]
    return {**env, ENV_HELD: os.pathsep.join(dict.fromkeys(paths))}


def parent_death_signal():
    """A Popen preexec_fn: on Linux the child gets SIGTERM when its parent dies (None elsewhere: the
    child's watch of the lock holder covers it)."""
    if not sys.platform.startswith("linux"):
        return None

    def set_pdeathsig():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    return set_pdeathsig
