"""Tests for scripts/run_backward_experiment.py, the experiment orchestrator.

The orchestrator runs the real scripts in subprocesses on a tiny model (depth 2, 64-token
context, 4 steps) over the generated corpus of conftest.py: base training and evaluation per
direction, failure and resume, SIGKILL and SIGTERM mid-run, a base -> mid chain, branching. Input
errors, which must write nothing, are checked in-process (main() raises UserError) and as the
command line runs main (run_main: one `error:` line, exit status 2). The tests that start the
orchestrator's processes are marked slow.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import scripts.run_backward_experiment as orchestrator
from conftest import REPO, run_inprocess, run_script
from nanochat.checkpoint_manager import list_steps, remove_steps
from nanochat.common import UserError
from nanochat.experiment_config import ExperimentConfig, format_lineage
from nanochat.research_logger import log_path, read_attrs, read_scalars
from conftest import train_tiny

ORCHESTRATOR = "scripts.run_backward_experiment"
TINY = ["--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
        "--num_iterations=4", "--eval_tokens=2000"]
# A run long enough to be killed in the middle (~20 ms a step on a laptop CPU), flushing its log
# every 10 steps.
LONG = ["--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
        "--num_iterations=150", "--eval_tokens=2000", "--log_flush_every=10", "--snapshot_every=-1",
        "--eval_every=-1"]
FLUSH_EVERY = 10


def orchestrate(base_dir, *args):
    return run_script(ORCHESTRATOR, *args, base_dir=base_dir, timeout=300)


def log_file(ec, experiment_id):
    return log_path(ec.experiment_dir(experiment_id), "base_training")


def bpb_evaluations(ec, experiment_id):
    directory = ec.evaluations_dir(experiment_id)
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if re.fullmatch(r"bpb_step\d+\.json", n))


def commands_run(output):
    """The commands the orchestrator launched, from its `$ ...` lines."""
    return [line[2:] for line in output.splitlines() if line.startswith("$ ")]


def tree_state(base_dir):
    """Every directory and file under experiments/ (files with size and mtime): to check that
    nothing was written."""
    root = os.path.join(base_dir, "experiments")
    state = {}
    for dirpath, _, names in os.walk(root):
        state[dirpath] = None
        for n in names:
            path = os.path.join(dirpath, n)
            st = os.stat(path)
            state[path] = (st.st_size, st.st_mtime_ns)
    return state


def assert_contiguous_steps(path, last=None):
    steps = read_scalars(path)["step"]
    assert steps.size > 0
    np.testing.assert_array_equal(steps, np.arange(1, steps.size + 1))
    if last is not None:
        assert steps[-1] == last
    return int(steps[-1])


# ------------------------------------------------------------------------ base, per direction

@pytest.mark.slow  # the orchestrator starts the phases as processes
def test_base_phase_in_each_direction_trains_logs_and_evaluates(base_dir):
    # The three runs are independent experiments: run them side by side to save wall time.
    directions = ("forward", "backward", "bidirectional")
    with ThreadPoolExecutor(len(directions)) as pool:
        results = list(pool.map(lambda d: orchestrate(base_dir, "--phase=base", f"--direction={d}",
                                                      f"--experiment_id=base_{d}", *TINY), directions))
    ec = ExperimentConfig(base_dir)
    for direction, r in zip(directions, results):
        experiment_id = f"base_{direction}"
        assert r.returncode == 0, r.stdout + r.stderr
        config = ec.load_config(experiment_id)
        assert (config["phase"], config["direction"], config["depth"]) == ("base", direction, 2)
        assert config["status"] == "completed"
        assert config["flags"]["max_seq_len"] == 64 and config["flags"]["num_iterations"] == 4
        assert config["seed"] == 42  # base_train's default, recorded from the final checkpoint
        assert list_steps(ec.checkpoint_dir(experiment_id)) == [4]
        assert_contiguous_steps(log_file(ec, experiment_id), last=4)
        (evaluation,) = bpb_evaluations(ec, experiment_id)
        with open(evaluation) as f:
            record = json.load(f)
        assert record["step"] == 4 and record["trained_direction"] == direction
        assert set(record["results"]) == {"forward", "backward"}
        assert set(config["results"]["bpb"]) == {"forward", "backward"}
        assert config["results"]["bpb"]["forward"] == pytest.approx(record["results"]["forward"]["bpb"])
        # the two commands it ran, both recorded with their exit status
        assert [a["returncode"] for a in config["attempts"]] == [0, 0]
        assert "scripts.base_train" in config["attempts"][0]["command"]
        assert "scripts.base_eval" in config["attempts"][1]["command"]


# ------------------------------------------------------------------------ failure and resume

def test_unknown_passthrough_flag_is_refused_before_anything_runs(base_dir):
    result = run_inprocess(ORCHESTRATOR, "--phase=base", "--direction=forward", "--experiment_id=typo", *TINY,
                           "--num_iteration=3", base_dir=base_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --num_iteration is not a flag of the base script(s); see `python -m <script> --help`"]
    assert not ExperimentConfig(base_dir).exists("typo")



@pytest.mark.slow  # the orchestrator starts the phases as processes
def test_failed_phase_is_marked_shown_and_retried_without_redoing_completed_work(base_dir):
    ec = ExperimentConfig(base_dir)
    args = ["--phase=base", "--direction=backward", "--experiment-id=flaky", *TINY]  # kebab alias too

    # A pass-through value base_train refuses (p_backward outside [0, 1]): a real failure.
    failed = orchestrate(base_dir, *args, "--p_backward=7")
    assert failed.returncode == 1
    assert "error: phase base of experiment flaky failed" in failed.stderr
    shown = failed.stderr.split("the command was:\n", 1)[1].splitlines()[0].strip()
    assert "-m scripts.base_train" in shown and "--model_tag=flaky" in shown and "--p_backward=7" in shown
    assert "--p_backward=7.0 is outside [0, 1]" in failed.stderr  # the script's own output streams through
    assert ec.load_config("flaky")["status"] == "failed"
    assert list_steps(ec.checkpoint_dir("flaky")) == []

    retried = orchestrate(base_dir, *args)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "retrying experiment flaky (it was failed)" in retried.stdout
    assert "p_backward" in retried.stdout  # the note on the changed flags
    config = ec.load_config("flaky")
    assert config["status"] == "completed"
    assert "p_backward" not in config["flags"] and config["flags_history"][0]["flags"]["p_backward"] == 7
    assert [a["returncode"] for a in config["attempts"]] == [2, 0, 0]

    outputs = [os.path.join(ec.checkpoint_dir("flaky"), n) for n in os.listdir(ec.checkpoint_dir("flaky"))]
    outputs += [log_file(ec, "flaky")] + bpb_evaluations(ec, "flaky")
    before = {p: os.stat(p).st_mtime_ns for p in outputs}
    again = orchestrate(base_dir, *args)
    assert again.returncode == 0, again.stderr
    assert "experiment flaky is completed; skipping it" in again.stdout
    assert commands_run(again.stdout) == []
    assert {p: os.stat(p).st_mtime_ns for p in outputs} == before


@pytest.mark.slow  # the orchestrator starts the phases as processes
def test_rerun_after_training_finished_only_evaluates(base_dir):
    # The orchestrator died between training and evaluation: the experiment is still "running"
    # (its runner is gone) and its final checkpoint exists.
    ec = ExperimentConfig(base_dir)
    ec.create_experiment("base", "forward", 2, experiment_id="trained")
    ec.update_config("trained", status="running", runner={"pid": 999999999, "host": "elsewhere"})
    trained = run_script("scripts.base_train", "--model_tag=trained", "--direction=forward", "--research_log=1",
                         *TINY, base_dir=base_dir)
    assert trained.returncode == 0, trained.stderr
    checkpoint = os.path.join(ec.checkpoint_dir("trained"), "model_000004.pt")
    mtime = os.stat(checkpoint).st_mtime_ns

    r = orchestrate(base_dir, "--phase=base", "--direction=forward", "--experiment_id=trained", *TINY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "training finished earlier (checkpoint at step 4 of 4); not rerunning it" in r.stdout
    (command,) = commands_run(r.stdout)
    assert "-m scripts.base_eval" in command
    assert os.stat(checkpoint).st_mtime_ns == mtime
    assert ec.load_config("trained")["status"] == "completed"
    assert len(bpb_evaluations(ec, "trained")) == 1


# ------------------------------------------------------------------------ kill -9

def start_orchestrator(base_dir, args, output_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", WANDB_MODE="disabled", NANOCHAT_BASE_DIR=base_dir)
    out = open(output_path, "w")
    # A session of its own: SIGKILL to the group takes the orchestrator and base_train together.
    process = subprocess.Popen([sys.executable, "-m", ORCHESTRATOR, *args], cwd=REPO, env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    return process


def kill_when(process, output_path, done, timeout=120):
    """SIGKILL the process group as soon as done(output) holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(output_path) as f:
            output = f.read()
        if done(output):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return output
        assert process.poll() is None, f"the run ended before it could be killed:\n{output}"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("the run never reached the point to kill it")


def last_step_printed(output):
    steps = re.findall(r"^step (\d+)/", output, flags=re.MULTILINE)
    return int(steps[-1]) if steps else 0


@pytest.mark.slow  # the orchestrator starts the phases as processes
def test_kill_9_then_rerun_resumes_from_the_last_checkpoint(base_dir, tmp_path):
    ec = ExperimentConfig(base_dir)
    args = ["--phase=base", "--direction=backward", "--experiment_id=killed", "--save_every=20",
            "--eval_directions=backward", *LONG]
    process = start_orchestrator(base_dir, args, tmp_path / "out.txt")
    kill_when(process, tmp_path / "out.txt",
              lambda out: last_step_printed(out) >= 35 and list_steps(ec.checkpoint_dir("killed")))

    # The log opens and holds whole flushed blocks: steps 1..N, N a multiple of the block size.
    flushed = assert_contiguous_steps(log_file(ec, "killed"))
    assert flushed >= 30 and flushed % FLUSH_EVERY == 0
    assert ec.load_config("killed")["status"] == "running"
    resume_step = list_steps(ec.checkpoint_dir("killed"))[-1]

    r = orchestrate(base_dir, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "retrying experiment killed (it was running)" in r.stdout
    assert f"resuming base training from its checkpoint at step {resume_step}" in r.stdout
    assert f"--resume_from_step={resume_step}" in commands_run(r.stdout)[0]
    assert_contiguous_steps(log_file(ec, "killed"), last=150)
    assert read_attrs(log_file(ec, "killed"))["resumed"][-1]["from_step"] == resume_step
    assert ec.load_config("killed")["status"] == "completed"
    assert list_steps(ec.checkpoint_dir("killed"))[-1] == 150


@pytest.mark.slow  # the orchestrator starts the phases as processes
def test_kill_9_before_any_checkpoint_moves_the_log_aside(base_dir, tmp_path):
    ec = ExperimentConfig(base_dir)
    args = ["--phase=base", "--direction=forward", "--experiment_id=early", "--eval_directions=none", *LONG]
    process = start_orchestrator(base_dir, args, tmp_path / "out.txt")
    kill_when(process, tmp_path / "out.txt", lambda out: last_step_printed(out) >= 25)

    path = log_file(ec, "early")
    flushed = assert_contiguous_steps(path)
    assert flushed >= 20 and flushed % FLUSH_EVERY == 0
    killed_rows = read_scalars(path)
    assert list_steps(ec.checkpoint_dir("early")) == []
    assert ec.load_config("early")["status"] == "running"

    r = orchestrate(base_dir, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    aside = os.path.join(os.path.dirname(path), "base_training.attempt1.h5")
    assert f"research log {path} without a checkpoint" in r.stdout and f"moved it aside to {aside}" in r.stdout
    kept = read_scalars(aside)  # the killed attempt, intact
    assert set(kept) == set(killed_rows)
    for name in kept:
        np.testing.assert_array_equal(kept[name], killed_rows[name])
    assert_contiguous_steps(path, last=150)
    assert ec.load_config("early")["status"] == "completed"
    assert bpb_evaluations(ec, "early") == []  # --eval_directions=none


@pytest.mark.slow  # the orchestrator starts the phases as processes
def test_sigterm_to_the_orchestrator_stops_the_phase_and_marks_it_failed(base_dir, tmp_path):
    ec = ExperimentConfig(base_dir)
    args = ["--phase=base", "--direction=forward", "--experiment_id=stopped", *LONG]
    out = tmp_path / "out.txt"
    process = start_orchestrator(base_dir, args, out)
    deadline = time.time() + 120
    while last_step_printed(out.read_text()) < 5:
        assert process.poll() is None and time.time() < deadline, out.read_text()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # to the orchestrator only, not its group
    assert process.wait(timeout=60) == 1
    output = out.read_text()
    # The trainer got the signal, finished its step, flushed its log and exited 128 + 15.
    assert "error: phase base of experiment stopped failed (signal 15" in output
    assert "stopped by SIGTERM after step" in output
    assert ec.load_config("stopped")["status"] == "failed"
    steps_then = last_step_printed(output)
    stopped_at = int(re.search(r"stopped by SIGTERM after step (\d+)", output).group(1))
    assert_contiguous_steps(log_file(ec, "stopped"), last=stopped_at)  # no buffered row lost
    time.sleep(0.5)
    assert last_step_printed(out.read_text()) == steps_then  # base_train stopped too
    with pytest.raises(ProcessLookupError):  # no process of the group is left
        os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow  # the orchestrator starts the phases as processes
def test_kill_9_of_the_orchestrator_alone_takes_its_trainer_down_and_a_rerun_is_alone(base_dir, tmp_path):
    # The orchestrator cannot forward anything when SIGKILLed: its trainer must stop by itself
    # (parent-death signal), and while a trainer of the experiment lives nobody else may start one.
    ec = ExperimentConfig(base_dir)
    args = ["--phase=base", "--direction=forward", "--experiment_id=orphan", "--eval_directions=none", *LONG]
    out = tmp_path / "out.txt"
    process = start_orchestrator(base_dir, args, out)
    deadline = time.time() + 120
    while last_step_printed(out.read_text()) < 5:
        assert process.poll() is None and time.time() < deadline, out.read_text()
        time.sleep(0.02)
    process.kill()  # the orchestrator only: its trainer is not signalled by us
    process.wait()
    deadline = time.time() + 60
    while True:  # every process of the session ends (the trainer stops after its current step)
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "the trainer outlived its orchestrator"
        time.sleep(0.1)
    assert "stopped by SIGTERM after step" in out.read_text()
    stopped_at = int(re.search(r"stopped by SIGTERM after step (\d+)", out.read_text()).group(1))
    assert_contiguous_steps(log_file(ec, "orphan"), last=stopped_at)

    r = orchestrate(base_dir, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ec.load_config("orphan")["status"] == "completed"
    assert_contiguous_steps(log_file(ec, "orphan"), last=150)


# ------------------------------------------------------------------------ chains and branching

@pytest.mark.slow  # the orchestrator starts the phases as processes
def test_chain_base_then_mid_links_the_child_to_its_parent(base_dir):
    ec = ExperimentConfig(base_dir)
    args = ["--phase=base,mid", "--direction=backward", "--experiment_id=chain", "--eval_directions=none",
            "--mid.num_iterations=2", "--mid.save_every=1", *TINY]
    r = orchestrate(base_dir, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    train, mid = commands_run(r.stdout)
    assert "-m scripts.base_train" in train and "--model_tag=chain" in train and "--mid." not in train
    assert "-m scripts.mid_train" in mid
    for flag in ("--source=base", "--model_tag=chain", "--output_tag=chain_mid", "--parent_experiment=chain",
                 "--research_log=1", "--max_seq_len=64"):
        assert flag in mid.split(), flag
    assert "--num_iterations=2" in mid.split()[-2:]  # the scoped value comes last, so it wins
    assert "--eval_tokens" not in mid and "--direction" not in mid  # not mid_train flags / inherited

    child = ec.load_config("chain_mid")
    assert (child["phase"], child["direction"], child["depth"], child["parent_experiment"]) == \
        ("mid", "backward", 2, "chain")
    assert child["status"] == "completed"
    assert child["flags"]["num_iterations"] == 2 and "eval_tokens" not in child["flags"]
    assert list_steps(ec.checkpoint_dir("chain_mid")) == [1, 2]
    assert_contiguous_steps(log_path(ec.experiment_dir("chain_mid"), "mid_training"), last=2)
    assert "val_loss" in child["results"]
    assert ec.children("chain") == ["chain_mid"]

    again = orchestrate(base_dir, *args)
    assert again.returncode == 0, again.stderr
    assert commands_run(again.stdout) == []
    assert "experiment chain is completed; skipping it" in again.stdout
    assert "experiment chain_mid is completed; skipping it" in again.stdout

    # A mid run that died after its step-1 checkpoint resumes from it (every phase resumes).
    remove_steps(ec.checkpoint_dir("chain_mid"), [2])
    ec.update_config("chain_mid", status="failed")
    resumed = orchestrate(base_dir, *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "chain_mid: resuming mid training from its checkpoint at step 1" in resumed.stdout
    (command,) = commands_run(resumed.stdout)
    assert "-m scripts.mid_train" in command and command.split()[-1] == "--resume_from_step=1"
    assert list_steps(ec.checkpoint_dir("chain_mid")) == [1, 2]
    assert_contiguous_steps(log_path(ec.experiment_dir("chain_mid"), "mid_training"), last=2)
    assert ec.load_config("chain_mid")["status"] == "completed"


def test_branching_children_appear_in_lineage(tmp_path):
    ec = ExperimentConfig(str(tmp_path))
    ec.create_experiment("base", "backward", 2, experiment_id="root")
    ec.create_experiment("mid", None, None, parent_experiment="root", experiment_id="mid_a")
    ec.create_experiment("mid", None, None, parent_experiment="root", experiment_id="mid_b")
    ec.create_experiment("sft", None, None, parent_experiment="mid_a", experiment_id="sft_a")
    (tree,) = ec.lineage("sft_a")
    assert tree["id"] == "root"
    assert [c["id"] for c in tree["children"]] == ["mid_a", "mid_b"]
    assert [c["id"] for c in tree["children"][0]["children"]] == ["sft_a"]
    assert all(c["direction"] == "backward" for c in tree["children"])
    assert ec.children("root") == ["mid_a", "mid_b"]
    assert "mid_b (mid, backward, created)" in format_lineage([tree])


def test_phase_without_its_script_fails_before_anything_runs(base_dir, monkeypatch):
    # Every phase script exists in this checkout: pretend the mid one does not.
    monkeypatch.setitem(orchestrator.PHASE_TABLE, "mid",
                        orchestrator.PHASE_TABLE["mid"]._replace(script="scripts.no_such_mid_train"))
    ec = ExperimentConfig(base_dir)
    ec.create_experiment("base", "forward", 2, experiment_id="parent")
    ec.update_config("parent", status="completed")
    before = tree_state(base_dir)
    expected = "phase 'mid' is not available yet: scripts/no_such_mid_train.py is not in this checkout"
    for argv in (["--phase=mid", "--parent_experiment=parent"],
                 ["--phase=base,mid", "--direction=forward", "--experiment_id=chain", *TINY]):
        with pytest.raises(UserError) as info:
            orchestrator.main(argv)
        assert str(info.value) == expected
    assert tree_state(base_dir) == before  # in particular, base was not trained first


def test_commands_under_torchrun_and_pass_through_spellings(base_dir):
    # Built in-process (nothing runs): what each script receives for a two-phase chain on 2 GPUs.
    argv = ["--phase=base,mid", "--direction=forward", "--experiment_id=plan", "--nproc-per-node=2",
            "--num_iterations=8", "--warmdown-ratio", "0.1", "--mid.tasks=smoltalk", "--seed=3"]
    args, unknown = orchestrator.build_parser().parse_known_args(argv)
    passthrough = orchestrator.parse_passthrough(unknown)
    ec = ExperimentConfig(base_dir)
    steps, direction, depth = orchestrator.plan_chain(args, passthrough, ec)
    assert [(s.phase, s.experiment_id, s.parent, s.parent_phase) for s in steps] == \
        [("base", "plan", None, None), ("mid", "plan_mid", "plan", "base")]
    assert (direction, depth) == ("forward", orchestrator.DEFAULT_DEPTH)

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    base_flags, base_tokens = orchestrator.phase_flags(args, passthrough, "base")
    assert base_flags == {"num_iterations": 8, "nproc_per_node": 2, "eval_directions": "forward,backward",
                          "warmdown_ratio": 0.1, "seed": 3}
    ec.create_experiment("base", direction, depth, experiment_id="plan", **base_flags)
    assert orchestrator.training_command(args, base_flags, base_tokens, ec, steps[0], direction, depth) == \
        torchrun + ["scripts.base_train", "--model_tag=plan", "--direction=forward", f"--depth={depth}",
                    "--research_log=1", "--num_iterations=8", "--warmdown-ratio", "0.1", "--seed=3"]
    mid_flags, mid_tokens = orchestrator.phase_flags(args, passthrough, "mid")
    assert mid_flags["tasks"] == "smoltalk" and "eval_directions" not in mid_flags
    assert orchestrator.training_command(args, mid_flags, mid_tokens, ec, steps[1], direction, depth) == \
        torchrun + ["scripts.mid_train", "--source=base", "--model_tag=plan", "--output_tag=plan_mid",
                    "--parent_experiment=plan", "--research_log=1", "--num_iterations=8", "--warmdown-ratio", "0.1",
                    "--seed=3", "--tasks=smoltalk"]
    # a lone flag is recorded as True; a value may look like a negative number
    assert [(p.name, p.value) for p in orchestrator.parse_passthrough(["--dry-run", "--lr", "-1", "--tag=a=b"])] == \
        [("dry_run", True), ("lr", -1), ("tag", "a=b")]


# ------------------------------------------------------------------------ bad input

BAD_INPUTS = [
    (["--phase=base,pretrain", "--direction=forward"], "unknown phase 'pretrain'"),
    (["--phase=mid,base", "--parent_experiment=fwd"], "must be distinct and in the order"),
    (["--phase=base"], "--direction is required for a base phase"),
    (["--phase=base", "--direction=sideways"], "sideways"),
    (["--phase=base", "--direction=forward", "--parent_experiment=fwd"], "a base phase trains from scratch"),
    (["--phase=mid"], "pass --parent_experiment=<id>"),
    (["--phase=mid", "--parent_experiment=missing"], "no experiment 'missing'"),
    (["--phase=mid", "--parent_experiment=unfinished"], "is running, not completed"),
    (["--phase=sft", "--parent_experiment=fwd_sft"], "a sft phase continues from one of base, mid"),
    (["--phase=mid", "--parent_experiment=fwd", "--direction=backward"], "contradicts parent experiment 'fwd'"),
    (["--phase=mid", "--parent_experiment=fwd", "--depth=3"], "--depth=3 contradicts parent experiment 'fwd'"),
    (["--phase=base", "--direction=backward", "--experiment_id=fwd"],
     "experiment 'fwd' already exists with a different config: direction 'forward' (not 'backward')"),
    (["--phase=mid", "--parent_experiment=fwd", "--experiment_id=fwd"], "cannot be its own parent"),
    (["--phase=base", "--direction=forward", "--experiment_id=../up"], "invalid experiment id '../up'"),
    (["--phase=base", "--direction=forward", "--model_tag=x"], "--model_tag is set by the orchestrator"),
    (["--phase=base", "--direction=forward", "--mid.num_iterations=3"], "scoped to phase 'mid', which is not in"),
    (["--phase=base", "--direction=forward", "--bse.num_iterations=3"], "'bse' is not a phase"),
    (["--phase=base,mid", "--direction=forward", "--mid.depth=3"], "a setting of the whole chain"),
    (["--phase=base", "--direction=forward", "stray"], "unexpected argument 'stray'"),
    (["--phase=base", "--direction=forward", "--nproc_per_node=0"], "--nproc_per_node must be at least 1"),
    (["--phase=base", "--direction=forward", "--eval_tokens=0"], "--eval_tokens must be positive"),
]


@pytest.fixture
def existing_experiments(base_dir):
    ec = ExperimentConfig(base_dir)
    ec.create_experiment("base", "forward", 2, experiment_id="fwd")
    ec.update_config("fwd", status="completed")
    ec.create_experiment("sft", None, None, parent_experiment="fwd", experiment_id="fwd_sft")
    ec.update_config("fwd_sft", status="completed")
    ec.create_experiment("base", "forward", 2, experiment_id="unfinished")
    ec.update_config("unfinished", status="running")
    return ec


@pytest.mark.parametrize("argv,expected", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_a_clear_error_that_writes_nothing(existing_experiments, argv, expected):
    before = tree_state(existing_experiments.base_dir)
    with pytest.raises(UserError) as info:
        orchestrator.main(argv)
    assert expected in str(info.value)
    assert tree_state(existing_experiments.base_dir) == before


def test_bad_input_from_the_command_line_is_one_error_line(existing_experiments):
    base_dir = existing_experiments.base_dir
    before = tree_state(base_dir)
    r = run_inprocess(ORCHESTRATOR, "--phase=base", "--direction=backward", "--experiment-id=fwd", base_dir=base_dir)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("error: experiment 'fwd' already exists with a different config")
    assert len(r.stderr.strip().splitlines()) == 1
    assert tree_state(base_dir) == before


def test_launcher_multi_node_and_checks(base_dir):
    """--nnodes/--node_rank/--rdzv_endpoint become torchrun's rendezvous flags (speedrun.sh passes them)."""
    cmd = orchestrator.launcher("scripts.base_train", 8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node_rank=1", "--rdzv_endpoint=node0:29500", "--nproc_per_node=8"} <= set(cmd)
    assert "--standalone" not in cmd
    assert "--standalone" in orchestrator.launcher("scripts.base_train", 8)
    with pytest.raises(UserError, match="rdzv_endpoint"):
        orchestrator.main(["--phase=base", "--nnodes=2", "--experiment_id=mn"])
    with pytest.raises(UserError, match="node_rank"):
        orchestrator.main(["--phase=base", "--nnodes=2", "--node_rank=2", "--rdzv_endpoint=a:1", "--experiment_id=mn"])


# ---- from the safety review (docs/SAFETY.md): children inherit the locks and die with the orchestrator; ids that are tags

def test_orchestrator_children_get_its_locks_and_the_death_signal(base_dir, monkeypatch):
    import scripts.run_backward_experiment as orch
    from nanochat.experiment_config import ExperimentConfig
    from nanochat.locking import ENV_HELD
    experiments = ExperimentConfig()
    seen = {}

    class FakePopen:
        def __init__(self, command, env=None, preexec_fn=None):
            seen.update(env=env, preexec_fn=preexec_fn)

        def wait(self):
            return 0
    experiments.create_experiment("base", "forward", 1, experiment_id="e1")
    monkeypatch.setattr(orch.subprocess, "Popen", FakePopen)
    lock = orch.lock_experiment(experiments, "e1")
    try:
        orch.run_command(experiments, "e1", "base", [sys.executable, "-c", "pass"])
    finally:
        lock.release()
        orch.HELD_LOCKS.clear()
    assert lock.path in seen["env"][ENV_HELD].split(os.pathsep)
    assert seen["preexec_fn"] is not None


def test_an_experiment_id_that_is_a_plain_tag_is_refused(base_dir):
    from scripts.run_backward_experiment import main as orch_main
    train_tiny("--num_iterations=1", tag="taken")
    with pytest.raises(UserError, match="'taken' is also the tag of the base run"):
        orch_main(["--phase=base", "--direction=forward", "--depth=1", "--experiment_id=taken"])
    assert not os.path.exists(os.path.join(base_dir, "experiments", "taken"))
