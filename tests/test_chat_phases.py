"""Midtraining and SFT take their direction from the parent checkpoint; the orchestrator chains
base -> mid -> sft -> rl with parent links, for backward and bidirectional models."""

import os

import pytest

from conftest import TRAINED_SFT_STEPS, copy_base, run_inprocess, run_script
from nanochat.experiment_config import ExperimentConfig
from nanochat.common import UserError


def assert_one_error_line(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def seeded(trained, tmp_path_factory):
    """A copy of the session's checkpoints: the seed plan's base checkpoint `test_backward` (and a
    forward one), and the seed plan's SFT of `test_backward` (conftest.TRAINED_SFT)."""
    return copy_base(trained["dir"], tmp_path_factory, "chat_phases")


def test_seed_commands_detect_backward_and_save_checkpoints_that_say_so(seeded, trained, monkeypatch):
    mid = run_inprocess("scripts.mid_train", "--model_tag=test_backward", "--device_batch_size=2",
                        f"--num_iterations={TRAINED_SFT_STEPS}", "--eval_batches=2", base_dir=seeded)
    assert mid.returncode == 0, mid.stderr
    assert "(trained backward)" in mid.stdout
    sft = trained["results"]["sft"]  # the seed plan's chat_sft command, run by the fixture
    assert sft.returncode == 0, sft.stderr
    assert "(trained backward)" in sft.stdout
    monkeypatch.setenv("NANOCHAT_BASE_DIR", seeded)
    from nanochat.checkpoint_manager import load_model
    for source, phase in (("mid", "mid"), ("sft", "sft")):
        _, _, meta = load_model(source, "cpu", model_tag="test_backward")
        assert meta["direction"] == "backward" and meta["phase"] == phase and meta["step"] == 5
        assert meta["parent"]["model_tag"] == "test_backward"
    _, _, sft_meta = load_model("sft", "cpu", model_tag="test_backward")
    assert sft_meta["parent"]["source"] == "base" and sft_meta["train_on"] == "auto"


def test_contradicting_direction_is_refused(seeded):
    before = sorted(os.listdir(seeded))
    result = run_inprocess("scripts.chat_sft", "--source=base", "--model_tag=test_forward", "--direction=backward",
                        "--output_tag=contra", "--num_iterations=1", base_dir=seeded)
    assert_one_error_line(result, "--direction=backward contradicts", "forward")
    assert sorted(os.listdir(seeded)) == before
    assert not os.path.exists(os.path.join(seeded, "chatsft_checkpoints", "contra"))


def test_missing_parent_checkpoint_is_refused(seeded):
    result = run_inprocess("scripts.mid_train", "--model_tag=no_such_model", "--num_iterations=1", base_dir=seeded)
    assert_one_error_line(result, "no_such_model")


def test_existing_output_is_not_overwritten(seeded):
    first = run_inprocess("scripts.chat_sft", "--source=base", "--model_tag=test_forward", "--output_tag=once",
                       "--device_batch_size=2", "--num_iterations=2", "--eval_batches=1", base_dir=seeded)
    assert first.returncode == 0, first.stderr
    target = os.path.join(seeded, "chatsft_checkpoints", "once")
    stamp = {n: os.stat(os.path.join(target, n)).st_mtime_ns for n in os.listdir(target)}
    again = run_inprocess("scripts.chat_sft", "--source=base", "--model_tag=test_forward", "--output_tag=once",
                       "--device_batch_size=2", "--num_iterations=2", base_dir=seeded)
    assert_one_error_line(again, "already holds")
    assert {n: os.stat(os.path.join(target, n)).st_mtime_ns for n in os.listdir(target)} == stamp


@pytest.mark.slow  # the orchestrator starts each phase as a process
@pytest.mark.parametrize("direction", ["backward", "bidirectional"])
def test_orchestrator_runs_the_whole_chain_with_parent_links(base_dir, direction):
    exp_id = f"chain_{direction}"
    result = run_script(
        "scripts.run_backward_experiment", "--phase=base,mid,sft,rl", f"--direction={direction}",
        f"--experiment_id={exp_id}", "--depth=2", "--device_batch_size=2", "--num_iterations=2",
        "--base.max_seq_len=64", "--base.total_batch_size=256", "--eval_tokens=2000",
        "--mid.eval_batches=1", "--sft.eval_batches=1",
        "--rl.examples_per_step=2", "--rl.num_samples=2", "--rl.max_new_tokens=8", "--rl.eval_examples=2",
        "--rl.eval_k=2", base_dir=base_dir, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ec = ExperimentConfig(base_dir)
    ids = [exp_id, f"{exp_id}_mid", f"{exp_id}_sft", f"{exp_id}_rl"]
    parents = [None] + ids[:-1]
    for eid, parent, phase in zip(ids, parents, ["base", "mid", "sft", "rl"]):
        config = ec.load_config(eid)
        assert config["status"] == "completed" and config["phase"] == phase
        assert config["direction"] == direction and (ec.load_parent_link(eid) or {}).get("parent_experiment") == parent
    from nanochat.checkpoint_manager import build_model, find_last_step
    for eid, phase in zip(ids, ["base", "mid", "sft", "rl"]):
        ckpt = ec.checkpoint_dir(eid)
        _, meta = build_model(ckpt, find_last_step(ckpt), "cpu")
        assert meta["direction"] == direction and meta["phase"] == phase
        if direction == "bidirectional":
            from nanochat.direction import DirectionSpec
            assert len(DirectionSpec.from_meta(meta).marker_ids) == 2
    tree = ec.lineage(exp_id)
    node, chain = tree[0], []
    while node:
        chain.append(node["id"])
        node = node["children"][0] if node["children"] else None
    assert chain == ids


# ---- from the safety review (docs/SAFETY.md): flags checked before anything runs

def test_chat_phase_flags_are_checked_before_anything_runs(tmp_path, monkeypatch):
    from scripts.chat_rl import build_parser, check_args
    from scripts.mid_train import main as mid_main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="--num_iterations=0 must be positive"):
        mid_main(["--num_iterations=0"])
    with pytest.raises(UserError, match="--log_every=0"):
        mid_main(["--log_every=0"])
    with pytest.raises(UserError, match="--temperature=nan"):
        check_args(build_parser().parse_args(["--temperature=nan"]))
