"""Every phase resumes through the same code (nanochat/phase_run.py): a run stopped at a saved step
and resumed ends with exactly the weights of the run that was never stopped, for mid, SFT and RL
(base: tests/test_base_train.py), in every direction; and a resume that would change the data is
refused."""

import importlib
import os

import pytest
import torch

from conftest import copy_base, save_random_parents
from nanochat.checkpoint_manager import list_steps, load_meta, remove_steps
from nanochat.common import UserError
from nanochat.direction import DirectionSpec

PHASES = {  # script, its checkpoint folder, flags of a tiny run
    "mid": ("scripts.mid_train", "mid_checkpoints",
            ["--device_batch_size=2", "--max_seq_len=32", "--eval_every=-1", "--eval_batches=1"]),
    "sft": ("scripts.chat_sft", "chatsft_checkpoints",
            ["--device_batch_size=2", "--max_seq_len=32", "--eval_every=-1", "--eval_batches=1"]),
    "rl": ("scripts.chat_rl", "chatrl_checkpoints",
           ["--examples_per_step=2", "--num_samples=2", "--max_new_tokens=4", "--eval_examples=1", "--eval_k=2",
            "--eval_every=-1", "--init_lr_frac=1.0"]),
}


@pytest.fixture(scope="module")
def parents(corpus_template, tmp_path_factory):
    """A base dir with one untrained tiny base checkpoint per direction (tags fwd, bwd, bidi; step 3)."""
    return save_random_parents(copy_base(corpus_template["dir"], tmp_path_factory, "resume"))


def run_phase(phase, *flags):
    importlib.import_module(PHASES[phase][0]).main(
        ["--source=base", "--device_type=cpu", *PHASES[phase][2], *flags])


def weights(base, phase, tag, step):
    path = os.path.join(base, PHASES[phase][1], tag, f"model_{step:06d}.pt")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("phase,tag", [("mid", "bidi"), ("sft", "bwd"), ("rl", "fwd"), ("rl", "bidi")])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(parents, monkeypatch, phase, tag):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", parents)
    run_phase(phase, f"--model_tag={tag}", f"--output_tag={tag}_{phase}_whole", "--num_iterations=4")
    stopped = f"{tag}_{phase}_stopped"
    run_phase(phase, f"--model_tag={tag}", f"--output_tag={stopped}", "--num_iterations=4", "--save_every=2")
    ckpt = os.path.join(parents, PHASES[phase][1], stopped)
    assert list_steps(ckpt) == [2, 4]
    remove_steps(ckpt, [4])  # as if the run had been killed after its step-2 checkpoint
    run_phase(phase, f"--model_tag={tag}", f"--output_tag={stopped}", "--num_iterations=4", "--resume_from_step=2")
    whole, resumed = weights(parents, phase, f"{tag}_{phase}_whole", 4), weights(parents, phase, stopped, 4)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    meta = load_meta(ckpt, 4)
    assert meta["phase"] == phase and meta["step"] == 4
    assert DirectionSpec.from_meta(meta).direction == {"fwd": "forward", "bwd": "backward", "bidi": "bidirectional"}[tag]
    assert meta["parent"]["model_tag"] == tag and meta["parent"]["step"] == 3
    if phase == "rl":  # the evaluation before RL is the one recorded before the stop
        assert meta["rewards"]["before"] == load_meta(ckpt, 2)["rewards"]["before"]


def test_resume_refuses_what_would_change_the_run(parents, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", parents)
    run_phase("sft", "--model_tag=bwd", "--output_tag=bwd_guard", "--num_iterations=2", "--save_every=1",
              "--seed=5")
    ckpt = os.path.join(parents, "chatsft_checkpoints", "bwd_guard")
    before = {n: os.stat(os.path.join(ckpt, n)).st_mtime_ns for n in os.listdir(ckpt)}
    cases = [
        (["--resume_from_step=1", "--seed=6"], "--seed=6 (checkpoint: 5)"),  # another data order
        (["--resume_from_step=1", "--train_on=all"], "--train_on=all"),  # other trained tokens
        (["--resume_from_step=1", "--direction=forward"], "contradicts"),
        (["--resume_from_step=3"], "has checkpoints at steps [1, 2]"),
        (["--resume_from_step=1"], "after step 1"),  # step 2 would be overwritten
    ]
    for flags, fragment in cases:
        with pytest.raises(UserError) as e:
            run_phase("sft", "--model_tag=bwd", "--output_tag=bwd_guard", "--num_iterations=2", *flags)
        assert fragment in str(e.value), (flags, str(e.value))
    with pytest.raises(UserError, match="continues .*bwd step 3, not .*fwd"):  # another parent
        run_phase("sft", "--model_tag=fwd", "--output_tag=bwd_guard", "--num_iterations=2", "--resume_from_step=1")
    assert {n: os.stat(os.path.join(ckpt, n)).st_mtime_ns for n in os.listdir(ckpt)} == before
    # Unset flags take the checkpoint's values; --overwrite deletes the later step and continues.
    run_phase("sft", "--model_tag=bwd", "--output_tag=bwd_guard", "--num_iterations=2", "--resume_from_step=1",
              "--overwrite")
    meta = load_meta(ckpt, 2)
    assert meta["user_config"]["seed"] == 5 and meta["user_config"]["resume_from_step"] == 1


# ---- from the safety review (docs/SAFETY.md): a chat phase's output is locked and checked

def test_chat_phase_output_is_locked_checked_and_a_stale_log_moved_aside(base_dir, capsys):
    from nanochat.phase_run import PhaseRun
    from nanochat.research_logger import ResearchLogger
    options = dict(resume_from_step=-1, overwrite=False, research_log=1, wandb_run="dummy", log_flush_every=100)
    run = PhaseRun("mid", "chat_out", 0, "cpu", **options)
    dirs = run.dirs
    with ResearchLogger(dirs["run"], phase="mid_training") as log:  # an attempt killed before saving
        log.log_step(1, {"loss": 1.0})
    open(os.path.join(dirs["checkpoints"], "model_000003.pt.tmp999"), "w").close()
    with run:
        run.prepare()
        run.refuse_overwrite()
        run.clear()
        out = capsys.readouterr().out
        assert "moved it aside" in out and "model_000003.pt.tmp999" in out
        assert sorted(os.listdir(dirs["logs"])) == ["mid_training.attempt1.h5"]
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            PhaseRun("mid", "chat_out", 0, "cpu", **options).__enter__()
    for name in ("meta_000002.json", "model_000002.pt"):
        open(os.path.join(dirs["checkpoints"], name), "w").close()
    with PhaseRun("mid", "chat_out", 0, "cpu", **options) as again:
        again.prepare()
        with pytest.raises(UserError, match="already holds mid checkpoints"):
            again.refuse_overwrite()
