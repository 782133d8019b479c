"""The original plan's own example calls (its evaluation-wrapper, multi-direction evaluation,
experiment-config and analysis tests, and the analysis steps of its end-to-end script), run as the
plan writes them against a tiny CPU experiment, with the numbers checked. Where the project
deliberately differs from the plan, docs/PLAN_DIFFERENCES.md says so.

One module fixture trains a depth-1 forward experiment for 4 steps (research log on), evaluates
its bpb with scripts.base_eval and its tasks in both directions with scripts.direction_eval."""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile

import numpy as np
import pytest

from conftest import run_inprocess
from nanochat.common import UserError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tasks")
EXPERIMENT = "e2e_test_forward"
STEPS = 4
DIRECTIONS = ("forward", "backward")


@pytest.fixture(scope="module")
def trained(corpus_template, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("plan_examples") / "nanochat_base")
    shutil.copytree(corpus_template["dir"], base)
    from nanochat.experiment_config import ExperimentConfig
    # The plan's orchestrator spelling: the experiments folder itself.
    ExperimentConfig(base_dir=os.path.join(base, "experiments")).create_experiment(
        phase="base", direction="forward", depth=1, experiment_id=EXPERIMENT)
    # A 160-token context: the ARC fixture's conversations (106-137 tokens) must fit.
    result = run_inprocess("scripts.base_train", f"--model_tag={EXPERIMENT}", "--direction=forward", "--depth=1",
                           "--max_seq_len=160", "--device_batch_size=2", "--total_batch_size=320",
                           f"--num_iterations={STEPS}", "--eval_every=-1", "--eval_tokens=320", "--research_log=1",
                           "--sample_every=-1", "--device_type=cpu", base_dir=base)
    assert result.returncode == 0, result.stderr
    # The evaluations run in-process (one interpreter start-up less each).
    from scripts import base_eval, direction_eval
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", base)
        base_eval.main([f"--model_tag={EXPERIMENT}", "--eval_tokens=1000", "--device_type=cpu"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            direction_eval.main([f"--model_tag={EXPERIMENT}", "--tasks=arithmetic", "--max_examples=4",
                                 "--max_new_tokens=4", "--device_type=cpu"])
    return {"base_dir": base, "experiment_dir": os.path.join(base, "experiments", EXPERIMENT),
            "direction_eval_stdout": out.getvalue()}


@pytest.fixture
def env(trained, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", trained["base_dir"])
    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", FIXTURES)
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    return trained


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ---- plan Task 14: the evaluation wrapper test -------------------------------------------------
def test_plan_direction_wrapper(env, capsys):
    from tasks.direction_wrapper import DirectionTaskWrapper
    from tasks.arc import ARC
    from nanochat.tokenizer import get_tokenizer

    # Load task and tokenizer
    task = ARC(subset="ARC-Easy", split="test")
    tokenizer = get_tokenizer()
    # Test forward wrapper
    wrapper_fwd = DirectionTaskWrapper(task, direction="forward", tokenizer=tokenizer)
    conv_fwd = wrapper_fwd[0]
    tokens_fwd = wrapper_fwd.render_for_eval(conv_fwd, None, tokenizer)
    # Test backward wrapper
    wrapper_bwd = DirectionTaskWrapper(task, direction="backward", tokenizer=tokenizer)
    conv_bwd = wrapper_bwd[0]
    tokens_bwd = wrapper_bwd.render_for_eval(conv_bwd, None, tokenizer)
    print(f"Forward tokens length: {len(tokens_fwd)}")
    print(f"Backward tokens length: {len(tokens_bwd)}")
    print(f"First token same: {tokens_fwd[0] == tokens_bwd[0]}")  # BOS should match

    assert tokens_fwd[0] == tokens_bwd[0] == tokenizer.get_bos_token_id()
    assert tokens_bwd == tokens_fwd[:1] + tokens_fwd[:0:-1]  # the same conversation, read backward
    assert "First token same: True" in capsys.readouterr().out


# ---- plan Task 15: multi-direction evaluation -----------------------------------------------------
def test_plan_multi_direction_evaluation(env):
    import torch
    from nanochat.checkpoint_manager import load_model
    from nanochat.direction_eval import compute_direction_metrics, evaluate_task_multi_direction
    from nanochat.engine import Engine
    from tasks.arc import ARC

    model, tokenizer, meta = load_model("base", torch.device("cpu"), model_tag=EXPERIMENT)
    task = ARC(subset="ARC-Easy", split="test")
    results = evaluate_task_multi_direction(task, model, tokenizer, directions=["forward", "backward"],
                                            engine=Engine(model, tokenizer, meta), max_examples=3)
    metrics = compute_direction_metrics(results)
    for d in DIRECTIONS:
        r = results[d]
        assert r["total"] == 3 == len(r["per_example"])
        assert r["accuracy"] == sum(r["per_example"]) / 3 == metrics[f"{d}_accuracy"]
        assert r["bpb"] > 0
    assert metrics["direction_gap"] == abs(metrics["forward_accuracy"] - metrics["backward_accuracy"])
    assert metrics["average_accuracy"] == (metrics["forward_accuracy"] + metrics["backward_accuracy"]) / 2
    f, b = results["forward"]["bpb"], results["backward"]["bpb"]
    assert metrics["bpb_gap"] == (b - f) / f
    assert results["forward"]["bpb_bytes"] == results["backward"]["bpb_bytes"]  # the same text both ways


# ---- plan Task 16: the experiment-config test -------------------------------------------------------
def test_plan_experiment_config():
    from nanochat.experiment_config import ExperimentConfig

    tmpdir = tempfile.mkdtemp()
    try:
        config = ExperimentConfig(base_dir=tmpdir)
        # Create base experiment
        base_dir = config.create_experiment(phase="base", direction="forward", depth=20, experiment_id="test_base")
        assert base_dir.exists()
        assert (base_dir / "config.json").exists()
        assert (base_dir / "checkpoints").exists()
        # Create child experiment
        mid_dir = config.create_experiment(phase="mid", direction="forward", depth=20,
                                           parent_experiment="test_base", experiment_id="test_mid")
        assert (mid_dir / "parent_link.json").exists()
        # Load and verify
        loaded_config = config.load_config("test_base")
        assert loaded_config["phase"] == "base"
        parent_link = config.load_parent_link("test_mid")
        assert parent_link["parent_experiment_id"] == "test_base"

        assert parent_link["parent_experiment"] == "test_base" and parent_link["parent_phase"] == "base"
        assert parent_link["parent_checkpoint_path"] == str(base_dir / "checkpoints")
    finally:
        shutil.rmtree(tmpdir)


# ---- plan Task 18: the analysis test ---------------------------------------------------------------
def plan_style_experiment(tmpdir):
    """The plan's mock experiment: a logger writing a decreasing loss every 10 steps."""
    from nanochat.experiment_config import ExperimentConfig
    from nanochat.research_logger import ResearchLogger
    exp_config = ExperimentConfig(base_dir=tmpdir)
    exp_dir = exp_config.create_experiment(phase="base", direction="forward", depth=20, experiment_id="test_exp")
    logger = ResearchLogger(exp_dir, phase="base_training")
    for step in range(0, 100, 10):
        logger.log_step(step, {'loss': 3.0 - step * 0.01})  # Decreasing loss
    logger.close()
    return exp_dir


def test_plan_research_analysis():
    from nanochat.research import (compare_learning_curves, generate_research_report, load_experiment_metadata,
                                   load_training_losses)

    tmpdir = tempfile.mkdtemp()
    try:
        exp_dir = plan_style_experiment(tmpdir)
        # Test learning curve
        compare_learning_curves([exp_dir], os.path.join(tmpdir, "curves.png"))
        assert os.path.exists(os.path.join(tmpdir, "curves.png"))
        # Test report generation
        generate_research_report(exp_dir, os.path.join(tmpdir, "report.md"))
        assert os.path.exists(os.path.join(tmpdir, "report.md"))

        config, parent_link = load_experiment_metadata(exp_dir)
        assert config["experiment_id"] == "test_exp" and config["direction"] == "forward" and parent_link is None
        steps, losses = load_training_losses(exp_dir, "base_training")
        np.testing.assert_array_equal(steps, np.arange(0, 100, 10))
        np.testing.assert_allclose(losses, 3.0 - np.arange(0, 100, 10) * 0.01)
        assert load_training_losses(exp_dir, "midtraining") == (None, None)
        # the plan's output_path names the report's folder: report.md and its PNGs, linked by file name
        with open(os.path.join(tmpdir, "report.md", "report.md"), encoding="utf-8") as f:
            text = f.read()
        assert "final train loss: 2.1000 at step 90" in text
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        assert "learning_curves.png" in links
        for link in links:
            assert "/" not in link and os.path.isfile(os.path.join(tmpdir, "report.md", link))
        with pytest.raises(UserError, match="already exists"):  # never overwritten
            generate_research_report(exp_dir, os.path.join(tmpdir, "report.md"))
    finally:
        shutil.rmtree(tmpdir)


# ---- plan Task 19, steps 5-6, and analyze_direction_transfer on the trained experiment -------------
def test_plan_end_to_end_analysis(env, tmp_path, monkeypatch):
    from nanochat.research import analyze_direction_transfer, compare_learning_curves, generate_research_report
    monkeypatch.chdir(tmp_path)
    exp_dir = env["experiment_dir"]
    compare_learning_curves([exp_dir], "e2e_comparison.png")
    generate_research_report(exp_dir, "e2e_report.md")
    matrix = analyze_direction_transfer(exp_dir, "transfer.md")
    assert os.path.isfile("e2e_comparison.png") and matrix["path"] == str(tmp_path / "transfer.md")

    (bpb_file,) = [n for n in os.listdir(os.path.join(exp_dir, "evaluations")) if n.startswith("bpb_")]
    bpb = read_json(os.path.join(exp_dir, "evaluations", bpb_file))["results"]
    (task_file,) = [n for n in os.listdir(os.path.join(exp_dir, "evaluations")) if n.startswith("direction_")]
    tasks = read_json(os.path.join(exp_dir, "evaluations", task_file))
    forward_acc = tasks["results"]["forward"]["accuracy"]
    assert tasks["results"]["backward"]["accuracy"] is None  # a forward model does not write backward
    for name in ("transfer.md", os.path.join("e2e_report.md", "report.md")):
        with open(name, encoding="utf-8") as f:
            text = f.read()
        assert f"| {bpb['forward']['bpb']:.4f} | {bpb['backward']['bpb']:.4f} |" in text
        assert f"{forward_acc:.4f}" in text and "n/a" in text
    with open(os.path.join("e2e_report.md", "report.md"), encoding="utf-8") as f:
        assert "## Task accuracy in each direction" in f.read()
    assert f"| arithmetic | forward | generation | {forward_acc:.4f} | 4 |" in env["direction_eval_stdout"]
    with pytest.raises(UserError, match="already exists"):
        analyze_direction_transfer(exp_dir, "transfer.md")
    from scripts.direction_eval import main
    with pytest.raises(UserError, match="already exists; pass --overwrite"):  # never replaced silently
        main([f"--model_tag={EXPERIMENT}", "--tasks=arithmetic", "--device_type=cpu"])


# ---- the report's extension point ------------------------------------------------------------------
FAKE_SECTION = '''
import os
SECTION_TITLE = "Fake evaluation"

def markdown_section(run_name, evaluations_dir, plots_dir):
    if not os.path.isfile(os.path.join(evaluations_dir, "fake.json")):
        return None
    with open(os.path.join(plots_dir, f"fake_{run_name}.png"), "wb") as f:
        f.write(b"not really a png")
    return f"fake score of {run_name}: 0.5\\n\\n![fake](fake_{run_name}.png)"
'''


def test_report_sections_extension_point(tmp_path, monkeypatch):
    from nanochat.research import report as research_report
    from nanochat.experiment_config import ExperimentConfig
    (tmp_path / "fake_section_module.py").write_text(FAKE_SECTION)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(research_report.REPORT_SECTIONS, "fake", "fake_section_module")
    monkeypatch.setitem(research_report.REPORT_SECTIONS, "absent", "no_such_package.no_such_module")
    base = str(tmp_path / "base")
    exp_dir = plan_style_experiment(base)
    with_fake = ExperimentConfig(base).evaluations_dir("test_exp")
    with open(os.path.join(with_fake, "fake.json"), "w") as f:
        f.write("{}")

    path = research_report.generate_research_report(exp_dir, str(tmp_path / "out" / "r"))
    assert path == str(tmp_path / "out" / "r" / "report.md")
    text = open(path, encoding="utf-8").read()
    assert "## Fake evaluation\n\n### test_exp\n\nfake score of test_exp: 0.5" in text
    assert "![fake](fake_test_exp.png)" in text
    assert os.path.isfile(tmp_path / "out" / "r" / "fake_test_exp.png")
    assert "absent" not in text  # a module that does not exist is skipped

    os.remove(os.path.join(with_fake, "fake.json"))  # the module now returns None: no section
    text = open(research_report.generate_research_report(exp_dir, output_dir=str(tmp_path / "d")),
                encoding="utf-8").read()
    assert "Fake evaluation" not in text
