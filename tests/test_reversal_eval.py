"""scripts/reversal_eval.py: the questions it asks, its errors, and a tiny end-to-end run on CPU."""

import json
import os
import re

import pytest

from nanochat.common import UserError
from nanochat.research.reversal import METHODS, markdown_section
from scripts import reversal_eval as rv


def _facts_file(tmp_path, facts):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    return str(path)


def test_questions_label_same_and_reversed_and_share_candidates():
    facts = rv.check_facts(rv.generate_facts(6, seed=0))
    qs = rv.questions(facts, k=3, seed=0)
    for q in qs:
        fact = facts[q["fact"]]
        assert q["candidates"][0] == fact[q["slot"][1:-1]] and len(set(q["candidates"])) == 3
        names = {f[q["slot"][1:-1]] for f in facts if f["subset"] == q["subset"]}
        assert set(q["candidates"]) <= names  # candidates come from the fact's own subset
    # a name-first fact ("{name} is {description}."): forward asks the description given the name
    # (same order), backward asks the name given what follows it (the reversed question)
    trained = [q for q in qs if q["fact"] == 0 and q["question"] == "held-in"]
    assert facts[0]["subset"] == "name_first"
    assert {(q["query"], q["slot"]) for q in trained} == {("forward", "{description}"), ("backward", "{name}")}
    kinds = {(q["query"], q["template"]): q["question"] for q in qs if q["fact"] == 0 and q["question"] != "held-in"}
    name_first, description_first = "{name} is {description}.", "{description} is {name}."
    assert kinds == {("forward", name_first): "same", ("backward", name_first): "reversed",
                     ("forward", description_first): "reversed", ("backward", description_first): "same"}
    before, entity, after = rv.split_at("{name} is {description}.", facts[0], "{description}")
    assert (before, entity, after) == (f"{facts[0]['name']} is", " " + facts[0]["description"], ".")


@pytest.mark.parametrize("extra, match", [
    (["--k=1"], "at least 2 candidates"),
    (["--num_facts=6", "--k=4"], "fewer than --k=4"),
    (["--num_facts=20", "--model_tags=nope"], "no base checkpoint with tag 'nope'"),
    (["--models=sideways"], "sideways"),
])
def test_bad_input_is_one_clear_error(tmp_path, extra, match):
    with pytest.raises(UserError, match=match):
        rv.main([f"--out_dir={tmp_path}", *extra])


def test_bad_facts_file(tmp_path):
    bad = {"name": "A B", "description": "the c of d", "subset": "name_first",
           "phrasings": ["{description} is {name}."]}
    with pytest.raises(UserError, match="fact 1: a name_first fact is stated in that order only"):
        rv.main([f"--out_dir={tmp_path}", f"--facts_file={_facts_file(tmp_path, [bad])}"])
    with pytest.raises(UserError, match="subset must be one of"):
        rv.main([f"--out_dir={tmp_path}", f"--facts_file={_facts_file(tmp_path, [dict(bad, subset='x')])}"])


def test_help_documents_the_flags():
    text = rv.build_parser().format_help()
    for flag in ("--facts_file", "--k", "--background_docs", "--models", "--model_tags", "--num_iterations"):
        assert flag in text


@pytest.mark.slow  # trains three models through the orchestrator (subprocesses), then the report
def test_tiny_run_table_shape_and_chance(tmp_path):
    facts = rv.generate_facts(6, seed=3)
    facts[0]["phrasings"] = ["{name} is {description}.", "{name}, known as {description}."]
    out = tmp_path / "bench"
    record = rv.main([f"--out_dir={out}", f"--facts_file={_facts_file(tmp_path, facts)}", "--k=2", "--depth=1",
                      "--max_seq_len=48", "--num_iterations=4", "--vocab_size=300", "--copies=3", "--device_type=cpu"])
    rows = record["rows"]
    assert len(rows) == 3 * 2 * 2 * 3  # model x query direction x subset x question
    assert record["chance"] == 0.5 and all(r["chance"] == 0.5 for r in rows)
    for r in rows:
        readable = r["model_direction"] in (r["query_direction"], "bidirectional")
        for method in METHODS:
            if readable:
                assert 0 <= r[method]["mean"] <= 1 and r[method]["facts"] == 3
            else:
                assert r[method]["na"] == f"trained {r['model_direction']}: it does not read {r['query_direction']}"
    saved = out / "experiments" / "reversal_forward" / "evaluations" / "reversal_step000004.json"
    assert json.loads(saved.read_text())["rows"] == rows
    # the report shows the table once, with its bar chart, under the first model; the others point there
    report = (out / "reports" / "reversal" / "report.md").read_text()
    section = report[report.index("## Reversal curse"):]
    assert section.count("| reversal_forward | backward | n/a: trained forward: it does not read backward |") == 1
    assert section.count("![reversal curse](reversal_") == 1 and section.count("The same benchmark run as above") == 2
    figure = next((out / "reports" / "reversal").glob("reversal_*.png"))
    assert figure.stat().st_size > 1000
    with pytest.raises(UserError, match="already exists"):  # results are never replaced silently
        rv.main([f"--out_dir={out}", f"--facts_file={_facts_file(tmp_path, facts)}", "--k=2", "--device_type=cpu",
                 "--model_tags=reversal_forward"])


def test_table_and_bar_chart_agree_on_synthetic_records(tmp_path):
    """A forward model right on every 'same' question and wrong on every 'reversed' one: the table's cells
    and the chart's bars carry those means, and the backward query is n/a."""
    from nanochat.research.reversal import build_table, plot_reversal
    records = [("forward", subset, question, method, fact, float(question != "reversed"))
               for subset in rv.SUBSETS for question in ("same", "reversed", "held-in") for method in METHODS
               for fact in range(4)]
    rows = build_table([("m", "forward", records)], k=4)
    assert [r["generation"]["mean"] for r in rows if r["query_direction"] == "forward"] == [1, 0, 1, 1, 0, 1]
    figure = plot_reversal(rows, 4, str(tmp_path / "rv.png"))
    assert os.path.getsize(figure.path) > 1000
    for method in METHODS:  # one group per subset, forward query only
        assert list(figure.series[method]["same"]) == [1, 1] and list(figure.series[method]["reversed"]) == [0, 0]
    from nanochat.research.reversal import markdown_table
    table = markdown_table(rows, 4).splitlines()
    cells = [len(re.split(r"(?<!\\)\|", line)) - 2 for line in table[:3]]  # an unescaped | splits a cell
    assert cells == [7, 7, 7]
    text = markdown_section("m", str(tmp_path / "none"), None)
    assert text is None  # no record: no section


def test_an_out_dir_of_the_older_layout_is_refused_before_any_work(tmp_path):
    old_run = tmp_path / "bench" / "base_checkpoints" / "reversal_forward"
    old_run.mkdir(parents=True)
    with pytest.raises(UserError, match="older reversal_eval"):
        rv.main([f"--out_dir={tmp_path / 'bench'}", "--num_facts=20", "--k=2", "--device_type=cpu"])
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == ["base_checkpoints"]
