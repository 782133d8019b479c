"""Research tools for notebooks and `python -m scripts.report`: the plan's analysis calls in one place.

    from nanochat.research import *
    config, parent_link = load_experiment_metadata("base_d4_forward")
    steps, losses = load_training_losses("base_d4_forward")        # (None, None) without a log
    compare_learning_curves(["fwd", "bwd", "bidi"], "curves.png")
    matrix = analyze_direction_transfer(["fwd", "bwd", "bidi"]); print(matrix["markdown"])
    analyze_direction_transfer("experiments/fwd", "transfer.md")  # the same, written to a file
    generate_research_report(["fwd", "bwd"], "my_report")         # my_report/report.md + its PNGs

analysis.py computes, plots.py draws, report.py writes, arrow_study.py holds the arrow-of-time study;
this façade only composes them. The core library (nanochat/) never imports this package.
More in docs/RESEARCH.md.
"""

import os

from nanochat.research.analysis import (BASE_LOG_PHASE, EVAL_DIRECTIONS, TRAINED_DIRECTIONS, collect_direction_rows,
                                        collect_task_rows, direction_matrix_markdown, direction_transfer,
                                        experiment_id_from_dir, experiment_metadata, load_direction_evaluations,
                                        load_experiment_metadata, load_training_curves, load_training_losses,
                                        per_position_loss, require_evaluated, resolve_experiment,
                                        training_log_phase)
from nanochat.research.plots import (PlotResult, compare_learning_curves, curve_label, plot_direction_matrix,
                                     plot_per_position_loss)
from nanochat.research.report import REPORT_NAME, REPORT_SECTIONS, generate_research_report, write_transfer_analysis


def analyze_direction_transfer(experiment_dirs_or_ids, output_path=None, base_dir=None):
    """The cross-direction bpb matrix of the experiments (analysis.direction_transfer's dict).

    Without `output_path`, an experiment with no bpb evaluation is a UserError naming it and the
    base_eval command. With it (the plan's call), the analysis is also written there as Markdown:
    the matrix, the task table, and what is missing with the command producing it (nothing raises
    for missing data); an existing file is refused and the result also holds "path".
    """
    matrix = direction_transfer(experiment_dirs_or_ids, base_dir)
    if output_path is None:
        return require_evaluated(matrix)
    if isinstance(experiment_dirs_or_ids, (str, os.PathLike)):
        experiment_dirs_or_ids = [experiment_dirs_or_ids]
    configs = [experiments.load_config(experiment_id)
               for experiments, experiment_id in (resolve_experiment(e, base_dir) for e in experiment_dirs_or_ids)]
    matrix["path"] = write_transfer_analysis(output_path, configs, matrix)
    return matrix


__all__ = ["resolve_experiment", "experiment_id_from_dir", "training_log_phase", "load_experiment_metadata",
           "experiment_metadata", "load_training_losses", "load_training_curves", "load_direction_evaluations",
           "collect_task_rows", "collect_direction_rows", "direction_matrix_markdown", "direction_transfer",
           "analyze_direction_transfer", "per_position_loss", "BASE_LOG_PHASE", "EVAL_DIRECTIONS",
           "TRAINED_DIRECTIONS", "PlotResult", "curve_label", "compare_learning_curves", "plot_direction_matrix",
           "plot_per_position_loss", "generate_research_report", "REPORT_NAME", "REPORT_SECTIONS"]
