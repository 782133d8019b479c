"""Tests for nanochat.research_logger: round trips, block flushing, NaN alignment, SIGKILL, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from nanochat.common import UserError
from nanochat.research_logger import (
    LogFileExistsError, ResearchLogger, list_snapshots, log_path, read_attrs, read_scalar,
    read_scalars, read_snapshot,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A reader in a separate process that imports only h5py: what it sees is what is on disk.
_STEPS_ON_DISK = (
    "import sys, h5py\n"
    "with h5py.File(sys.argv[1], 'r', locking=False) as f:\n"
    "    print(f['scalars/step'].shape[0])\n"
)


def steps_on_disk(path):
    out = subprocess.run([sys.executable, "-c", _STEPS_ON_DISK, path], capture_output=True, text=True,
                         check=True, timeout=60)
    return int(out.stdout)


def test_round_trip_of_every_metric_kind(tmp_path):
    vec = np.arange(5, dtype=np.float32)
    mat = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with ResearchLogger(tmp_path, flush_every=3, metadata={"depth": 4, "direction": "backward"}) as logger:
        for step in range(4):
            logger.log_step(step, {
                "py_float": 0.5 + step,
                "py_int": 7 + step,
                "py_bool": step % 2 == 0,
                "np_scalar": np.float32(1.25) * step,
                "np_int": np.int64(3),
                "np_0d": np.array(2.5),
                "torch_0d": torch.tensor(float(step) * 2),
                "torch_bf16": torch.tensor(1.5, dtype=torch.bfloat16),
                "grad_norm": {"layer0": 1.2 * step, "layer1": torch.tensor(0.3)},
                "vec": vec + step,
                "mat": mat,
            })
    path = log_path(tmp_path, "base_training")
    assert path == os.path.join(str(tmp_path), "logs", "base_training.h5")

    scalars = read_scalars(path)
    assert scalars["step"].dtype == np.int64
    np.testing.assert_array_equal(scalars["step"], [0, 1, 2, 3])
    np.testing.assert_array_equal(scalars["py_float"], [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_array_equal(scalars["py_int"], [7, 8, 9, 10])
    np.testing.assert_array_equal(scalars["py_bool"], [1, 0, 1, 0])
    np.testing.assert_allclose(scalars["np_scalar"], [0, 1.25, 2.5, 3.75])
    np.testing.assert_array_equal(scalars["np_int"], [3] * 4)
    np.testing.assert_array_equal(scalars["np_0d"], [2.5] * 4)
    np.testing.assert_array_equal(scalars["torch_0d"], [0, 2, 4, 6])
    np.testing.assert_array_equal(scalars["torch_bf16"], [1.5] * 4)
    np.testing.assert_allclose(scalars["grad_norm/layer0"], [0, 1.2, 2.4, 3.6])
    np.testing.assert_allclose(scalars["grad_norm/layer1"], [0.3] * 4, rtol=1e-6)
    assert all(v.dtype == np.float64 for k, v in scalars.items() if k != "step")
    assert "vec" not in scalars and "mat" not in scalars
    np.testing.assert_allclose(read_scalar(path, "grad_norm/layer0"), scalars["grad_norm/layer0"])

    # Arrays given to log_step become snapshots of their step.
    assert list_snapshots(path) == [0, 1, 2, 3]
    snap = read_snapshot(path, 2)
    np.testing.assert_array_equal(snap["vec"], vec + 2)
    assert snap["vec"].dtype == np.float32
    np.testing.assert_array_equal(snap["mat"], mat.numpy())

    attrs = read_attrs(path)
    assert attrs["phase"] == "base_training"
    assert attrs["metadata"] == {"depth": 4, "direction": "backward"}
    assert "created_at" in attrs
    with h5py.File(path, "r") as f:  # the layout docs/DESIGN.md §9 describes
        assert f["scalars/step"].maxshape == (None,)
        assert f["scalars/py_float"].maxshape == (None,) and f["scalars/py_float"].chunks
        assert json.loads(f.attrs["metadata"])["depth"] == 4
        assert "step_000002" in f["snapshots"]


def test_blocks_are_buffered_then_flushed(tmp_path):
    logger = ResearchLogger(tmp_path, flush_every=10)
    try:
        for step in range(9):
            logger.log_step(step, {"loss": float(step)})
        assert steps_on_disk(logger.path) == 0  # still in memory
        logger.log_step(9, {"loss": 9.0})
        assert steps_on_disk(logger.path) == 10  # a second process sees the block
        np.testing.assert_array_equal(read_scalar(logger.path, "loss"), np.arange(10.0))
        for step in range(10, 15):
            logger.log_step(step, {"loss": float(step)})
        assert steps_on_disk(logger.path) == 10
    finally:
        logger.close()
    logger.close()  # idempotent
    assert logger.closed
    np.testing.assert_array_equal(read_scalars(logger.path)["step"], np.arange(15))
    with pytest.raises(ValueError):
        logger.log_step(15, {"loss": 0.0})


def test_context_manager_flushes_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with ResearchLogger(tmp_path, flush_every=100) as logger:
            logger.log_step(0, {"loss": 1.0})
            raise RuntimeError("training blew up")
    assert logger.closed
    np.testing.assert_array_equal(read_scalar(logger.path, "loss"), [1.0])


def test_late_and_missing_metrics_are_nan_aligned(tmp_path):
    with ResearchLogger(tmp_path, flush_every=4) as logger:
        for step in range(10):
            metrics = {"loss": float(step)}
            if step >= 6:  # appears late, in a later block than the first
                metrics["val_bpb"] = 10.0 + step
            if step % 3 == 0:  # sparse
                metrics["grad_norm"] = {"layer0": float(step)}
            logger.log_step(step, metrics)
    scalars = read_scalars(logger.path)
    assert {len(v) for v in scalars.values()} == {10}
    nan = np.nan
    np.testing.assert_array_equal(scalars["val_bpb"], [nan] * 6 + [16.0, 17.0, 18.0, 19.0])
    np.testing.assert_array_equal(scalars["grad_norm/layer0"],
                                  [0, nan, nan, 3, nan, nan, 6, nan, nan, 9])


def test_same_step_fills_the_same_row(tmp_path):
    with ResearchLogger(tmp_path, flush_every=2) as logger:
        logger.log_step(0, {"loss": 1.0})
        logger.log_step(0, {"val_bpb": 2.0})  # still buffered
        logger.log_step(1, {"loss": 3.0})      # block written
        logger.log_step(1, {"val_bpb": 4.0})   # fills the row already on disk
        with pytest.raises(UserError, match="must not decrease"):
            logger.log_step(0, {"loss": 0.0})
    scalars = read_scalars(logger.path)
    np.testing.assert_array_equal(scalars["step"], [0, 1])
    np.testing.assert_array_equal(scalars["loss"], [1.0, 3.0])
    np.testing.assert_array_equal(scalars["val_bpb"], [2.0, 4.0])


def test_tensors_are_read_when_logged(tmp_path):
    # In-place updates of a tensor after log_step do not leak into the log.
    accumulator = torch.zeros(())
    with ResearchLogger(tmp_path, flush_every=3) as logger:
        for step in range(5):
            accumulator.fill_(step * 0.5)
            logger.log_step(step, {"loss": accumulator, "ratio": torch.tensor(step, dtype=torch.int32)})
            accumulator.zero_()
    scalars = read_scalars(logger.path)
    np.testing.assert_array_equal(scalars["loss"], [0, 0.5, 1.0, 1.5, 2.0])
    np.testing.assert_array_equal(scalars["ratio"], [0, 1, 2, 3, 4])


@pytest.mark.slow  # kill -9 of a writer process
def test_killed_writer_leaves_a_readable_file(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "_killed_writer.py"), str(tmp_path), "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    announced = -1
    try:
        deadline = time.time() + 60
        while announced < 29:
            line = proc.stdout.readline()
            assert line, f"writer exited early: {proc.stderr.read()}"
            assert time.time() < deadline, "writer too slow"
            announced = int(line.split()[1])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    scalars = read_scalars(log_path(tmp_path, "base_training"))
    steps = scalars["step"]
    k = int(steps[-1])
    assert k >= announced >= 29
    np.testing.assert_array_equal(steps, np.arange(k + 1))  # 0..k, contiguous, whole blocks
    assert (k + 1) % 10 == 0
    np.testing.assert_allclose(scalars["loss"], 1.0 / (steps + 1))
    np.testing.assert_array_equal(scalars["grad_norm/layer0"], steps.astype(np.float64))


def test_existing_file_is_refused_without_resume(tmp_path):
    with ResearchLogger(tmp_path) as logger:
        logger.log_step(0, {"loss": 1.0})
    with pytest.raises(LogFileExistsError) as info:
        ResearchLogger(tmp_path)
    assert isinstance(info.value, UserError) and isinstance(info.value, FileExistsError)
    with pytest.raises(UserError, match="resume=True"):
        ResearchLogger(tmp_path, resume_from_step=0)
    # another phase is another file
    ResearchLogger(tmp_path, phase="mid_training").close()
    np.testing.assert_array_equal(read_scalar(logger.path, "loss"), [1.0])


def test_resume_truncates_and_appends(tmp_path):
    with ResearchLogger(tmp_path, flush_every=4, snapshot_every=5, metadata={"run": 1}) as logger:
        for step in range(12):
            logger.log_step(step, {"loss": float(step)})
            if logger.should_snapshot(step):
                logger.log_snapshot(step, {"per_token_loss": np.full(3, step)})
    assert list_snapshots(logger.path) == [0, 5, 10]

    # The run crashed after step 11; its last checkpoint was at step 7.
    with ResearchLogger(tmp_path, flush_every=4, snapshot_every=5, resume=True, resume_from_step=7,
                        metadata={"run": 2}) as logger:
        assert logger.last_step == 7
        assert list_snapshots(logger.path) == [0, 5]
        for step in range(8, 14):
            logger.log_step(step, {"loss": 100.0 + step, "val_bpb": 1.0})
    scalars = read_scalars(logger.path)
    np.testing.assert_array_equal(scalars["step"], np.arange(14))
    np.testing.assert_array_equal(scalars["loss"], list(range(8)) + [100.0 + s for s in range(8, 14)])
    np.testing.assert_array_equal(np.isnan(scalars["val_bpb"]), [True] * 8 + [False] * 6)
    attrs = read_attrs(logger.path)
    assert attrs["metadata"] == {"run": 2}
    assert [r["from_step"] for r in attrs["resumed"]] == [7]

    # resume=True without a step keeps everything and continues after it
    with ResearchLogger(tmp_path, resume=True) as logger:
        logger.log_step(14, {"loss": 0.0})
    assert read_scalar(logger.path, "step")[-1] == 14


def test_should_snapshot(tmp_path):
    with ResearchLogger(tmp_path, snapshot_every=250) as logger:
        assert [s for s in range(1001) if logger.should_snapshot(s)] == [0, 250, 500, 750, 1000]
    with ResearchLogger(tmp_path, phase="off", snapshot_every=-1) as logger:
        assert not any(logger.should_snapshot(s) for s in range(1000))


def test_snapshots_with_strings_and_nesting(tmp_path):
    with ResearchLogger(tmp_path) as logger:
        logger.log_snapshot(1000, {
            "direction": ["forward", "backward", "backward"],
            "per_token_loss": np.arange(12, dtype=np.float32).reshape(3, 4),
            "note": "first eval",
            "names": np.array(["a", "bé"]),
            "act_std": {"layer0": torch.ones(4), "layer1": torch.full((4,), 2.0, dtype=torch.bfloat16)},
        })
        logger.log_snapshot(5, {"x": [1, 2, 3]})
        logger.log_step(1001, {"hist": np.arange(3)})  # arrays only: a snapshot, no scalar row
    assert list_snapshots(logger.path) == [5, 1000, 1001]
    assert len(read_scalars(logger.path)["step"]) == 0
    snap = read_snapshot(logger.path, 1000)
    assert snap["direction"] == ["forward", "backward", "backward"]
    assert snap["note"] == "first eval"
    assert snap["names"] == ["a", "bé"]
    np.testing.assert_array_equal(snap["per_token_loss"], np.arange(12).reshape(3, 4))
    assert set(snap["act_std"]) == {"layer0", "layer1"}
    np.testing.assert_array_equal(snap["act_std"]["layer1"], np.full(4, 2.0))
    np.testing.assert_array_equal(read_snapshot(logger.path, 5)["x"], [1, 2, 3])
    with pytest.raises(UserError, match="no snapshot"):
        read_snapshot(logger.path, 6)


def test_bad_input_is_a_user_error(tmp_path):
    with ResearchLogger(tmp_path) as logger:
        with pytest.raises(UserError, match="reserved"):
            logger.log_step(0, {"step": 1.0})
        with pytest.raises(UserError, match="one level"):
            logger.log_step(0, {"a": {"b": {"c": 1.0}}})
        logger.log_step(0, {"grad_norm": 1.0})
        with pytest.raises(UserError, match="clashes"):
            logger.log_step(1, {"grad_norm": {"layer0": 1.0}})
        with pytest.raises(UserError):
            logger.log_step(-1, {"loss": 1.0})
    with pytest.raises(UserError):
        ResearchLogger(tmp_path, phase="../escape")
    with pytest.raises(UserError, match="no scalar"):
        read_scalar(logger.path, "missing")
    with pytest.raises(UserError, match="no research log"):
        read_scalars(tmp_path / "nope.h5")


def test_logger_benchmark_reports_time_and_size(capsys):
    from scripts.bench_logger import main
    main(["--steps=300", "--flush_every=50"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "Python floats" in lines[0] and "torch tensors" in lines[1]
    for line in lines:
        assert float(line.split(":")[1].split("µs")[0]) > 0
        assert "flush_every=50, 300 steps" in line


# ---- from the safety review (docs/SAFETY.md): a resumed log is contiguous

def test_resumed_log_is_contiguous_and_a_hole_is_reported(tmp_path):
    from nanochat.research_logger import ResearchLogger, read_scalar
    with ResearchLogger(str(tmp_path)) as log:
        for s in range(1, 7):
            log.log_step(s, {"loss": float(s)})
    with ResearchLogger(str(tmp_path), resume=True, resume_from_step=4) as log:
        assert log.resume_gap is None
        for s in range(5, 9):
            log.log_step(s, {"loss": float(s)})
    assert list(read_scalar(log.path, "step")) == list(range(1, 9))
    with ResearchLogger(str(tmp_path), resume=True, resume_from_step=20) as log:
        assert log.resume_gap == (8, 20)
    with ResearchLogger(str(tmp_path / "other"), resume=True, resume_from_step=5) as log:
        assert log.resume_gap == (0, 5)  # no log at all to resume
