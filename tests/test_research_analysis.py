"""Tests for nanochat.research and scripts/report.py on real tiny runs.

One module-scoped fixture trains a depth-2 model in each direction (6 steps, research log on,
val bpb at steps 3 and 6) and evaluates it with scripts.base_eval; every test reads those runs back.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest

from conftest import run_inprocess
from nanochat.common import UserError
from nanochat.experiment_config import ExperimentConfig, format_lineage
from nanochat.research import (
    PlotResult, analyze_direction_transfer, compare_learning_curves, generate_research_report,
    load_experiment_metadata, load_training_curves, load_training_losses, per_position_loss, plot_direction_matrix,
    plot_per_position_loss, resolve_experiment,
)
from nanochat.research.plots import ema
from nanochat.research_logger import log_path, read_scalars, read_snapshot

DIRECTIONS = ("forward", "backward", "bidirectional")
STEPS = 6
TOKENS_PER_STEP = 256
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_LINE = re.compile(r"^step (\d+)/\d+ \| loss ([0-9.]+)", re.M)
VAL_LINE = re.compile(r"^step (\d+) \| (val bpb .*)$", re.M)
NO_LOG_ID = "t_forward_mid"  # a child experiment that was never trained


def train_args(direction):
    return (f"--model_tag=t_{direction}", f"--direction={direction}", "--depth=2", "--max_seq_len=64",
            "--device_batch_size=2", f"--total_batch_size={TOKENS_PER_STEP}", f"--num_iterations={STEPS}",
            "--eval_every=3", "--eval_tokens=2000", "--research_log=1",
            "--shuffle=0")  # stored order: the bidirectional model's first batch draws a row each way


@pytest.fixture(scope="module")
def runs(corpus_template, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("research_analysis") / "nanochat_base")
    shutil.copytree(corpus_template["dir"], base)
    experiments = ExperimentConfig(base)
    for d in DIRECTIONS:
        experiments.create_experiment("base", d, 2, experiment_id=f"t_{d}")
    experiments.create_experiment("mid", None, None, parent_experiment="t_forward", experiment_id=NO_LOG_ID)

    def train(direction):
        result = run_inprocess("scripts.base_train", *train_args(direction), base_dir=base)
        assert result.returncode == 0, f"base_train {direction} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    stdouts = {d: train(d) for d in DIRECTIONS}
    # One base_eval for the three models (a comma list): one document pick.
    ids = ",".join(f"t_{d}" for d in DIRECTIONS)
    evaluation = run_inprocess("scripts.base_eval", f"--model_tag={ids}", "--eval_tokens=2000", base_dir=base)
    assert evaluation.returncode == 0, f"base_eval failed:\n{evaluation.stdout}\n{evaluation.stderr}"
    return {"base_dir": base, "stdout": stdouts, "ids": [f"t_{d}" for d in DIRECTIONS]}


def printed_losses(stdout):
    return {int(s): float(v) for s, v in TRAIN_LINE.findall(stdout)}


def printed_val_bpb(stdout):
    out = {}
    for step, rest in VAL_LINE.findall(stdout):
        for direction, value in re.findall(r"val bpb (\w+): ([0-9.]+)", rest):
            out[(int(step), direction)] = float(value)
    return out


def evaluation_record(base_dir, experiment_id):
    eval_dir = ExperimentConfig(base_dir).evaluations_dir(experiment_id)
    (name,) = os.listdir(eval_dir)
    with open(os.path.join(eval_dir, name)) as f:
        return json.load(f)


def assert_png(path):
    assert os.path.isfile(path) and os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


# ------------------------------------------------------------------------ loading

def test_resolve_by_id_and_by_directory(runs):
    base = runs["base_dir"]
    experiments, experiment_id = resolve_experiment("t_forward", base_dir=base)
    assert experiment_id == "t_forward" and experiments.base_dir == base
    directory = ExperimentConfig(base).experiment_dir("t_backward")
    experiments, experiment_id = resolve_experiment(directory)  # base dir found from the path alone
    assert experiment_id == "t_backward" and os.path.samefile(experiments.base_dir, base)
    with pytest.raises(UserError, match="no experiment 'nope'.*t_forward"):
        resolve_experiment("nope", base_dir=base)
    with pytest.raises(UserError, match="not an experiment directory"):
        resolve_experiment(os.path.join(base, "base_data"))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_training_losses_match_what_training_printed(runs, direction):
    losses = load_training_curves(f"t_{direction}", base_dir=runs["base_dir"])
    assert losses["step"].tolist() == list(range(1, STEPS + 1))
    steps, loss = load_training_losses(f"t_{direction}", base_dir=runs["base_dir"])  # the plan's (steps, losses)
    np.testing.assert_array_equal(steps, losses["step"])
    np.testing.assert_array_equal(loss, losses["loss"])
    printed = printed_losses(runs["stdout"][direction])
    assert sorted(printed) == list(range(1, STEPS + 1))
    assert np.all(np.isfinite(losses["loss"]))
    for step, loss in zip(losses["step"], losses["loss"]):
        assert abs(loss - printed[int(step)]) <= 5.1e-5  # printed with 4 decimals
    assert losses["tokens_per_step"] == TOKENS_PER_STEP  # from the checkpoint's metadata
    np.testing.assert_array_equal(losses["tokens"], np.arange(1, STEPS + 1) * TOKENS_PER_STEP)
    assert np.all(np.isfinite(losses["lr_mult"])) and np.all(np.isfinite(losses["grad_norm"]))
    # Val bpb: the values printed at steps 3 and 6 in the run's own direction(s), NaN elsewhere.
    printed_bpb = printed_val_bpb(runs["stdout"][direction])
    assert {s for s, _ in printed_bpb} == {3, 6}
    for d in ("forward", "backward"):
        column = losses[f"val_bpb_{d}"]
        for i, step in enumerate(losses["step"]):
            if (int(step), d) in printed_bpb:
                assert abs(column[i] - printed_bpb[(int(step), d)]) <= 5.1e-5
            else:
                assert np.isnan(column[i])


def test_metadata_has_config_and_derived_facts(runs):
    base = runs["base_dir"]
    meta, parent_link = load_experiment_metadata("t_bidirectional", base_dir=base)
    assert parent_link is None  # a root experiment
    config = ExperimentConfig(base).load_config("t_bidirectional")
    for key, value in config.items():
        assert meta[key] == value
    assert set(meta["logs"]) == {"base_training"}
    assert meta["last_step"] == STEPS
    losses = load_training_curves("t_bidirectional", base_dir=base)
    assert meta["final_loss"] == losses["loss"][-1]
    assert meta["final_val_bpb"] == {"forward": losses["val_bpb_forward"][-1],
                                     "backward": losses["val_bpb_backward"][-1]}
    assert meta["checkpoint_steps"] == [STEPS] and meta["tokens_per_step"] == TOKENS_PER_STEP
    record = evaluation_record(base, "t_bidirectional")
    assert meta["latest_evaluation"]["results"] == record["results"]
    assert meta["log_metadata"]["max_seq_len"] == 64
    # The same through the directory path.
    by_path, _ = load_experiment_metadata(meta["experiment_dir"])
    assert by_path["final_loss"] == meta["final_loss"]
    # An experiment that never trained: no logs, nothing derived, no error.
    empty, link = load_experiment_metadata(NO_LOG_ID, base_dir=base)
    assert link["parent_experiment"] == "t_forward" and link["parent_phase"] == "base"
    assert link["parent_checkpoint_path"] == ExperimentConfig(base).checkpoint_dir("t_forward")
    assert empty["logs"] == {} and empty["last_step"] is None and empty["final_loss"] is None
    assert empty["latest_evaluation"] is None and empty["parent_experiment"] == "t_forward"


def test_training_losses_without_log_name_the_experiment_and_the_command(runs):
    with pytest.raises(UserError, match=rf"{NO_LOG_ID}.*no base_training log.*scripts.base_train"):
        load_training_curves(NO_LOG_ID, base_dir=runs["base_dir"])
    assert load_training_losses(NO_LOG_ID, base_dir=runs["base_dir"]) == (None, None)  # the plan's contract
    with pytest.raises(UserError, match="no experiment 'nope'"):
        load_training_losses("nope", base_dir=runs["base_dir"])  # a typo is not "no log"


# ------------------------------------------------------------------------ learning curves

def test_learning_curves_png_plots_the_logged_series(runs, tmp_path):
    base = runs["base_dir"]
    out = str(tmp_path / "curves" / "lc.png")
    result = compare_learning_curves(runs["ids"], out, base_dir=base)
    assert isinstance(result, PlotResult) and result.path == out and os.fspath(result) == out
    assert_png(out)
    from matplotlib.image import imread
    assert imread(out).shape[1] > imread(out).shape[0]  # three panels side by side
    assert set(result.series) == set(runs["ids"])
    for d in DIRECTIONS:
        series = result.series[f"t_{d}"]
        assert series["label"] == f"t_{d} ({d}, d2)"
        scalars = read_scalars(log_path(ExperimentConfig(base).experiment_dir(f"t_{d}"), "base_training"))
        x, y = series["loss_vs_step"]
        np.testing.assert_array_equal(x, scalars["step"])
        np.testing.assert_array_equal(y, scalars["loss"])
        x, y = series["loss_vs_step_ema"]
        np.testing.assert_array_equal(x, scalars["step"])
        np.testing.assert_allclose(y, ema(scalars["loss"]))
        x, y = series["loss_vs_tokens"]
        np.testing.assert_array_equal(x, scalars["step"] * TOKENS_PER_STEP)
        np.testing.assert_array_equal(y, scalars["loss"])
        evaluated = {"forward": ("forward",), "backward": ("backward",),
                     "bidirectional": ("forward", "backward")}[d]
        assert {k for k in series if k.startswith("val_bpb_")} == {f"val_bpb_{e}" for e in evaluated}
        for e in evaluated:
            x, y = series[f"val_bpb_{e}"]
            np.testing.assert_array_equal(x, [3, 6])
            np.testing.assert_array_equal(y, scalars[f"val_bpb_{e}"][[2, 5]])
    assert result.notes == []


def test_ema_is_bias_corrected():
    # A constant stays itself from the first step (the zero start divided out); a step from 0 to 1
    # is reached at the rate 1 - 0.9^k, written out by hand.
    np.testing.assert_allclose(ema([3.0] * 5), [3.0] * 5)
    expected = [0.0, 0.1 / 0.19, (0.1 * 0.9 + 0.1) / 0.271]
    np.testing.assert_allclose(ema([0.0, 1.0, 1.0], alpha=0.1), expected)


def test_learning_curves_refuse_an_experiment_without_logs(runs, tmp_path):
    out = str(tmp_path / "lc.png")
    with pytest.raises(UserError, match=NO_LOG_ID):
        compare_learning_curves(["t_forward", NO_LOG_ID], out, base_dir=runs["base_dir"])
    assert not os.path.exists(out)


# ------------------------------------------------------------------------ direction matrix

def test_direction_matrix_equals_the_evaluation_files(runs, tmp_path):
    base = runs["base_dir"]
    # Given out of order: rows come back forward, backward, bidirectional.
    matrix = analyze_direction_transfer(["t_bidirectional", "t_forward", "t_backward"], base_dir=base)
    assert matrix["row_labels"] == runs["ids"]
    assert matrix["columns"] == ("forward", "backward")
    assert matrix["values"].shape == (3, 2)
    for i, d in enumerate(DIRECTIONS):
        record = evaluation_record(base, f"t_{d}")
        row = matrix["rows"][i]
        assert row["trained_direction"] == d == record["trained_direction"]
        assert row["step"] == STEPS
        fwd, bwd = record["results"]["forward"]["bpb"], record["results"]["backward"]["bpb"]
        assert matrix["values"][i].tolist() == [fwd, bwd]
        assert row["bpb"] == {"forward": fwd, "backward": bwd}
        assert matrix["gap"][f"t_{d}"] == pytest.approx((bwd - fwd) / fwd, rel=1e-12)
        assert matrix["gap"][f"t_{d}"] == pytest.approx(record["arrow_of_time_gap"], rel=1e-12)
        line = next(l for l in matrix["markdown"].splitlines() if l.startswith(f"| t_{d} |"))
        assert f"| {fwd:.4f} | {bwd:.4f} | {100 * (bwd - fwd) / fwd:+.2f}% |" in line
    # One-way models are much worse read the other way: the sign of the gap says which way they read.
    assert matrix["gap"]["t_forward"] > 0 > matrix["gap"]["t_backward"]

    figure = plot_direction_matrix(matrix, str(tmp_path / "matrix.png"))
    assert_png(figure.path)
    np.testing.assert_array_equal(figure.series["values"], matrix["values"])
    np.testing.assert_allclose(figure.series["gap"], [matrix["gap"][i] for i in runs["ids"]])


def test_direction_matrix_without_evaluation_says_how_to_produce_it(runs):
    with pytest.raises(UserError, match=rf"{NO_LOG_ID}.*python -m scripts.base_eval --source=mid --model_tag={NO_LOG_ID}"):
        analyze_direction_transfer(["t_forward", NO_LOG_ID], base_dir=runs["base_dir"])


# ------------------------------------------------------------------------ per-position loss

def test_per_position_loss_splits_tokens_by_direction(runs, tmp_path):
    base = runs["base_dir"]
    results = {d: per_position_loss(f"t_{d}", base_dir=base) for d in DIRECTIONS}
    for d, res in results.items():
        assert res["step"] == 1  # snapshot_every=100: only the first step has one
        assert res["position"].tolist() == list(range(64))
    assert results["forward"]["count_backward"].sum() == 0 and results["forward"]["count_forward"].sum() > 0
    assert results["backward"]["count_forward"].sum() == 0 and results["backward"]["count_backward"].sum() > 0
    bidi = results["bidirectional"]
    assert bidi["count_forward"].sum() > 0 and bidi["count_backward"].sum() > 0  # one row drawn each way here
    # The overall means are the means of the snapshot's per-token losses over non-ignored targets.
    snap = read_snapshot(log_path(ExperimentConfig(base).experiment_dir("t_forward"), "base_training"), 1)
    valid = snap["targets"] >= 0
    assert results["forward"]["mean_forward"] == pytest.approx(float(snap["per_token_loss"][valid].astype(np.float64).mean()), rel=1e-9)
    bucketed = per_position_loss("t_forward", base_dir=base, bucket_size=8)
    assert bucketed["position"].tolist() == list(range(0, 64, 8))
    assert bucketed["count_forward"].sum() == results["forward"]["count_forward"].sum()
    figure = plot_per_position_loss(list(results.values()), str(tmp_path / "pos.png"))
    assert_png(figure.path)
    assert set(figure.series["t_bidirectional"]) == {"forward", "backward"}
    assert set(figure.series["t_forward"]) == {"forward"}


# ------------------------------------------------------------------------ report

def test_report_contains_ids_lineage_values_and_linked_pngs(runs, tmp_path):
    base = runs["base_dir"]
    out = str(tmp_path / "report")
    path = generate_research_report(runs["ids"], output_dir=out, base_dir=base, title="Tiny arrow of time")
    assert path == os.path.join(out, "report.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("# Tiny arrow of time\n")
    for experiment_id in runs["ids"]:
        assert f"### {experiment_id}" in text
    # The lineage tree of the reported experiments, with the untrained child under t_forward.
    tree_lines = format_lineage(ExperimentConfig(base).lineage("t_forward")).splitlines()
    assert any(NO_LOG_ID in l for l in tree_lines)
    for line in tree_lines:
        assert line in text
    # each experiment's section names its children (the untrained child of t_forward)
    section = text[text.index("### t_forward"):]
    assert f"children: {NO_LOG_ID}" in section[:section.index("\n### ", 5) if "\n### " in section[5:] else None]
    for d in DIRECTIONS:
        record = evaluation_record(base, f"t_{d}")
        fwd, bwd = record["results"]["forward"]["bpb"], record["results"]["backward"]["bpb"]
        assert f"| t_{d} | {d} | 2 | {STEPS} | {fwd:.4f} | {bwd:.4f} | {100 * record['arrow_of_time_gap']:+.2f}% |" in text
        _, losses = load_training_losses(f"t_{d}", base_dir=base)
        assert f"final train loss: {losses[-1]:.4f} at step {STEPS}" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["direction_matrix.png", "learning_curves.png"]
    for link in links:
        assert_png(os.path.join(out, link))
    # Links to the evaluation JSONs resolve from the report's directory.
    for link in re.findall(r"\]\(([^)]+\.json)\)", text):
        assert os.path.isfile(os.path.normpath(os.path.join(out, link)))
    for forbidden in ("TODO", "coming soon", "placeholder", "TBD"):
        assert forbidden.lower() not in text.lower()
    # Never overwritten: a second report into the same directory is refused, the first intact.
    with pytest.raises(UserError, match="already exists"):
        generate_research_report(runs["ids"], output_dir=out, base_dir=base)
    with open(path, encoding="utf-8") as f:
        assert f.read() == text


def test_report_default_directory_is_under_base_dir_reports(runs):
    base = runs["base_dir"]
    reports = os.path.join(base, "reports")
    by_time = generate_research_report(["t_backward"], base_dir=base)
    assert os.path.dirname(os.path.dirname(by_time)) == reports and os.path.isfile(by_time)
    assert re.fullmatch(r"\d{8}_\d{6}(_\d+)?", os.path.basename(os.path.dirname(by_time)))
    named = generate_research_report(["t_backward"], base_dir=base, name="named")
    assert named == os.path.join(reports, "named", "report.md") and os.path.isfile(named)
    with pytest.raises(UserError, match="already exists"):
        generate_research_report(["t_backward"], base_dir=base, name="named")
    assert not [n for n in os.listdir(reports) if n.startswith(".")]  # no half-built directories left


def test_report_sections_with_missing_evaluations_name_the_command(runs, tmp_path):
    base = runs["base_dir"]
    # A copy of t_backward whose latest evaluation scored only the forward direction.
    experiments = ExperimentConfig(base)
    clone = "t_backward_copy"
    shutil.copytree(experiments.experiment_dir("t_backward"), experiments.experiment_dir(clone))
    config = experiments.load_config(clone)
    config["experiment_id"] = clone
    with open(experiments.config_path(clone), "w") as f:
        json.dump(config, f)
    record = evaluation_record(base, clone)
    record.update(step=7, arrow_of_time_gap=None, results={"forward": record["results"]["forward"]})
    with open(os.path.join(experiments.evaluations_dir(clone), "bpb_step000007.json"), "w") as f:
        json.dump(record, f)
    try:
        matrix = analyze_direction_transfer([clone], base_dir=base)
        assert matrix["rows"][0]["step"] == 7  # the latest evaluation file wins
        assert matrix["values"][0, 0] == record["results"]["forward"]["bpb"] and np.isnan(matrix["values"][0, 1])
        assert matrix["gap"][clone] is None
        assert "| not evaluated | not computable |" in matrix["markdown"]
        assert_png(plot_direction_matrix(matrix, str(tmp_path / "partial.png")).path)
        path = generate_research_report([clone], output_dir=str(tmp_path / "partial"), base_dir=base)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert (f"python -m scripts.base_eval --model_tag={clone} --eval_directions=forward,backward "
                "--overwrite") in text
        assert "has no backward result" in text

        shutil.rmtree(experiments.evaluations_dir(clone))  # now no evaluation at all
        path = generate_research_report([clone], output_dir=str(tmp_path / "none"), base_dir=base)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert "No experiment in this report has a bpb evaluation" in text
        assert f"produce it with `python -m scripts.base_eval --model_tag={clone}`" in text
        assert not os.path.exists(str(tmp_path / "none" / "direction_matrix.png"))
        assert "direction_matrix.png" not in text
    finally:
        shutil.rmtree(experiments.experiment_dir(clone))


# ------------------------------------------------------------------------ CLI

def test_cli_main_in_process(runs, tmp_path, monkeypatch, capsys):
    from scripts.report import main
    base = runs["base_dir"]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    out = str(tmp_path / "cli_report")
    main([f"--experiments={','.join(runs['ids'])}", f"--output-dir={out}", "--title=CLI"])
    printed = capsys.readouterr().out
    assert f"report: {os.path.join(out, 'report.md')}" in printed
    for d in DIRECTIONS:
        record = evaluation_record(base, f"t_{d}")
        assert f"{record['results']['forward']['bpb']:.4f} | {record['results']['backward']['bpb']:.4f}" in printed
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        assert f.readline() == "# CLI\n"
    with pytest.raises(UserError, match="pass one of --experiments=a,b,c, --all or --study"):
        main([])
    # One output mode: a folder holding report.md and its PNGs, linked by their file names.
    main(["--experiments=t_forward", f"--output_dir={tmp_path / 'one'}"])
    assert f"report: {tmp_path / 'one' / 'report.md'}" in capsys.readouterr().out
    text = (tmp_path / "one" / "report.md").read_text(encoding="utf-8")
    assert "![learning curves](learning_curves.png)" in text
    assert_png(str(tmp_path / "one" / "learning_curves.png"))
    with pytest.raises(UserError, match="one of --output_dir or --name"):
        main(["--experiments=t_forward", f"--output_dir={tmp_path / 'two'}", "--name=x"])
    assert not os.path.exists(tmp_path / "two")


def test_cli_all_prints_path_matrix_and_leaves_out_experiments_without_logs(runs):
    base = runs["base_dir"]
    result = run_inprocess("scripts.report", "--all", "--name=everything", base_dir=base)
    assert result.returncode == 0, result.stderr
    path = os.path.join(base, "reports", "everything", "report.md")
    assert f"report: {path}" in result.stdout
    for d in DIRECTIONS:
        record = evaluation_record(base, f"t_{d}")
        assert (f"| t_{d} | {d} | 2 | {STEPS} | {record['results']['forward']['bpb']:.4f} | "
                f"{record['results']['backward']['bpb']:.4f} |") in result.stdout
    assert f"left out {NO_LOG_ID}: no base_training log" in result.stdout
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert f"`{NO_LOG_ID}` (no base_training log)" in text
    for experiment_id in runs["ids"]:
        assert f"### {experiment_id}" in text


def test_cli_bad_input_is_one_error_line(runs):
    cases = [
        ("--experiments=t_forward,nope", r"no experiment 'nope' .*known experiments: .*t_forward"),
        (f"--experiments={NO_LOG_ID}", rf"experiment '{NO_LOG_ID}' has no base_training log.*"
                                       rf"python -m scripts.base_train --model_tag={NO_LOG_ID} --research_log=1"),
    ]
    results = [run_inprocess("scripts.report", case[0], "--name=refused", base_dir=runs["base_dir"]) for case in cases]
    for (_, message), result in zip(cases, results):
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert re.search(message, lines[0]), lines[0]
    assert not os.path.exists(os.path.join(runs["base_dir"], "reports", "refused"))


def test_missing_log_points_to_the_logs_an_experiment_has(tmp_path):
    # An SFT experiment read for its base log: the message names the log it has, not a base_train command.
    ec = ExperimentConfig(str(tmp_path))
    exp_id = ec.create_experiment("base", "forward", 2, experiment_id="chat_only").name
    os.makedirs(ec.logs_dir(exp_id), exist_ok=True)
    open(os.path.join(ec.logs_dir(exp_id), "sft.h5"), "w").close()
    with pytest.raises(UserError, match=r"no base_training log .*its logs: sft\): .*--phase=sft") as err:
        load_training_curves(exp_id, base_dir=str(tmp_path))
    assert "scripts.base_train" not in str(err.value)
    os.remove(os.path.join(ec.logs_dir(exp_id), "sft.h5"))
    with pytest.raises(UserError, match=r"no logs at all.*python -m scripts.base_train --model_tag=chat_only"):
        load_training_curves(exp_id, base_dir=str(tmp_path))
