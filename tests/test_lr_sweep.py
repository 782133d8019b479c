"""scripts.lr_sweep: real base_train runs, results kept by configuration, table printed."""

import json

import pytest

from conftest import run_inprocess

FLAGS = ["--depths=1", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=128",
         "--num_iterations=2", "--eval_tokens=500"]


@pytest.mark.slow  # each configuration is a base_train process
def test_confirm_runs_records_and_reuses(base_dir, tmp_path):
    out = str(tmp_path / "sweep.jsonl")
    cfg = "--configs=original:0.02:0.2:0.004;match_rms_adamw:0.01:0.2:0.004"
    r = run_inprocess("scripts.lr_sweep", "--stage=confirm", cfg, f"--out={out}", *FLAGS, base_dir=base_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(out)]
    assert {row["matrix_lr_scaling"] for row in rows} == {"original", "match_rms_adamw"}
    assert all(0 < row["bpb"] < 20 for row in rows)
    again = run_inprocess("scripts.lr_sweep", "--stage=confirm", cfg, f"--out={out}", *FLAGS, base_dir=base_dir)
    assert "2 earlier runs reused" in again.stdout and len(open(out).readlines()) == 2
    table = run_inprocess("scripts.lr_sweep", "--stage=table", f"--out={out}", base_dir=base_dir)
    assert table.stdout.count("| 1 | forward |") == 2
    bad = run_inprocess("scripts.lr_sweep", "--stage=confirm", "--configs=original:0.02", f"--out={out}", *FLAGS,
                        base_dir=base_dir)
    assert bad.returncode == 2 and "scaling:matrix_lr" in bad.stderr
