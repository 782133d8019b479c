"""Research logs: every step's metrics in one HDF5 file per phase, readable while (or after) a run dies.

`/scalars/step` is the alignment key and the commit marker (extended last in every block, each block
followed by `file.flush()`); other columns are float64, NaN where absent. Layout, measurements and the
value rules: docs/RESEARCH.md ("Research logs").
"""

import json
import os
import re
import sys
from datetime import datetime, timezone
from operator import index as _as_int

import h5py
import numpy as np

from nanochat.common import UserError

STEP = "step"
SCALARS = "scalars"
SNAPSHOTS = "snapshots"
# 1024 float64 rows = 8 KiB per chunk: small enough that a short run stays small, large enough
# that reading a 100k-step column touches ~100 chunks, not thousands.
CHUNK_ROWS = 1024
# fullmatch, never match with '$' (which accepts a trailing newline): names become HDF5 paths and files.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@:+=-]+")
_PHASE_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class LogFileExistsError(UserError, FileExistsError):
    """The log file already exists and the logger was not asked to resume it."""


def log_path(experiment_dir, phase):
    """Where the log of `phase` lives inside an experiment directory."""
    return os.path.join(experiment_dir, "logs", f"{phase}.h5")


def snapshot_group_name(step):
    return f"step_{step:06d}"


def _utc_now_iso():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_name(name, where):
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise UserError(f"{where} name {name!r} is not allowed: use letters, digits and _ . - @ : + =")


def _is_tensor(value):
    # A tensor exists only once torch is imported: a reader that never imports torch pays nothing.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _to_numpy(value):
    """A snapshot value as something h5py can store: ndarray, or str / list of str (as object)."""
    if _is_tensor(value):
        torch = sys.modules["torch"]
        value = value.detach()
        if value.is_floating_point() and value.dtype not in (torch.float16, torch.float32, torch.float64):
            value = value.float()  # bfloat16 and the float8 types have no numpy dtype
        return value.cpu().numpy()
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.dtype.kind == "U":  # a list or array of strings: stored as variable-length UTF-8
        return array.astype(object)
    if array.dtype.kind == "O":
        raise UserError(f"cannot store a value of type {type(value).__name__} (object array); "
                        "use numbers, arrays, tensors, strings or lists of strings")
    return array


class ResearchLogger:
    """Appends per-step metrics (and occasional large arrays) to `<experiment_dir>/logs/<phase>.h5`.

    An existing file is never overwritten: `resume=True` appends to it, `resume_from_step=N` first
    drops what was logged after step N. Use it as a context manager (example: docs/RESEARCH.md).
    """

    def __init__(self, experiment_dir, phase="base_training", flush_every=100, snapshot_every=1000,
                 metadata=None, resume=False, resume_from_step=None):
        if not isinstance(phase, str) or not _PHASE_PATTERN.fullmatch(phase):
            raise UserError(f"phase {phase!r} is not a valid log name: use letters, digits, _ . -")
        if _as_int(flush_every) < 1:
            raise UserError(f"flush_every must be >= 1, got {flush_every}")
        if resume_from_step is not None and not resume:
            raise UserError("resume_from_step needs resume=True")
        self.phase = phase
        self.flush_every = int(flush_every)
        self.snapshot_every = int(snapshot_every)
        self.path = log_path(experiment_dir, phase)
        self._rows = []              # buffered (step, {name: value}) not yet in the file
        self._datasets = {}          # flat name -> h5py dataset, every column in the file
        self._known_names = set()    # columns in the file or in the buffer
        self._num_rows = 0           # rows in the file
        self._last_flushed_step = None

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        exists = os.path.exists(self.path)
        if exists and not resume:
            raise LogFileExistsError(
                f"log file {self.path} already exists; pass resume=True (with resume_from_step) "
                "to continue it, or use a new experiment or phase")
        # No HDF5 file locking: with it, no reader could open the log while the run is alive, and opening
        # fails on filesystems without locks (NFS, Lustre). The existence check prevents overwrites.
        try:
            self._file = h5py.File(self.path, "a" if exists else "w-", locking=False)
        except OSError as e:
            raise UserError(f"cannot open research log {self.path}: {e}") from e
        try:
            if exists:
                self._open_existing(metadata, resume_from_step)
            else:
                self._create_new(metadata)
            self._file.flush()
        except BaseException:
            self._file.close()
            self._file = None
            raise
        # (last step in the log, resume step) when the rows up to the resume step are gone (the log is
        # missing, or was not flushed at the checkpoint), else None: the caller warns about the hole.
        last = self._last_flushed_step
        hole = resume_from_step is not None and resume_from_step > 0 and (last or 0) < resume_from_step
        self.resume_gap = (last or 0, _as_int(resume_from_step)) if hole else None

    # ---------------------------------------------------------------- setup

    def _create_new(self, metadata):
        root = self._file
        root.attrs["phase"] = self.phase
        root.attrs["created_at"] = _utc_now_iso()
        root.attrs["metadata"] = json.dumps(metadata if metadata is not None else {}, default=str)
        root.attrs["resumed"] = "[]"
        root.create_group(SNAPSHOTS)
        root.create_group(SCALARS).create_dataset(
            STEP, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(CHUNK_ROWS,))

    def _open_existing(self, metadata, resume_from_step):
        root = self._file
        if SCALARS not in root or STEP not in root[SCALARS]:
            raise UserError(f"{self.path} is not a research log (no /{SCALARS}/{STEP})")
        snapshots = root.require_group(SNAPSHOTS)
        steps = root[SCALARS][STEP][:]
        keep = len(steps)
        if resume_from_step is not None:  # the resumed run redoes the later steps: drop their rows and snapshots
            keep = int(np.searchsorted(steps, _as_int(resume_from_step), side="right"))
            for name in [n for n in snapshots if _snapshot_step(n) > resume_from_step]:
                del snapshots[name]
        root[SCALARS][STEP].resize((keep,))
        for name, ds in _scalar_datasets(root[SCALARS]).items():
            # Also what repairs a writer killed between extending a column and extending /scalars/step
            # (a column longer than step, or a new one shorter).
            ds.resize((keep,))
            self._datasets[name] = ds
            self._known_names.add(name)
        self._num_rows = keep
        self._last_flushed_step = int(steps[keep - 1]) if keep else None
        resumed = json.loads(root.attrs.get("resumed", "[]"))
        resumed.append({"at": _utc_now_iso(), "from_step": resume_from_step})
        root.attrs["resumed"] = json.dumps(resumed)
        if metadata is not None:
            root.attrs["metadata"] = json.dumps(metadata, default=str)

    # ---------------------------------------------------------------- writing

    @property
    def closed(self):
        return self._file is None

    @property
    def last_step(self):
        """The last step logged, buffered or not (None before the first)."""
        return self._rows[-1][0] if self._rows else self._last_flushed_step

    def should_snapshot(self, step):
        """True on the steps where large arrays should be recorded: every `snapshot_every` steps."""
        return self.snapshot_every > 0 and step % self.snapshot_every == 0

    def log_step(self, step, metrics):
        """Record the metrics of one step. Scalars are buffered; anything else becomes a snapshot."""
        self._check_open()
        step = _as_int(step)
        if step < 0:
            raise UserError(f"step must be >= 0, got {step}")
        last = self.last_step
        if last is not None and step < last:
            raise UserError(f"step {step} logged after step {last}: steps must not decrease "
                            "(a resumed run should pass resume_from_step)")
        row = {}
        arrays = {}
        for name, value in metrics.items():
            kind = type(value)
            if kind is float or kind is int:  # the common case, kept cheap
                row[name] = value
            elif kind is dict:
                for sub, subvalue in value.items():
                    if type(subvalue) is dict:
                        raise UserError(f"metric {name}/{sub}: only one level of nested dicts is allowed")
                    self._add_value(f"{name}/{sub}", subvalue, row, arrays)
            else:
                self._add_value(name, value, row, arrays)
        for name in row:
            if name not in self._known_names:
                self._add_name(name)
        if arrays:
            self.log_snapshot(step, arrays)
        if not row:
            return  # arrays only: no row of NaNs in the scalars
        if self._rows and self._rows[-1][0] == step:
            self._rows[-1][1].update(row)
        elif step == self._last_flushed_step:  # already in the file: fill its row in place
            for name, value in row.items():
                if name not in self._datasets:
                    self._create_column(name, self._num_rows)
                self._datasets[name][self._num_rows - 1] = float(value)
            self._file.flush()
            return
        else:
            self._rows.append((step, row))
        if len(self._rows) >= self.flush_every:
            self.flush()

    def _add_value(self, name, value, row, arrays):
        """Sort one metric into the scalar row or the snapshot arrays (None: missing, NaN)."""
        if value is None:
            return
        if type(value) in (float, int, bool) or isinstance(value, (np.number, np.bool_)) or (
                isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf"):
            row[name] = float(value)
        elif _is_tensor(value) and value.dim() == 0:
            row[name] = float(value.item())
        else:
            arrays[name] = value

    def _add_name(self, name):
        parts = name.split("/") if isinstance(name, str) else [name]
        if len(parts) > 2:
            raise UserError(f"metric {name!r}: at most one '/' (one level of nesting) is allowed")
        for part in parts:
            _check_name(part, "metric")
        if name == STEP:
            raise UserError(f"'{STEP}' is reserved for the step column; rename the metric")
        prefix = name.split("/")[0]
        for known in self._known_names:
            if known == prefix or known.startswith(name + "/"):
                raise UserError(f"metric {name!r} clashes with {known!r}: a name cannot be both "
                                "a value and a group of nested values")
        self._known_names.add(name)

    def _create_column(self, name, length):
        # fillvalue NaN: rows before the metric first appeared, and any row a later block
        # extends it by without a value, read back as NaN for free (no chunk is even written).
        ds = self._file[SCALARS].create_dataset(
            name, shape=(length,), maxshape=(None,), dtype=np.float64,
            chunks=(CHUNK_ROWS,), fillvalue=np.nan)
        self._datasets[name] = ds

    def flush(self):
        """Append the buffered rows as one block and flush the file to disk."""
        self._check_open()
        if self._rows:
            start, count = self._num_rows, len(self._rows)
            end = start + count
            values = [row for _, row in self._rows]
            names = dict.fromkeys(name for row in values for name in row)
            for name in names:
                if name not in self._datasets:
                    self._create_column(name, start)
            for name, ds in self._datasets.items():
                if name in names:
                    column = np.fromiter((row.get(name, np.nan) for row in values), dtype=np.float64, count=count)
                    _append_block(ds, start, column)
                else:
                    ds.id.set_extent((end,))  # absent metric: the new rows read as the NaN fill value
            # Step last: a reader trusts only the rows that /scalars/step covers.
            _append_block(self._file[SCALARS][STEP], start,
                          np.fromiter((s for s, _ in self._rows), dtype=np.int64, count=count))
            self._num_rows = end
            self._last_flushed_step = self._rows[-1][0]
            self._rows = []
        self._file.flush()

    def log_snapshot(self, step, arrays):
        """Store large arrays (or strings / lists of strings) under /snapshots/step_NNNNNN/, a dict value
        (one level) as a subgroup. Written and flushed at once: snapshots are rare by design."""
        self._check_open()
        step = _as_int(step)
        if step < 0:
            raise UserError(f"snapshot step must be >= 0, got {step}")
        group = self._file[SNAPSHOTS].require_group(snapshot_group_name(step))
        for name, value in arrays.items():
            if type(value) is dict:
                for sub, subvalue in value.items():
                    if type(subvalue) is dict:
                        raise UserError(f"snapshot {name}/{sub}: only one level of nested dicts is allowed")
                    self._write_array(group, f"{name}/{sub}", subvalue)
            else:
                self._write_array(group, name, value)
        self._file.flush()

    @staticmethod
    def _write_array(group, name, value):
        for part in name.split("/"):
            _check_name(part, "snapshot")
        data = _to_numpy(value)
        if name in group:
            del group[name]  # the same step snapshotted twice: the later value wins
        is_text = isinstance(data, str) or data.dtype == object
        group.create_dataset(name, data=data, dtype=h5py.string_dtype("utf-8") if is_text else None)

    def _check_open(self):
        if self._file is None:
            raise ValueError(f"research logger for {self.path} is closed")

    def close(self):
        """Write what is buffered and close the file; safe to call more than once."""
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()  # also on an exception: the steps before a crash are the interesting ones
        return False


def _append_block(ds, start, data):
    """`ds.resize((start + len(data),)); ds[start:] = data` without the selection machinery of h5py's
    high-level indexing, which is most of the per-block cost."""
    end = start + data.shape[0]
    ds.id.set_extent((end,))
    file_space = ds.id.get_space()
    file_space.select_hyperslab((start,), (data.shape[0],))
    ds.id.write(h5py.h5s.create_simple((data.shape[0],)), file_space, data)


def _snapshot_step(group_name):
    return int(group_name[len("step_"):])


def _scalar_datasets(scalars_group):
    """{flat name: dataset} for every column under /scalars except step (one nesting level)."""
    found = {}
    for name, obj in scalars_group.items():
        if isinstance(obj, h5py.Group):
            for sub, subobj in obj.items():
                if isinstance(subobj, h5py.Dataset):
                    found[f"{name}/{sub}"] = subobj
        elif name != STEP:
            found[name] = obj
    return found


# -------------------------------------------------------------------- readers

def _open_for_reading(path):
    if not os.path.exists(path):
        raise UserError(f"no research log at {path}")
    # locking=False: must match the writer's setting when both live in one process, and a reader
    # must never be refused because a writer is alive.
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise UserError(f"cannot read research log {path}: {e}") from e


def _aligned(ds, num_rows):
    """A column cut or NaN-padded to the length of /scalars/step (see the flush order)."""
    data = ds[:num_rows]
    if data.shape[0] < num_rows:
        data = np.concatenate([data, np.full(num_rows - data.shape[0], np.nan)])
    return data


def read_scalars(path):
    """{name: np.ndarray} for every scalar column, all aligned with the int64 "step" column."""
    with _open_for_reading(path) as f:
        scalars = f[SCALARS]
        steps = scalars[STEP][:]
        out = {STEP: steps}
        for name, ds in sorted(_scalar_datasets(scalars).items()):
            out[name] = _aligned(ds, steps.shape[0])
        return out


def read_scalar(path, name):
    """One scalar column (float64, NaN where absent), or the int64 "step" column."""
    with _open_for_reading(path) as f:
        steps = f[SCALARS][STEP]
        columns = dict(_scalar_datasets(f[SCALARS]), **{STEP: steps})
        if name not in columns:
            others = sorted(set(columns) - {STEP})
            raise UserError(f"no scalar {name!r} in {path}; it has: {', '.join(others) or 'none'}")
        return _aligned(columns[name], steps.shape[0])


def read_attrs(path):
    """The root attributes: phase, created_at, metadata (decoded) and the list of resumes."""
    with _open_for_reading(path) as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    for key in ("metadata", "resumed"):
        if key in attrs:
            attrs[key] = json.loads(attrs[key])
    return attrs


def list_snapshots(path):
    """The steps that have a snapshot, in increasing order."""
    with _open_for_reading(path) as f:
        return sorted(_snapshot_step(name) for name in f.get(SNAPSHOTS, {}))


def _read_group(group):
    out = {}
    for name, obj in group.items():
        if isinstance(obj, h5py.Group):
            out[name] = _read_group(obj)
        elif h5py.check_string_dtype(obj.dtype) is not None:
            value = obj.asstr()[()]
            out[name] = value.tolist() if isinstance(value, np.ndarray) else value
        else:
            out[name] = obj[()]
    return out


def read_snapshot(path, step):
    """{name: np.ndarray | str | list[str] | nested dict} stored at `step`."""
    with _open_for_reading(path) as f:
        name = snapshot_group_name(_as_int(step))
        if name not in f.get(SNAPSHOTS, {}):
            available = sorted(_snapshot_step(n) for n in f.get(SNAPSHOTS, {}))
            raise UserError(f"no snapshot at step {step} in {path}; steps with one: {available[:20]}")
        return _read_group(f[SNAPSHOTS][name])
