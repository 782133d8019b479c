"""Tests for nanochat.experiment_config: the experiments/ layout, configs, links and lineage."""

import json
import os
import re
from datetime import datetime
from pathlib import Path

import pytest

from nanochat.common import UserError
from nanochat.experiment_config import ExperimentConfig, format_lineage


@pytest.fixture
def ec(tmp_path):
    return ExperimentConfig(base_dir=str(tmp_path))


def make_base(ec, experiment_id="base_fwd", direction="forward", **flags):
    return ec.create_experiment("base", direction, 4, experiment_id=experiment_id, **flags)


def test_default_base_dir_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    assert ExperimentConfig().root == os.path.join(str(tmp_path / "nc"), "experiments")


def test_create_load_round_trip_has_all_fields(ec, tmp_path):
    flags = {"seed": 7, "num_iterations": 10, "device_batch_size": 2, "run": "dummy"}
    created = make_base(ec, **flags)
    assert isinstance(created, Path) and created == Path(tmp_path, "experiments", "base_fwd")
    loaded = ec.load_config("base_fwd")
    assert ec.load_config(created) == loaded  # the returned Path reads the config back too
    assert loaded["experiment_id"] == "base_fwd"
    assert loaded["phase"] == "base"
    assert loaded["direction"] == "forward"
    assert loaded["depth"] == 4
    assert loaded["flags"] == flags
    assert loaded["seed"] == 7
    assert loaded["parent_experiment"] is None
    assert "code_version" in loaded
    cv = loaded["code_version"]
    assert cv is None or (isinstance(cv["commit"], str) and isinstance(cv["dirty"], bool))
    assert datetime.fromisoformat(loaded["created_at"]).tzinfo is not None
    assert loaded["updated_at"] == loaded["created_at"]
    assert loaded["status"] == "created"
    assert ec.children("base_fwd") == [] and "children" not in loaded  # the link lives in the child only
    # The layout: everything under <base>/experiments/<id>/.
    exp = os.path.join(str(tmp_path), "experiments", "base_fwd")
    assert ec.experiment_dir("base_fwd") == exp
    assert ec.config_path("base_fwd") == os.path.join(exp, "config.json")
    assert ec.checkpoint_dir("base_fwd") == os.path.join(exp, "checkpoints")
    assert ec.logs_dir("base_fwd") == os.path.join(exp, "logs")
    assert ec.evaluations_dir("base_fwd") == os.path.join(exp, "evaluations")
    for d in (ec.checkpoint_dir("base_fwd"), ec.logs_dir("base_fwd"), ec.evaluations_dir("base_fwd")):
        assert os.path.isdir(d)
    with open(ec.config_path("base_fwd")) as f:
        assert json.load(f) == loaded
    assert ec.exists("base_fwd") and not ec.exists("nope")
    assert ec.list_experiments() == ["base_fwd"]
    assert ec.load_parent_link("base_fwd") is None


def test_default_id_is_descriptive_and_unique(ec):
    a = ec.create_experiment("base", "backward", 6).name
    b = ec.create_experiment("base", "backward", 6).name
    assert re.fullmatch(r"base_d6_backward_\d{8}_\d{6}(_\d+)?", a)
    assert a != b
    assert ec.list_experiments() == sorted([a, b])


def test_duplicate_id_refused(ec):
    make_base(ec)
    with pytest.raises(UserError, match="already exists"):
        make_base(ec)


def test_an_id_that_is_the_tag_of_a_plain_run_is_refused(ec, tmp_path):
    plain = tmp_path / "chatsft_checkpoints" / "taken"
    plain.mkdir(parents=True)
    make_base(ec, experiment_id="taken")  # an empty folder is no run: nothing is shadowed
    (tmp_path / "base_checkpoints" / "other").mkdir(parents=True)
    (tmp_path / "base_checkpoints" / "other" / "meta_000005.json").write_text("{}")
    with pytest.raises(UserError, match="'other' is also the tag of the base run"):
        make_base(ec, experiment_id="other")
    assert not ec.exists("other")


def test_resume_returns_existing(ec):
    first = ec.load_config(make_base(ec, seed=1))
    ec.update_config("base_fwd", status="running")
    again = ec.load_config(ec.create_experiment("base", "forward", 4, experiment_id="base_fwd", resume=True,
                                                seed=99))
    assert again["created_at"] == first["created_at"]
    assert again["seed"] == 1 and again["status"] == "running"
    with pytest.raises(UserError, match="direction"):
        ec.create_experiment("base", "backward", 4, experiment_id="base_fwd", resume=True)
    make_base(ec, experiment_id="base_other")
    with pytest.raises(UserError, match="phase"):
        ec.create_experiment("mid", "forward", 4, parent_experiment="base_other", experiment_id="base_fwd",
                             resume=True)
    assert ec.children("base_other") == []  # a refused resume links nothing


def test_resume_of_missing_id_creates_it(ec):
    path = ec.create_experiment("base", "forward", 4, experiment_id="fresh", resume=True)
    assert ec.load_config(path)["status"] == "created" and ec.exists("fresh")


def test_non_base_without_parent_refused(ec):
    for phase in ("mid", "sft", "rl"):
        with pytest.raises(UserError, match="parent"):
            ec.create_experiment(phase, "forward", 4, experiment_id=f"{phase}_x")
    assert ec.list_experiments() == []


def test_missing_parent_refused(ec):
    make_base(ec)
    with pytest.raises(UserError, match="does not exist.*base_fwd"):
        ec.create_experiment("mid", "forward", 4, parent_experiment="ghost", experiment_id="mid_a")
    assert not ec.exists("mid_a")


def test_invalid_phase_refused(ec):
    with pytest.raises(UserError, match="base, mid, sft, rl"):
        ec.create_experiment("pretrain", "forward", 4, experiment_id="x")


def test_invalid_direction_and_depth_refused(ec):
    with pytest.raises(UserError, match="forward"):
        ec.create_experiment("base", "sideways", 4, experiment_id="x")
    with pytest.raises(UserError, match="depth"):
        ec.create_experiment("base", "forward", 0, experiment_id="x")
    assert ec.list_experiments() == []


@pytest.mark.parametrize("bad", ["", ".hidden", "..", "a/b", "../escape", "sp ace", "semi;colon", "ü"])
def test_invalid_id_chars_refused(ec, bad):
    # nanochat/paths.py validate_name: "invalid experiment id ..." or "experiment id must be a non-empty name"
    with pytest.raises(UserError, match="experiment id"):
        ec.create_experiment("base", "forward", 4, experiment_id=bad)
    with pytest.raises(UserError, match="experiment id"):
        ec.experiment_dir(bad)
    assert not ec.exists(bad)


def test_valid_id_chars_accepted(ec):
    make_base(ec, experiment_id="Run-1.v2_x")
    assert ec.exists("Run-1.v2_x")


def test_load_missing_lists_known_ids(ec):
    make_base(ec)
    with pytest.raises(UserError, match="no experiment 'nope'.*base_fwd"):
        ec.load_config("nope")


def test_branching_two_children_of_one_parent(ec):
    make_base(ec, seed=0)
    ec.update_config("base_fwd", status="completed")
    ec.create_experiment("mid", None, None, parent_experiment="base_fwd", experiment_id="mid_a")
    ec.create_experiment("mid", "forward", 4, parent_experiment="base_fwd", experiment_id="mid_b")
    ec.create_experiment("sft", None, None, parent_experiment="mid_a", experiment_id="sft_a")
    make_base(ec, experiment_id="base_bwd", direction="backward")

    assert ec.load_parent_link("mid_a")["parent_experiment"] == "base_fwd"
    assert ec.load_parent_link("mid_b")["parent_experiment"] == "base_fwd"
    link = ec.load_parent_link("sft_a")
    assert link == {"parent_experiment": "mid_a", "parent_experiment_id": "mid_a", "parent_phase": "mid",
                    "parent_checkpoint_path": ec.checkpoint_dir("mid_a")}
    with open(os.path.join(ec.experiment_dir("sft_a"), "parent_link.json")) as f:
        assert json.load(f) == link  # written beside config.json
    parent = ec.load_config("base_fwd")
    assert ec.children("base_fwd") == ["mid_a", "mid_b"]
    assert parent["status"] == "completed"  # creating a child leaves the parent's config as it was
    assert ec.children("mid_a") == ["sft_a"]

    forest = ec.lineage()
    assert sorted(r["id"] for r in forest) == ["base_bwd", "base_fwd"]
    fwd = next(r for r in forest if r["id"] == "base_fwd")
    assert fwd["phase"] == "base" and fwd["direction"] == "forward" and fwd["status"] == "completed"
    assert sorted(c["id"] for c in fwd["children"]) == ["mid_a", "mid_b"]
    mid_a = next(c for c in fwd["children"] if c["id"] == "mid_a")
    assert [c["id"] for c in mid_a["children"]] == ["sft_a"]

    # With an id, the tree rooted at its root ancestor (and nothing else).
    tree = ec.lineage("sft_a")
    assert len(tree) == 1 and tree[0]["id"] == "base_fwd"
    assert sorted(c["id"] for c in tree[0]["children"]) == ["mid_a", "mid_b"]

    text = format_lineage(tree)
    for i in ("base_fwd", "mid_a", "mid_b", "sft_a"):
        assert i in text
    assert "base_bwd" not in text
    lines = text.splitlines()
    assert lines[0] == "base_fwd (base, forward, completed)"
    assert all(line.startswith("  ") for line in lines[1:])  # children are indented
    assert "├─" in text and "└─" in text
    assert "base_bwd (base, backward, created)" in format_lineage(forest)


def test_status_transitions_and_invalid_status(ec):
    make_base(ec)
    assert ec.load_config("base_fwd")["status"] == "created"
    for status in ("running", "failed", "running", "completed"):
        ec.update_config("base_fwd", status=status)
        assert ec.load_config("base_fwd")["status"] == status
    with pytest.raises(UserError, match="created, running, completed, failed"):
        ec.update_config("base_fwd", status="done")
    with pytest.raises(UserError, match="status"):
        ec.update_config("base_fwd", status="bogus")
    assert ec.load_config("base_fwd")["status"] == "completed"


def test_update_config_merges_and_protects_identity(ec):
    make_base(ec, seed=3)
    cfg = ec.update_config("base_fwd", final_val_bpb=0.91, step=100)
    assert cfg["final_val_bpb"] == 0.91 and cfg["step"] == 100 and cfg["seed"] == 3
    assert ec.load_config("base_fwd") == cfg
    with pytest.raises(UserError, match="direction"):
        ec.update_config("base_fwd", direction="backward")
    with pytest.raises(UserError, match="no experiment"):
        ec.update_config("ghost", step=1)


def test_direction_inherited_and_contradiction_refused(ec):
    make_base(ec, experiment_id="base_bwd", direction="backward")
    child = ec.load_config(ec.create_experiment("mid", None, None, parent_experiment="base_bwd",
                                                experiment_id="mid_bwd"))
    assert child["direction"] == "backward" and child["depth"] == 4
    with pytest.raises(UserError, match="contradicts"):
        ec.create_experiment("sft", "forward", 4, parent_experiment="mid_bwd", experiment_id="sft_fwd")
    with pytest.raises(UserError, match="depth"):
        ec.create_experiment("sft", None, 8, parent_experiment="mid_bwd", experiment_id="sft_d8")
    assert not ec.exists("sft_fwd") and not ec.exists("sft_d8")
    assert ec.children("mid_bwd") == []


def test_atomic_write_leaves_no_temp_files(ec):
    make_base(ec)
    ec.create_experiment("mid", None, None, parent_experiment="base_fwd", experiment_id="mid_a")
    ec.update_config("mid_a", status="running")
    ec.update_config("base_fwd", note="x")
    for dirpath, _, files in os.walk(ec.root):
        for name in files:
            assert name in ("config.json", "parent_link.json"), os.path.join(dirpath, name)


def test_failed_write_keeps_old_config_and_no_temp(ec, monkeypatch):
    make_base(ec)
    before = ec.load_config("base_fwd")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(UserError, match="cannot write .*config.json"):  # one clear line, not a traceback
        ec.update_config("base_fwd", note="x")
    monkeypatch.undo()
    assert ec.load_config("base_fwd") == before
    assert [n for n in os.listdir(ec.experiment_dir("base_fwd")) if ".tmp" in n] == []


def test_exists_is_a_query_that_never_raises(ec):
    make_base(ec)
    assert ec.exists("base_fwd")
    assert not ec.exists("d12") and not ec.exists("") and not ec.exists("../x")


def test_experiments_folder_as_base_dir_is_not_nested(tmp_path):
    """The plan passes the experiments folder itself: ExperimentConfig(base / "experiments")."""
    by_folder = ExperimentConfig(base_dir=os.path.join(str(tmp_path), "experiments"))
    path = by_folder.create_experiment("base", "forward", 2, experiment_id="plan_style")
    assert path == Path(tmp_path, "experiments", "plan_style")
    assert not os.path.exists(os.path.join(str(tmp_path), "experiments", "experiments"))
    by_base = ExperimentConfig(base_dir=Path(tmp_path))
    assert by_base.root == by_folder.root and by_base.base_dir == by_folder.base_dir == str(tmp_path)
    assert by_base.list_experiments() == ["plan_style"]
