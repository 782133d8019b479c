"""nanochat.paths: tags and ids are plain names (no path escapes the base dir), and the temporary
file names of every writer are recognised (and removed after a kill)."""

import os

import pytest

from conftest import train_tiny
from nanochat.common import UserError


@pytest.mark.parametrize("bad", ["../x", "../../../x", "/abs/path", "a/b", "..", ".hidden", "", "a\\b", "x" * 200])
def test_validate_name_refuses_anything_but_a_plain_name(bad):
    from nanochat.experiment_config import ExperimentConfig
    from nanochat.paths import validate_name
    with pytest.raises(UserError, match="tag"):
        validate_name(bad, "model tag")
    with pytest.raises(UserError, match="experiment id"):
        ExperimentConfig.validate_id(bad)


def test_path_tags_are_refused_by_every_entry_point(base_dir, tmp_path):
    from nanochat.checkpoint_manager import artifact_dirs, checkpoint_dir_for, resolve_checkpoint
    from scripts.mid_train import main as mid_main
    outside = tmp_path / "outside"
    for call in (lambda: train_tiny("--num_iterations=1", tag=str(outside)),
                 lambda: train_tiny("--num_iterations=1", tag="../../outside"),
                 lambda: mid_main(["--model_tag=a", "--output_tag=../../../outside"]),
                 lambda: checkpoint_dir_for("base", "../x"), lambda: artifact_dirs("sft", "/x"),
                 lambda: resolve_checkpoint("base", "a/../../b")):
        with pytest.raises(UserError, match="invalid"):
            call()
    assert not outside.exists()
    assert not os.path.exists(os.path.join(os.path.dirname(base_dir), "outside"))


def test_temporary_file_names_of_every_writer_are_recognised(tmp_path):
    from nanochat.paths import remove_stale_temporaries
    temporary = ["model_000002.pt.tmp123", "bpb_step000002.json.tmp", "token_bytes.tmp.npy", "gap.png.tmp77.png",
                 ".config.json.abc123.tmp"]
    kept = ["model_000002.pt", "meta_000002.json", "bpb_step000002.json", "base_training.attempt1.h5"]
    for name in temporary + kept:
        (tmp_path / name).write_text("x")
    assert sorted(remove_stale_temporaries(str(tmp_path))) == sorted(temporary)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
