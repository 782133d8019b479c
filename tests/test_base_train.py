"""scripts.base_train end to end: the seed commands in every direction, flag aliases, checkpoint
metadata, exact resume, and refusing to overwrite an existing run."""

import ast
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nanochat.direction import DirectionSpec
from conftest import (TRAINED_STEPS, TRAINED_TAGS, assert_one_line_error, copy_base, run_inprocess, run_script,
                      snapshot)
from conftest import ckpt_dir, steps_of, train_tiny
from nanochat.common import UserError

DIRECTIONS = ["forward", "backward", "bidirectional"]
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss ([0-9.]+)", re.M)


def seed_command(direction):
    """The documented smoke-test command, verbatim."""
    return [f"--direction={direction}", "--depth=4", "--max_seq_len=128", "--device_batch_size=2",
            "--total_batch_size=512", "--num_iterations=10", "--core_metric_every=-1", "--eval_every=-1",
            f"--model_tag=test_{direction}"]


def step_losses(stdout):
    """{step: loss} from the 'step NNNNN/N | loss X' progress lines."""
    return {int(s): float(loss) for s, _, loss in STEP_LINE.findall(stdout)}


# ---------------------------------------------------------------------------------------
# Seed commands

@pytest.fixture(scope="module")
def seed_runs(corpus_template, tmp_path_factory):
    """One base dir in which the three seed commands ran (depth 4, 128-token context: ~10 s each)."""
    base = copy_base(corpus_template["dir"], tmp_path_factory, "seed_runs")
    results = [run_inprocess("scripts.base_train", *seed_command(d), "--sample_every=5", base_dir=base)
               for d in DIRECTIONS]
    return base, dict(zip(DIRECTIONS, results))


@pytest.mark.slow  # the documented commands verbatim: three depth-4 runs
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_seed_command_trains_and_records_direction(seed_runs, direction, monkeypatch):
    from nanochat.checkpoint_manager import load_model
    base, results = seed_runs
    result = results[direction]
    assert result.returncode == 0, result.stderr
    losses = step_losses(result.stdout)
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1], "ten steps should lower the training loss"

    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    model, tokenizer, meta = load_model("base", "cpu", phase="eval", model_tag=f"test_{direction}")
    assert meta["direction"] == direction
    assert meta["step"] == 10 and meta["phase"] == "base"
    assert meta["model_config"]["n_layer"] == 4 and meta["model_config"]["sequence_len"] == 128
    assert meta["tokens_per_step"] == 512 and meta["grad_accum_steps"] == 2
    assert meta["user_config"]["direction"] == direction and meta["user_config"]["num_iterations"] == 10
    assert not model.training
    spec = DirectionSpec.from_meta(meta)  # the direction is stored as one thing
    assert spec.direction == direction and spec.bos_id == tokenizer.get_bos_token_id()
    if direction == "bidirectional":
        assert spec.marker_ids == tokenizer.get_marker_ids()
    else:
        assert spec.marker_ids == ()

    # Samples (through the Engine) in each direction the model generates, shown in reading order:
    # a forward one continues a given beginning, a backward one ends with the given ending.
    from scripts.base_train import SAMPLE_BEGINNINGS, SAMPLE_ENDINGS
    samples = re.findall(r"^\[(forward|backward)\] (.*)$", result.stdout, re.M)
    assert {d for d, _ in samples} == ({"forward", "backward"} if direction == "bidirectional" else {direction})
    for d, text in samples:
        text = ast.literal_eval(text)  # printed with repr()
        if d == "forward":
            assert any(text.startswith(b) for b in SAMPLE_BEGINNINGS), text
        else:
            assert any(text.endswith(e) for e in SAMPLE_ENDINGS), text

    # The final evaluation covers each direction the model supports, and only those.
    evaluated = set(re.findall(r"val bpb (\w+):", result.stdout))
    assert evaluated == ({"forward", "backward"} if direction == "bidirectional" else {direction})
    assert {k for k in meta if k.startswith("val_bpb_")} == {f"val_bpb_{d}" for d in evaluated}


@pytest.mark.slow
def test_seed_directions_see_different_data(seed_runs):
    # Same seed, same documents: only the orientation differs, so the first-step losses (at
    # identical initialisation) must not all coincide.
    _, results = seed_runs
    first = {d: step_losses(r.stdout).get(1) for d, r in results.items()}
    assert None not in first.values()
    assert len(set(first.values())) == 3, first


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_trained_checkpoints_record_their_direction(trained, direction, monkeypatch):
    """The session's checkpoints (conftest.TRAINED_RUN, depth 2): the quick set's counterpart of
    the seed commands' checks."""
    from nanochat.checkpoint_manager import load_model
    tag = TRAINED_TAGS[direction]
    result = trained["results"][tag]
    losses = step_losses(result.stdout)
    assert sorted(losses) == list(range(1, TRAINED_STEPS + 1))
    assert losses[TRAINED_STEPS] < losses[1], "training should lower the training loss"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", trained["dir"])
    model, tokenizer, meta = load_model("base", "cpu", phase="eval", model_tag=tag)
    assert meta["direction"] == direction and meta["step"] == TRAINED_STEPS and meta["phase"] == "base"
    assert meta["model_config"]["n_layer"] == 2 and meta["model_config"]["sequence_len"] == 64
    assert not model.training
    spec = DirectionSpec.from_meta(meta)
    assert spec.direction == direction and spec.bos_id == tokenizer.get_bos_token_id()
    assert spec.marker_ids == (tokenizer.get_marker_ids() if direction == "bidirectional" else ())
    evaluated = set(re.findall(r"val bpb (\w+):", result.stdout))
    assert evaluated == ({"forward", "backward"} if direction == "bidirectional" else {direction})
    assert {k for k in meta if k.startswith("val_bpb_")} == {f"val_bpb_{d}" for d in evaluated}


# ---------------------------------------------------------------------------------------
# Flags

def test_every_flag_has_a_kebab_alias_with_the_same_meaning():
    from scripts.base_train import build_parser
    parser = build_parser()
    actions = {s: a for a in parser._actions for s in a.option_strings}
    underscored = [s for s in actions if s.startswith("--") and "_" in s]
    assert "--num_iterations" in underscored and "--total_batch_size" in underscored
    for flag in underscored:
        assert actions.get(flag.replace("_", "-")) is actions[flag], f"{flag} has no kebab-case alias"
    kebab = ["--num-iterations=3", "--max-seq-len=64", "--device-batch-size=4", "--p-backward=0.25",
             "--model-tag=x", "--resume-from-step=2"]
    underscore = ["--num_iterations=3", "--max_seq_len=64", "--device_batch_size=4", "--p_backward=0.25",
                  "--model_tag=x", "--resume_from_step=2"]
    assert vars(parser.parse_args(kebab)) == vars(parser.parse_args(underscore))
    assert vars(parser.parse_args(kebab)) != vars(parser.parse_args([]))


def test_kebab_case_flags_run_end_to_end(base_dir):
    result = run_inprocess("scripts.base_train", "--direction=backward", "--depth=2", "--max-seq-len=64",
                        "--device-batch-size=2", "--total-batch-size=256", "--num-iterations=3",
                        "--eval-every=-1", "--eval-tokens=256", "--model-tag=kebab", base_dir=base_dir)
    assert result.returncode == 0, result.stderr
    from nanochat.checkpoint_manager import load_meta, list_steps
    ckpt = os.path.join(base_dir, "base_checkpoints", "kebab")
    assert list_steps(ckpt) == [3]
    meta = load_meta(ckpt, 3)
    assert meta["direction"] == "backward"
    assert meta["model_config"]["sequence_len"] == 64 and meta["grad_accum_steps"] == 2
    assert meta["user_config"]["eval_tokens"] == 256
    assert sorted(step_losses(result.stdout)) == [1, 2, 3]


# ---------------------------------------------------------------------------------------
# Resume

RESUME_RUN = ["--direction=bidirectional", "--depth=2", "--max_seq_len=64", "--device_batch_size=2",
              "--total_batch_size=256", "--num_iterations=8", "--save_every=4", "--eval_every=-1",
              "--eval_tokens=256", "--device_type=cpu"]


@pytest.fixture(scope="module")
def resume_runs(corpus_template, tmp_path_factory):
    """An uninterrupted 8-step run saving at step 4 ('full'), and a run resumed from that step-4
    checkpoint ('resumed': the files an interrupted run would have left)."""
    from nanochat.checkpoint_manager import meta_path, model_path, optim_path
    base = copy_base(corpus_template["dir"], tmp_path_factory, "resume")
    full = run_inprocess("scripts.base_train", *RESUME_RUN, "--model_tag=full", base_dir=base)
    assert full.returncode == 0, full.stderr
    src = os.path.join(base, "base_checkpoints", "full")
    dst = os.path.join(base, "base_checkpoints", "resumed")
    os.makedirs(dst)
    for path_fn in (model_path, meta_path, lambda d, s: optim_path(d, s, 0)):
        shutil.copy2(path_fn(src, 4), path_fn(dst, 4))
    resumed = run_inprocess("scripts.base_train", *RESUME_RUN, "--model_tag=resumed", "--resume_from_step=4",
                            base_dir=base)
    assert resumed.returncode == 0, resumed.stderr
    return base, full, resumed


def test_save_every_writes_intermediate_and_final_checkpoints(resume_runs):
    from nanochat.checkpoint_manager import list_steps
    base, _, _ = resume_runs
    ckpt = os.path.join(base, "base_checkpoints", "full")
    assert list_steps(ckpt) == [4, 8]
    for step in (4, 8):
        for name in (f"model_{step:06d}.pt", f"optim_{step:06d}_rank0.pt"):
            assert os.path.exists(os.path.join(ckpt, name))
    assert not [f for f in os.listdir(ckpt) if ".tmp" in f], "temporary files left behind"


def test_resume_reproduces_the_uninterrupted_run(resume_runs):
    from nanochat.checkpoint_manager import load_meta, model_path
    base, full, resumed = resume_runs
    assert "resumed from step 4" in resumed.stdout
    full_losses, resumed_losses = step_losses(full.stdout), step_losses(resumed.stdout)
    assert sorted(full_losses) == list(range(1, 9))
    assert sorted(resumed_losses) == [5, 6, 7, 8], "a resumed run must start after the saved step"
    for step in resumed_losses:
        assert resumed_losses[step] == pytest.approx(full_losses[step], abs=1e-5), step

    ckpt = lambda tag: os.path.join(base, "base_checkpoints", tag)  # noqa: E731
    meta_full, meta_resumed = load_meta(ckpt("full"), 8), load_meta(ckpt("resumed"), 8)
    assert meta_resumed["train_loss"] == pytest.approx(meta_full["train_loss"], abs=1e-5)
    for d in ("forward", "backward"):
        assert meta_resumed[f"val_bpb_{d}"] == pytest.approx(meta_full[f"val_bpb_{d}"], abs=1e-5)
    weights_full = torch.load(model_path(ckpt("full"), 8), weights_only=True)
    weights_resumed = torch.load(model_path(ckpt("resumed"), 8), weights_only=True)
    for name, w in weights_full.items():
        torch.testing.assert_close(weights_resumed[name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_existing_checkpoints_are_not_overwritten(resume_runs):
    base, _, _ = resume_runs
    before = snapshot(base)
    result = run_inprocess("scripts.base_train", *RESUME_RUN, "--model_tag=full", base_dir=base)
    assert_one_line_error(result, "already holds base checkpoints", "--resume_from_step=8")
    assert snapshot(base) == before


def test_resume_from_a_step_that_was_not_saved(resume_runs):
    base, _, _ = resume_runs
    before = snapshot(base)
    result = run_inprocess("scripts.base_train", *RESUME_RUN, "--model_tag=full", "--resume_from_step=5",
                           base_dir=base)
    assert_one_line_error(result, "--resume_from_step=5", "[4, 8]")
    assert snapshot(base) == before


def test_resume_with_a_contradicting_direction(resume_runs):
    base, _, _ = resume_runs
    before = snapshot(base)
    args = [a if not a.startswith("--direction") else "--direction=backward" for a in RESUME_RUN]
    result = run_inprocess("scripts.base_train", *args, "--model_tag=full", "--resume_from_step=4", base_dir=base)
    assert_one_line_error(result, "--direction=backward", "bidirectional")
    assert snapshot(base) == before


@pytest.mark.slow  # two processes race for the run lock
def test_two_runs_started_together_on_one_tag_cannot_both_write(base_dir):
    # The "already holds base checkpoints" check alone is racy; the run lock is not: exactly one run
    # trains, the other fails at once naming the process that holds the run.
    args = ["--direction=forward", "--depth=1", "--max_seq_len=32", "--device_batch_size=2", "--total_batch_size=-1",
            "--num_iterations=200", "--eval_every=-1", "--eval_tokens=128", "--sample_every=-1", "--device_type=cpu",
            "--log_every=50", "--model_tag=race"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: run_script("scripts.base_train", *args, base_dir=base_dir), range(2)))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode == 2)
    line = assert_one_line_error(loser)
    # Usually the runs overlap and the lock refuses the second; on a machine slow enough that one
    # finishes before the other starts, the existing-checkpoint check refuses it instead.
    assert "in use by process" in line or "already holds base checkpoints" in line, line
    from nanochat.checkpoint_manager import list_steps
    assert list_steps(os.path.join(base_dir, "base_checkpoints", "race")) == [200]


# ---- from the safety review (docs/SAFETY.md): resume never overwrites a later step, a killed run's leftovers, blow-ups, changed flags, one-line errors

def test_resume_refuses_to_overwrite_a_later_checkpoint_unless_told(base_dir, capsys):
    from nanochat.checkpoint_manager import model_path
    train_tiny("--num_iterations=4", "--save_every=2")
    assert steps_of(base_dir) == [2, 4]
    evaluations = os.path.join(ckpt_dir(base_dir), "evaluations")
    os.makedirs(evaluations)
    for step in (2, 4):
        with open(os.path.join(evaluations, f"bpb_step{step:06d}.json"), "w") as f:
            f.write("{}")
    later = model_path(ckpt_dir(base_dir), 4)
    stamp = os.stat(later).st_mtime_ns
    with pytest.raises(UserError, match=r"after step 2 \(steps \[4\]\).*--overwrite"):
        train_tiny("--num_iterations=6", "--save_every=2", "--resume_from_step=2")
    assert os.stat(later).st_mtime_ns == stamp
    capsys.readouterr()

    train_tiny("--num_iterations=3", "--resume_from_step=2", "--overwrite")
    out = capsys.readouterr().out
    assert "deleted checkpoint steps [4]" in out and "bpb_step000004.json" in out
    assert steps_of(base_dir) == [2, 3]
    assert sorted(os.listdir(evaluations)) == ["bpb_step000002.json"]


def test_rerun_after_a_kill_before_the_first_checkpoint_starts_cleanly(base_dir, capsys):
    from nanochat.research_logger import ResearchLogger, read_scalar
    with ResearchLogger(ckpt_dir(base_dir), phase="base_training") as log:  # the killed attempt's log
        log.log_step(1, {"loss": 9.0})
    train_tiny("--num_iterations=2", "--research_log=1")
    assert "moved it aside" in capsys.readouterr().out
    logs = os.path.join(ckpt_dir(base_dir), "logs")
    assert sorted(os.listdir(logs)) == ["base_training.attempt1.h5", "base_training.h5"]
    assert list(read_scalar(os.path.join(logs, "base_training.h5"), "step")) == [1, 2]
    assert list(read_scalar(os.path.join(logs, "base_training.attempt1.h5"), "step")) == [1]


def test_a_blown_up_run_stops_non_zero_and_every_saved_checkpoint_is_finite(base_dir):
    from nanochat.checkpoint_manager import build_model
    with pytest.raises(UserError, match="(blew up|diverged|not finite).*(last good checkpoint|no checkpoint)"):
        train_tiny("--num_iterations=8", "--save_every=1", "--matrix_lr=1e6", "--embedding_lr=1e6",
              "--unembedding_lr=1e6")
    for step in steps_of(base_dir):
        model, _ = build_model(ckpt_dir(base_dir), step, "cpu")
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_refuses_changed_model_and_data_flags_naming_them(base_dir):
    train_tiny("--num_iterations=2")
    with pytest.raises(UserError, match=r"--depth=2 \(checkpoint: 1\).*--max_seq_len=64 \(checkpoint: 32\)"):
        train_tiny("--num_iterations=3", "--resume_from_step=2", "--depth=2", "--max_seq_len=64")
    with pytest.raises(UserError, match="--seed=7"):
        train_tiny("--num_iterations=3", "--resume_from_step=2", "--seed=7")
    with pytest.raises(UserError, match=r"--total_batch_size=128 \(checkpoint: -1\)"):
        train_tiny("--num_iterations=3", "--resume_from_step=2", "--total_batch_size=128")
    train_tiny("--num_iterations=3", "--resume_from_step=2", "--total_batch_size=64")  # = B*T: the same batch
    assert steps_of(base_dir) == [2, 3]


def test_resume_applies_changed_learning_rates_and_records_them(base_dir):
    from nanochat.checkpoint_manager import load_meta
    train_tiny("--num_iterations=2")
    train_tiny("--num_iterations=3", "--resume_from_step=2", "--matrix_lr=0.05")
    meta = load_meta(ckpt_dir(base_dir), 3)
    assert meta["user_config"]["matrix_lr"] == 0.05
    assert meta["schedule_history"] == [{"from_step": 2, "changed": {"matrix_lr": [0.02, 0.05],
                                                                      "num_iterations": [2, 3]}}]


def test_resume_cross_checks_the_direction_against_the_loader_state(base_dir):
    from nanochat.checkpoint_manager import optim_path
    train_tiny("--num_iterations=2", "--direction=backward")
    path = optim_path(ckpt_dir(base_dir), 2, 0)
    state = torch.load(path, weights_only=True)
    state["dataloader"]["direction"] = "forward"
    torch.save(state, path)
    with pytest.raises(UserError, match="meta says direction backward but its saved dataloader state is forward"):
        train_tiny("--num_iterations=3", "--resume_from_step=2")


@pytest.mark.parametrize("flag, message", [
    ("--log_every=0", "--log_every=0 must be positive"),
    ("--tokenizer_threads=0", "--tokenizer_threads=0 must be positive"),
    ("--matrix_lr=nan", "--matrix_lr=nan: must be a finite number"),
    ("--matrix_lr=-0.1", "--matrix_lr=-0.1 must be >= 0"),
    ("--warmdown_ratio=1.5", "--warmdown_ratio=1.5 must be between 0 and 1"),
    ("--warmup_ratio=0.9", "overlap"),
])
def test_bad_numeric_flags_are_one_clear_error(flag, message, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError) as e:
        train_tiny("--num_iterations=2", flag)
    assert message in str(e.value)
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_an_unwritable_checkpoint_directory_fails_before_training(base_dir, capsys):
    with open(os.path.join(base_dir, "base_checkpoints"), "w") as f:
        f.write("not a directory")
    with pytest.raises(UserError, match="cannot write to the checkpoint directory"):
        train_tiny("--num_iterations=2")
    assert "step 00001" not in capsys.readouterr().out


def test_leftovers_of_a_killed_save_are_removed_on_the_next_run(base_dir, capsys):
    train_tiny("--num_iterations=2")
    d = ckpt_dir(base_dir)
    leftovers = ["model_000004.pt.tmp12345", "optim_000004_rank0.pt", "model_000004.pt"]
    for name in leftovers:
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"x")
    train_tiny("--num_iterations=3", "--resume_from_step=2")
    out = capsys.readouterr().out
    assert all(name in out for name in leftovers)
    assert not any(os.path.exists(os.path.join(d, name)) for name in leftovers[:2])
    assert steps_of(base_dir) == [2, 3]
