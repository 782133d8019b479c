"""Every command that writes checks it can write before the work, and writes through the one atomic
writer: a read-only place, a path under a file or a full disk is one clear line, nothing is
half-written and no temporary file is left (docs/SAFETY.md, "Writes"). Also: clear messages for
a checkpoint meta without a direction in base_eval, --eval_tokens=0, and plural progress units.

Root ignores file permissions, so "cannot be written" is a path under a regular file (ENOTDIR
for every user) and a full disk is a writer monkeypatched to raise OSError(ENOSPC)."""

import errno
import io
import json
import os

import pytest

from nanochat.common import UserError


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(directory):
    return [n for n in os.listdir(directory) if ".tmp" in n] if os.path.isdir(directory) else []


# ---- the atomic writer's message ---------------------------------------------------------------

def test_a_full_disk_says_resume_only_for_checkpoints(tmp_path, monkeypatch):
    import torch
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.paths import atomic_write
    with pytest.raises(UserError) as info:
        atomic_write(str(tmp_path / "record.json"), enospc)
    assert "no space left" in str(info.value) and "resume from" not in str(info.value)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(UserError, match="no space left.*resume from the last saved step"):
        save_checkpoint(str(tmp_path / "ckpt"), 3, {"w": torch.zeros(2)}, None, {"step": 3})
    assert os.listdir(tmp_path / "ckpt") == []


# ---- evaluations: checked before evaluating ------------------------------------------------------

def test_evaluation_records_check_their_directory_before_any_work(tmp_path):
    from nanochat.evaluations import record_path, refuse_existing
    (tmp_path / "evaluations").write_text("a file where the directory should be")
    with pytest.raises(UserError, match="cannot write to the evaluations directory"):
        refuse_existing([record_path(str(tmp_path / "evaluations"), "bpb", 5)], overwrite=False)
    refuse_existing([record_path(str(tmp_path / "ok"), "bpb", 5)], overwrite=False)  # created, probe removed
    assert os.listdir(tmp_path / "ok") == []


def test_base_eval_refuses_an_unwritable_evaluations_dir_before_evaluating(trained_base_dir, monkeypatch):
    """The whole evaluation used to run and then die writing its record (results lost)."""
    from conftest import TRAINED_TAGS
    import scripts.base_eval as base_eval
    run_dir = os.path.join(trained_base_dir, "base_checkpoints", TRAINED_TAGS["forward"])
    evaluations = os.path.join(run_dir, "evaluations")
    if os.path.isdir(evaluations):
        import shutil
        shutil.rmtree(evaluations)
    with open(evaluations, "w") as f:
        f.write("not a directory")
    monkeypatch.setattr(base_eval, "compute_init", lambda *a: pytest.fail("evaluation started before the check"))
    with pytest.raises(UserError, match="cannot write to the evaluations directory"):
        base_eval.main([f"--model_tag={TRAINED_TAGS['forward']}", "--eval=bpb", "--device_type=cpu"])


def test_base_eval_says_not_a_nanochat_checkpoint_for_a_meta_without_direction(trained_base_dir):
    from conftest import TRAINED_TAGS
    from nanochat.checkpoint_manager import find_last_step, meta_path
    import scripts.base_eval as base_eval
    run_dir = os.path.join(trained_base_dir, "base_checkpoints", TRAINED_TAGS["forward"])
    path = meta_path(run_dir, find_last_step(run_dir))
    with open(path) as f:
        meta = json.load(f)
    for key in ("direction", "direction_spec"):
        meta.pop(key, None)
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(UserError, match="not a nanochat checkpoint"):
        base_eval.main([f"--model_tag={TRAINED_TAGS['forward']}", "--eval=bpb", "--device_type=cpu"])


# ---- data, export, lock file ---------------------------------------------------------------------

def test_dataset_overwrite_checks_the_directory_before_deleting(tmp_path):
    from nanochat.dataset import prepare_data
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write to the data directory"):
        prepare_data(builtin="stdlib", max_docs=10, docs_per_shard=5, overwrite=True,
                     data_dir=str(tmp_path / "file" / "base_data"))


def test_dataset_on_a_full_disk_leaves_no_partial_corpus(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    from nanochat.dataset import list_shards, prepare_data
    data = str(tmp_path / "base_data")
    prepare_data(builtin="stdlib", max_docs=20, docs_per_shard=5, data_dir=data)
    assert len(list_shards(data)) == 4
    real, calls = pq.write_table, []

    def fills_up(table, where, **kw):
        calls.append(where)
        if len(calls) > 2:
            enospc()
        return real(table, where, **kw)
    monkeypatch.setattr(pq, "write_table", fills_up)
    with pytest.raises(UserError, match="no space left") as info:
        prepare_data(builtin="stdlib", max_docs=20, docs_per_shard=5, overwrite=True, data_dir=data)
    assert "resume from" not in str(info.value)
    assert list_shards(data) == [] and leftovers(data) == []


def tiny_checkpoint(tmp_path, monkeypatch, tok):
    """A random 1-layer forward model saved as base checkpoint 'w' under a fresh base dir."""
    import torch
    from nanochat.checkpoint_manager import checkpoint_dir_for, save_checkpoint
    from nanochat.direction import DirectionSpec
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import tokenizer_dir
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    tok.save(tokenizer_dir(str(base)))
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.get_vocab_size(), sequence_len=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                       intermediate_size=64)
    model = GPT.build(config, "cpu")
    meta = {"phase": "base", "model_tag": "w", "model_config": config.to_dict(), "vocab_size": tok.get_vocab_size(),
            "direction_spec": DirectionSpec.from_tokenizer("forward", tok).to_meta()}
    save_checkpoint(checkpoint_dir_for("base", "w"), 1, model.state_dict(), None, meta)


def test_export_hf_refuses_a_file_or_a_path_under_a_file_before_loading(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    import scripts.export_hf as export_hf
    monkeypatch.setattr(export_hf, "load_model", lambda *a, **kw: pytest.fail("loaded before checking --out"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        export_hf.main(["--model_tag=w", f"--out={tmp_path / 'file'}"])
    with pytest.raises(UserError, match="cannot write to the export folder"):
        export_hf.main(["--model_tag=w", f"--out={tmp_path / 'file' / 'sub'}"])
    assert (tmp_path / "file").read_text() == "x"


def test_export_hf_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch, tok):
    pytest.importorskip("safetensors")
    import safetensors.torch
    from scripts.export_hf import main
    tiny_checkpoint(tmp_path, monkeypatch, tok)
    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    out = tmp_path / "export"
    with pytest.raises(UserError, match="no space left") as info:
        main(["--source=base", "--model_tag=w", f"--out={out}"])
    assert "resume from" not in str(info.value)
    assert os.listdir(out) == []  # neither the JSON files written before, nor a temporary


def test_the_lock_file_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    from nanochat import locking
    monkeypatch.setattr(locking.os, "write", enospc)
    with pytest.raises(UserError, match="cannot write the lock file .*No space left on device"):
        locking.acquire_run_lock(str(tmp_path / "run"), trainer=False)


# ---- messages ------------------------------------------------------------------------------------

def test_eval_tokens_zero_names_its_real_meaning():
    from scripts.base_train import build_parser, validate_args
    args = build_parser().parse_args(["--eval_tokens=0"])
    with pytest.raises(UserError, match="-1 for the default") as info:
        validate_args(args)
    assert "off" not in str(info.value)


@pytest.mark.parametrize("unit,total,expected", [("batch", 73, "73/73 batches"), ("doc", 5, "5/5 docs"),
                                                 ("shard", 1, "1/1 shard"), ("prompt", 2, "2/2 prompts")])
def test_progress_units_are_proper_plurals(unit, total, expected, monkeypatch):
    from nanochat.progress import Progress
    monkeypatch.setenv("NANOCHAT_PROGRESS", "plain")
    stream = io.StringIO()
    bar = Progress(total=total, unit=unit, desc="bpb", stream=stream, min_time_s=0)
    bar.n = total
    assert expected in bar.line()
