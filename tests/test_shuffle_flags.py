"""--shuffle in the phase scripts: on by default, recorded in the checkpoint, kept on resume; a run
saved before the flag existed resumes in stored order (docs/DIRECTIONS.md, "The order of documents")."""

import argparse
import types

import pytest
from nanochat.common import UserError
from scripts.phase_flags import resolve_model_data_flags
from tests.conftest import ckpt_dir, train_tiny


def test_base_train_shuffles_by_default_and_records_it(base_dir):
    train_tiny("--num_iterations=2", tag="shuffled")
    train_tiny("--num_iterations=2", "--shuffle=0", tag="stored")
    from nanochat.checkpoint_manager import load_meta
    metas = {t: load_meta(ckpt_dir(base_dir, t), 2) for t in ("shuffled", "stored")}
    assert metas["shuffled"]["user_config"]["shuffle"] == 1 and metas["stored"]["user_config"]["shuffle"] == 0
    from nanochat.checkpoint_manager import load_checkpoint
    for tag in metas:  # the saved data position says which order it is a position in
        _, state, _ = load_checkpoint(ckpt_dir(base_dir, tag), 2, "cpu", load_optimizer=True)
        assert state["dataloader"]["shuffle"] is (tag == "shuffled")
    # resuming with the other order is refused before any step
    with pytest.raises(UserError) as e:
        train_tiny("--num_iterations=4", "--resume_from_step=2", "--shuffle=0", tag="shuffled")
    assert "--shuffle=0" in str(e.value) and "checkpoint: 1" in str(e.value)


def test_resolve_flags_reads_a_run_saved_before_shuffle_as_stored_order():
    defaults = {"shuffle": 1, "seed": 42}
    run = types.SimpleNamespace(resume_step=5, checkpoint_dir="somewhere")
    old = argparse.Namespace(shuffle=None, seed=None)
    resolve_model_data_flags(old, defaults, {"seed": 3}, run)  # a checkpoint without the flag
    assert (old.shuffle, old.seed) == (0, 3)
    fresh = argparse.Namespace(shuffle=None, seed=None)
    resolve_model_data_flags(fresh, defaults, None, run)
    assert (fresh.shuffle, fresh.seed) == (1, 42)
    with pytest.raises(UserError):
        resolve_model_data_flags(argparse.Namespace(shuffle=1, seed=None), defaults, {"seed": 3}, run)
