"""Research tools for notebooks and `python -m scripts.report`: the plan's analysis calls in one place.

    from nanochat.research import *
    matrix = analyze_direction_transfer(["fwd", "bwd", "bidi"]); print(matrix["markdown"])

analysis.py computes, plots.py draws, report.py writes, arrow_study.py holds the arrow-of-time study;
this façade only composes them; the core library never imports it. Examples: docs/RESEARCH.md.
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

    Without `output_path`, an experiment with no bpb evaluation is a UserError naming its command.
    With it, the analysis (missing data included) is also written there and its "path" returned.
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
