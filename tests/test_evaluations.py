"""nanochat/evaluations.py: the one home of evaluations/<kind>_step<NNNNNN>.json."""

import json
import os

import pytest

from nanochat.common import UserError
from nanochat.evaluations import (kind_name, latest_of_each, latest_record, list_family, list_records, record_path,
                                  refuse_existing, remove_records, write_record)


def test_names_are_the_ones_every_writer_used(tmp_path):
    d = str(tmp_path)
    assert record_path(d, "bpb", 40) == os.path.join(d, "bpb_step000040.json")
    assert record_path(d, "consistency_pair_bwd", 7) == os.path.join(d, "consistency_pair_bwd_step000007.json")
    assert record_path(d, "core", 1234567) == os.path.join(d, "core_step1234567.json")
    assert kind_name("bpb") == "bpb"
    assert kind_name("chat", "gsm8k") == "chat_gsm8k"
    assert kind_name("direction", "arc easy/x") == "direction_arc_easy_x"  # what chat_eval and direction_eval did


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "a b", "bpb\n", "é", None])
def test_a_kind_must_fully_match_the_name_rule(tmp_path, bad):
    with pytest.raises(UserError, match="cannot be part of a file name"):
        record_path(str(tmp_path), bad, 1)


def test_write_list_and_latest(tmp_path):
    d = str(tmp_path / "evaluations")  # created on first write
    assert list_records(d, "bpb") == [] and latest_record(d, "bpb") is None and latest_of_each(d, "rerank") == {}
    for kind, step in [("bpb", 20), ("bpb", 3), ("bpb_extra", 50), ("core", 9), ("rerank_b", 2), ("rerank_a", 5),
                       ("rerank_a", 1), ("consistency", 4), ("consistency_pair_bwd", 4)]:
        path = write_record(record_path(d, kind, step), {"kind": kind, "step": step})
        with open(path) as f:
            assert json.load(f) == {"kind": kind, "step": step}
    for name in ("notes.json", "bpb_step7.png", "bpb_step000008.json.tmp123", "README"):
        (tmp_path / "evaluations" / name).write_text("{}")  # not records
    assert list_records(d, "bpb") == [(3, record_path(d, "bpb", 3)), (20, record_path(d, "bpb", 20))]
    assert latest_record(d, "bpb") == (20, record_path(d, "bpb", 20))
    assert latest_record(d, "core") == (9, record_path(d, "core", 9))
    assert [(s, k) for s, k, _ in list_family(d, "rerank")] == [(1, "a"), (2, "b"), (5, "a")]
    assert [(s, k) for s, k, _ in list_family(d, "consistency")] == [(4, None), (4, "pair_bwd")]
    assert latest_of_each(d, "rerank") == {"a": (5, record_path(d, "rerank_a", 5)),
                                           "b": (2, record_path(d, "rerank_b", 2))}
    assert list(latest_of_each(d, "rerank")) == ["a", "b"]  # by detail


def test_refuse_existing_names_the_file_unless_overwrite(tmp_path):
    path = write_record(record_path(str(tmp_path), "core", 1), {})
    refuse_existing([record_path(str(tmp_path), "core", 2)], overwrite=False)
    refuse_existing([path], overwrite=True)
    with pytest.raises(UserError, match="core_step000001.json already exists; pass --overwrite"):
        refuse_existing([record_path(str(tmp_path), "core", 2), path], overwrite=False)


def test_cleanup_removes_only_the_given_steps_and_kinds(tmp_path):
    d = str(tmp_path)
    for kind in ("bpb", "core", "chat_gsm8k"):
        for step in (1, 2):
            write_record(record_path(d, kind, step), {})
    (tmp_path / "consistency_step000002.png").write_text("")
    (tmp_path / "notes_step2.txt").write_text("")
    assert remove_records(d, [2], kinds=["bpb", "chat_gsm8k"]) == ["bpb_step000002.json", "chat_gsm8k_step000002.json"]
    assert sorted(os.listdir(d)) == ["bpb_step000001.json", "chat_gsm8k_step000001.json", "consistency_step000002.png",
                                     "core_step000001.json", "core_step000002.json", "notes_step2.txt"]
    assert remove_records(d, [2]) == ["core_step000002.json"]  # every kind, still only that step's records
    assert remove_records(d, [5]) == [] and remove_records(str(tmp_path / "absent"), [1]) == []
    assert sorted(os.listdir(d)) == ["bpb_step000001.json", "chat_gsm8k_step000001.json", "consistency_step000002.png",
                                     "core_step000001.json", "notes_step2.txt"]


def test_a_record_naming_its_section_appears_in_the_report_without_registration(tmp_path, monkeypatch):
    """A new metric is its module (which writes records naming itself) and its base_eval row: the
    report finds the section through the records; a record naming a module outside the project is ignored."""
    import sys
    import types

    from nanochat.evaluations import record_path, report_sections, write_record
    from nanochat.research.report import evaluation_sections

    module = types.ModuleType("nanochat.tiny_metric_for_test")
    module.SECTION_TITLE = "Tiny metric"
    module.markdown_section = lambda run, evaluations_dir, plots_dir: f"{run}: 42 parameters"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    evals = tmp_path / "evaluations"
    write_record(record_path(str(evals), "tiny", 3), {"value": 42}, section=module.__name__)
    write_record(record_path(str(evals), "other", 3), {"value": 1}, section="os.path")  # not ours: ignored
    assert report_sections(str(evals)) == ["nanochat.tiny_metric_for_test"]
    experiments = types.SimpleNamespace(evaluations_dir=lambda experiment_id: str(evals))
    sections = evaluation_sections([(experiments, "exp1")], str(tmp_path / "plots"), sections={})
    assert sections == [("Tiny metric", [("exp1", "exp1: 42 parameters")])]
