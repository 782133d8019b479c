"""Names that become paths, and the few file operations every writer shares (docs/SAFETY.md).

`validate_name` is the one gate every tag and experiment id passes before it becomes a directory
name under the base dir (checkpoint_manager.artifact_dirs, experiment_config.validate_id), so a
tag can never write outside its phase directory. The writers share `atomic_write` (temporary name,
then rename), `remove_stale_temporaries`, `check_writable` (before the work) and `move_aside`.
"""

import errno
import json
import os
import re

from nanochat.common import UserError

MAX_NAME_LEN = 128
# Used with fullmatch: `re.match(r"...$")` would accept a name ending in a newline ('$' matches
# before a trailing "\n"), which then becomes a directory name no shell command can type.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
# Temporary names this project writes: `<file>.tmp<pid>` (atomic_write: checkpoints, evaluations,
# configs, shards, exports), `<file>.tmp` (downloads, tokenizer), `<name>.tmp.npy` / `<file>.tmp<pid>.png`
# (tokenizer, figures), and `.<file>.<random>.tmp`, which earlier versions wrote for experiment configs.
_TEMP_PATTERN = re.compile(r"(\.tmp\d*$)|(\.tmp\d*\.)|(^\..+\.tmp$)")


def validate_name(name, what="tag"):
    """`name` if it is a plain directory name; one UserError saying what is allowed otherwise."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{what} must be a non-empty name, got {name!r}")
    if len(name) > MAX_NAME_LEN or not _NAME_PATTERN.fullmatch(name):
        raise UserError(f"invalid {what} {name!r}: use only letters, digits, '.', '_' and '-' (no '/', no "
                        f"leading '.', at most {MAX_NAME_LEN} characters); a {what} names a directory under the "
                        "base dir, never a path")
    return name


def is_disk_full(exc):
    """True for the ways a full disk shows up: ENOSPC/EDQUOT, or torch's zip writer message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left" in text or "unexpected pos" in text or "file write failed" in text


def atomic_write(path, write_fn, after_full_disk="rerun the command"):
    """Call write_fn(tmp_path), then rename tmp_path to `path` (atomic within a filesystem). On any
    failure the temporary file is removed; an OS-level one (disk full, read-only, permission) is
    one UserError naming the file, ending with `after_full_disk` (a checkpoint's resume hint)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if is_disk_full(e):
            raise UserError(f"no space left on the device while writing {path}; nothing was kept under that "
                            f"name: free some space and {after_full_disk}") from None
        if not isinstance(e, OSError):
            raise
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    def write(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def atomic_write_json(path, obj):
    """`obj` as indented JSON at `path`, atomically (readers see the old file or the new one)."""
    # default=str: a value of an unusual type (a Path, say) is recorded as text, not a crash.
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def remove_stale_temporaries(directory):
    """Delete (and return the names of) the temporary files a killed writer left in `directory`;
    only while holding its run lock (nanochat.locking), or a live writer's file goes."""
    if not os.path.isdir(directory):
        return []
    removed = [name for name in sorted(os.listdir(directory))
               if _TEMP_PATTERN.search(name) and os.path.isfile(os.path.join(directory, name))]
    for name in removed:
        os.remove(os.path.join(directory, name))
    return removed


def check_writable(directory, what="the run directory"):
    """Create `directory` if needed and prove that a file can be written in it."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_probe.tmp{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what} {directory}: {e.strerror or e}; point NANOCHAT_BASE_DIR at a "
                        "writable directory (or fix its permissions / free space)") from None


def move_aside(path):
    """<name>.h5 -> <name>.attempt<N>.h5, the first free N: a restart from scratch never overwrites
    what a previous attempt left (it is evidence)."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.attempt{n}{ext}"):
        n += 1
    os.rename(path, f"{stem}.attempt{n}{ext}")
    return f"{stem}.attempt{n}{ext}"
