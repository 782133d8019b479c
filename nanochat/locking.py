"""One writer per run directory: an OS file lock held for the life of the process (docs/SAFETY.md).

`acquire_run_lock(run_dir)` takes an exclusive `fcntl.flock` on `<run_dir>/.lock` and writes the
holder's pid into it. The kernel releases the lock when the process dies (even by SIGKILL), so a
stale lock can never block a rerun, and a second writer is refused at once with the holder's pid.
Checking "does the directory already hold checkpoints?" is racy between two processes that start
together; the lock is not.

Orchestrated runs (scripts/run_backward_experiment.py): the orchestrator holds the lock of every
experiment of its chain and names them in the environment variable NANOCHAT_HELD_LOCKS
(os.pathsep-separated lock files). A script started under it finds its run directory's lock
there, checks that the process holding it is one of its ancestors, and then takes a second lock,
`<run_dir>/.lock.child`, for itself: at most one child trains per run even while an old child of
a killed orchestrator is still shutting down. The child also watches the holder: when it dies the
child stops (SIGTERM to itself), and on Linux the orchestrator additionally starts its children
with PR_SET_PDEATHSIG (`parent_death_signal`), so killing the orchestrator takes its trainer down.

Where fcntl is missing (Windows) the lock degrades to a pid file check without kernel release.
"""

import os
import signal
import sys
import threading
import time

ENV_HELD = "NANOCHAT_HELD_LOCKS"
LOCK_NAME = ".lock"
CHILD_LOCK_NAME = ".lock.child"

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None


class RunLock:
    """A held lock; release() (or process exit) frees it."""

    def __init__(self, path, held, inherited=False):
        # path: the run's lock (what children are told about); held: [(lock file, fd)] this
        # process holds, in the order taken.
        self.path, self._held, self.inherited = path, list(held), inherited

    def release(self):
        """Remove each lock file (while still holding it, so no one can hold a lock on a file that
        is about to vanish: see _try_lock's inode check), then unlock; last taken, first freed."""
        while self._held:
            lock_file, fd = self._held.pop()
            try:
                try:
                    if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                        os.remove(lock_file)
                except OSError:
                    pass
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _user_error(message):
    # Imported on use: this module stays importable without torch (nanochat.common imports it),
    # so a light process can hold or test a lock.
    from nanochat.common import UserError as error
    return error(message)


def lock_path(run_dir):
    return os.path.join(os.path.realpath(run_dir), LOCK_NAME)


def _read_holder(path):
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def _open_lock_file(path):
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _user_error(f"cannot create the lock file {path}: {e.strerror or e}; is the base dir writable?") from None


def _try_lock(path, what, wait_s=0.0):
    """An fd holding an exclusive lock on `path`, or a UserError naming the holder."""
    fd = _open_lock_file(path)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder we waited for may have removed the file on release: a lock on a removed
            # inode protects nothing, so lock the file now at `path` instead.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = _open_lock_file(path)
        except OSError:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            holder = _read_holder(path)
            for _ in range(20):  # the holder may have locked but not yet written its pid
                if holder is not None:
                    break
                time.sleep(0.05)
                holder = _read_holder(path)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise _user_error(f"{what} is in use by {who} (lock {path}); wait for it to finish or stop it first: "
                            "two writers would overwrite each other's checkpoints and logs") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _ancestors():
    """Pids of this process's ancestors (Linux /proc; just the parent elsewhere)."""
    found, pid = [], os.getppid()
    for _ in range(64):
        if pid <= 1:
            break
        found.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_holder(pid, interval=0.5):
    """Stop this process (SIGTERM to itself: a clean shutdown) when the lock holder dies."""
    def watch():
        while _pid_alive(pid):
            time.sleep(interval)
        print(f"error: the process holding this run's lock ({pid}) died; stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="lock-holder-watch", daemon=True).start()


def held_locks():
    return [p for p in os.environ.get(ENV_HELD, "").split(os.pathsep) if p]


def acquire_run_lock(run_dir, what=None, trainer=True):
    """Lock `run_dir` for this process (see the module docstring); returns a RunLock.

    A trainer (trainer=True, the scripts) also holds the child lock, so it never overlaps a child
    of a killed orchestrator that is still stopping; the orchestrator itself passes False."""
    what = what or f"run directory {run_dir}"
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise _user_error(f"cannot create {run_dir}: {e.strerror or e}; is the base dir writable?") from None
    path = lock_path(run_dir)
    if path in held_locks():
        holder = _read_holder(path)
        if holder is not None and holder in _ancestors():
            # A short wait: the previous child of a killed orchestrator may still be shutting down.
            child = os.path.join(os.path.dirname(path), CHILD_LOCK_NAME)
            fd = _try_lock(child, what, wait_s=15.0)
            _watch_holder(holder)
            return RunLock(path, [(child, fd)], inherited=True)
    lock = RunLock(path, [(path, _try_lock(path, what))])
    if trainer:
        child = os.path.join(os.path.dirname(path), CHILD_LOCK_NAME)
        try:
            lock._held.append((child, _try_lock(child, what, wait_s=15.0)))
        except BaseException:
            lock.release()
            raise
    return lock


def env_with_locks(env, locks):
    """A copy of `env` naming `locks` (RunLocks held by this process) for child processes."""
    env = dict(env)
    paths = held_locks() + [lock.path for lock in locks]
    env[ENV_HELD] = os.pathsep.join(dict.fromkeys(paths))
    return env


def parent_death_signal(sig=signal.SIGTERM):
    """A preexec_fn for subprocess.Popen: on Linux the child gets `sig` when its parent dies.

    Returns None elsewhere (the child's holder watch in acquire_run_lock is the fallback)."""
    if not sys.platform.startswith("linux"):
        return None

    def set_pdeathsig():
        import ctypes
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    return set_pdeathsig
