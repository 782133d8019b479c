"""Tests for the arrow-of-time study: the statistics, the table, and one real tiny study."""

import json
import math
import os

import pytest

from conftest import run_inprocess
from nanochat.research.arrow_study import (cell_key, coarse_buckets, load_study, markdown, mean_interval, plot_gap,
                                           plot_positions, positions_markdown, studies_of, study_results,
                                           study_section)
from nanochat.common import UserError
from nanochat.evaluations import record_path


def test_mean_interval_is_student_t():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(mean_interval([0.5])[1])


def fake_study(tmp_path, bpb):
    """A study record plus evaluation files in base_eval's format: bpb[(depth, seed, direction)] =
    {concrete direction: bpb}."""
    cells, dirs = {}, {}
    for (depth, seed, direction), values in bpb.items():
        exp = f"s_d{depth}_s{seed}_{direction}"
        cells[cell_key(depth, seed, direction)] = exp
        d = tmp_path / exp / "evaluations"
        os.makedirs(d, exist_ok=True)
        with open(record_path(str(d), "bpb", 10), "w") as f:
            json.dump({"eval": "bpb", "results": {k: {"bpb": v} for k, v in values.items()}}, f)
        dirs[exp] = str(d)
    study = {"name": "s", "directions": sorted({k[2] for k in bpb}), "seeds": sorted({k[1] for k in bpb}),
             "depths": sorted({k[0] for k in bpb}), "experiments": cells}
    return study, dirs


def test_gap_is_paired_by_seed_and_labelled(tmp_path):
    bpb = {}
    for seed, (f, b) in enumerate([(2.0, 2.1), (2.2, 2.2), (1.9, 2.09)]):
        bpb[(2, seed, "forward")] = {"forward": f, "backward": 4.0}
        bpb[(2, seed, "backward")] = {"forward": 4.1, "backward": b}
    study, dirs = fake_study(tmp_path, bpb)
    results = study_results(study, dirs.get)
    gaps = [p["gap"] for p in results[2]["pairs"]]
    assert gaps == pytest.approx([0.05, 0.0, 0.10])
    assert results[2]["gap_mean"] == pytest.approx(0.05)
    assert results[2]["backward_harder"] == 2 and results[2]["n"] == 3
    text = markdown(study, results)
    assert "+5.00%" in text and "2 of 3" in text
    assert "bpb(backward model, read backward) / bpb(forward model, read forward)" in text


def test_partial_study_reports_what_it_has_and_plots_two_depths(tmp_path):
    bpb = {(2, 1, "forward"): {"forward": 2.0}, (2, 1, "backward"): {"backward": 2.1},
           (4, 1, "forward"): {"forward": 1.8}, (4, 1, "backward"): {"backward": 1.9},
           (4, 2, "forward"): {"forward": 1.8}}  # seed 2 at depth 4 not finished
    study, dirs = fake_study(tmp_path, bpb)
    results = study_results(study, dirs.get)
    assert results[4]["n"] == 1 and results[2]["n"] == 1
    path = plot_gap(results, str(tmp_path / "gap.png"))
    assert path and os.path.getsize(path) > 1000


def test_one_depth_study_draws_its_gap_and_the_section_links_it(tmp_path):
    bpb = {}
    for seed, (f, b) in enumerate([(2.0, 2.1), (2.2, 2.2), (1.9, 2.09)]):
        bpb[(2, seed, "forward")] = {"forward": f}
        bpb[(2, seed, "backward")] = {"backward": b}
    study, dirs = fake_study(tmp_path, bpb)
    text, results = study_section(study, dirs.get, str(tmp_path / "plots"), base_dir=str(tmp_path))
    png = tmp_path / "plots" / "arrow_of_time_s.png"
    assert png.stat().st_size > 1000 and results[2]["n"] == 3
    assert "(arrow_of_time_s.png)" in text
    assert plot_gap({2: {**results[2], "n": 0}}, str(tmp_path / "none.png")) is None  # no pair: no figure


def fake_positions(seeds_bpb, T=64):
    """positions.json tables at depth 2 with evaluate_bpb_by_position's log-spaced buckets (edges 1, 2, 4, ...
    below T, then [T, end)): seeds_bpb[seed] = (forward bpb, backward bpb) of every bucket."""
    bounds = [0, 1, 2, 4, 8, 16, 32, T]
    tables = {}
    for seed, (f, b) in seeds_bpb.items():
        pair = {}
        for direction, bpb in (("forward", f), ("backward", b)):
            pair[direction] = [{"from": lo, "to": bounds[i + 1] if i + 1 < len(bounds) else None,
                                "bytes": 10 * (i + 1), "nats": bpb * math.log(2) * 10 * (i + 1), "bpb": bpb}
                               for i, lo in enumerate(bounds)]
        tables[f"d2_s{seed}"] = {"depth": 2, "seed": seed, **pair}
    return tables


def test_positions_table_merges_log_buckets_and_the_figure_draws_seed_means(tmp_path):
    tables = fake_positions({1: (2.0, 2.2), 2: (3.0, 3.0)})
    coarse = coarse_buckets(tables["d2_s1"]["forward"])
    assert [(b["from"], b["to"]) for b in coarse] == [(0, 4), (4, 16), (16, 64), (64, None)]
    assert [b["bytes"] for b in coarse] == [10 + 20 + 30, 40 + 50, 60 + 70, 80]  # merged buckets add their bytes
    assert all(b["bpb"] == pytest.approx(2.0) for b in coarse)
    text = positions_markdown(tables, "x/pos.png")
    assert text.count("| 2 |") == 4 and "| 2 | 0–3 | 16.7% | 2.5000 | 2.6000 | +5.00% |" in text
    assert "(pos.png)" in text
    figure = plot_positions(tables, str(tmp_path / "pos.png"))
    assert os.path.getsize(figure.path) > 1000
    drawn = figure.series[2]
    assert drawn["x"][0] == 1 and drawn["x"][-1] == 128  # bucket [0, 1) at position 1; past the context at 2T
    assert list(drawn["x"]) == sorted(drawn["x"])
    assert drawn["forward"] == pytest.approx([2.5] * 8) and drawn["gap"] == pytest.approx([5.0] * 8)


@pytest.mark.slow  # four orchestrator processes, each training and evaluating
def test_study_end_to_end(base_dir):
    """Two seeds x forward/backward through the orchestrator on the tiny corpus: the record, the
    table with a real gap, the report section, and a refused change of flags."""
    flags = ["--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=3",
             "--eval_tokens=2000"]
    r = run_inprocess("scripts.arrow_study", "--name=tiny", "--seeds=1,2", "--depths=1", *flags, base_dir=base_dir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    study = load_study("tiny", base_dir)
    assert set(study["experiments"].values()) == {f"tiny_d1_s{s}_{d}" for s in (1, 2) for d in ("fwd", "bwd")}
    with open(os.path.join(base_dir, "studies", "tiny", "study.md")) as f:
        text = f.read()
    assert "| 1 | 2 |" in text  # depth 1, two seed pairs
    from nanochat.experiment_config import ExperimentConfig
    results = study_results(study, ExperimentConfig(base_dir).evaluations_dir)
    assert results[1]["n"] == 2 and all(p["gap"] == p["gap"] for p in results[1]["pairs"])
    assert [s["name"] for s in studies_of(["tiny_d1_s1_fwd"], base_dir)] == ["tiny"]
    with open(os.path.join(base_dir, "studies", "tiny", "positions.json")) as f:
        positions = json.load(f)
    assert set(positions) == {"d1_s1", "d1_s2"}
    for pair in positions.values():  # the buckets hold all the scored bytes, the same in both readings
        assert sum(b["bytes"] for b in pair["forward"]) == sum(b["bytes"] for b in pair["backward"]) > 0
    assert "Where the gap comes from" in text
    bad = run_inprocess("scripts.arrow_study", "--name=tiny", "--seeds=1", "--depths=1", "--num_iterations=5",
                        base_dir=base_dir)
    assert bad.returncode == 2 and "other flags" in bad.stderr
    # the report on the study's experiments opens with the study, the per-model penalty labelled as such
    r = run_inprocess("scripts.report", "--study=tiny", base_dir=base_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(r.stdout.split("report: ")[1].split()[0]) as f:
        report = f.read()
    assert report.index("Arrow of time: study `tiny`") < report.index("## Summary")
    assert "cross-direction penalty" in report and "Where the gap comes from" in report


def test_bad_study_inputs(base_dir):
    from scripts.arrow_study import main
    with pytest.raises(UserError):
        main(["--name=x", "--directions=forward"])
    with pytest.raises(UserError):
        main(["--name=x", "--seed=3"])
    with pytest.raises(UserError):
        main(["--name=../x"])
    with pytest.raises(UserError):
        main(["--name=x", "--seeds=1,1"])

