"""Write a research report comparing experiments: a folder holding report.md (learning curves, the
cross-direction bpb matrix, per-position loss, lineage, configs and final numbers) and its PNGs.

    python -m scripts.report --experiments=base_fwd,base_bwd,base_bidi
    python -m scripts.report --all --title="Arrow of time, d4" --name=d4_sweep
    python -m scripts.report --experiments=base_fwd --output_dir=/tmp/my_report

The folder is <base_dir>/reports/<--name or a UTC timestamp>/ unless --output_dir is given; it is
never overwritten. Named experiments need a training log (--research_log=1); --all leaves out and
lists those without one. Prints the report's path and the bpb matrix (docs/RESEARCH.md).
"""

import argparse
import sys

from nanochat.common import UserError, add_flag, run_main
from nanochat.experiment_config import ExperimentConfig
from nanochat.research import (BASE_LOG_PHASE, collect_direction_rows, direction_matrix_markdown, experiment_metadata,
                               generate_research_report)
from nanochat.research.arrow_study import load_study, studies_of, study_section


def build_parser():
    p = argparse.ArgumentParser(description="Markdown report comparing experiments (curves, bpb matrix, lineage)")
    add_flag(p, "experiments", default=None, help="comma list of experiment ids (or experiment directories)")
    add_flag(p, "all", action="store_true", help="every experiment with a training log")
    add_flag(p, "study", default=None, help="the experiments of an arrow-of-time study (scripts.arrow_study)")
    add_flag(p, "output_dir", default=None, help="report directory (default <base_dir>/reports/<name or timestamp>)")
    add_flag(p, "name", default=None, help="report directory name under <base_dir>/reports/")
    add_flag(p, "title", default=None, help="report title")
    add_flag(p, "phase", default=BASE_LOG_PHASE, help="research-log phase to plot")
    return p


def select_experiments(args):
    """(ids to report on, [(id, why)] left out). Named ids must exist; --all skips unlogged ones."""
    if sum(map(bool, (args.experiments, args.all, args.study))) != 1:
        raise UserError("pass one of --experiments=a,b,c, --all or --study=<name>")
    experiments = ExperimentConfig()
    if args.study:
        study = load_study(args.study)
        return [e for e in study["experiments"].values() if experiments.exists(e)], []
    if args.experiments:
        ids = [e.strip() for e in args.experiments.split(",") if e.strip()]
        if not ids:
            raise UserError("--experiments is empty: give comma-separated experiment ids")
        return ids, []
    ids, skipped = [], []
    for experiment_id in experiments.list_experiments():
        if args.phase in experiment_metadata(experiment_id)["logs"]:
            ids.append(experiment_id)
        else:
            skipped.append((experiment_id, f"no {args.phase} log"))
    if not ids:
        known = ", ".join(i for i, _ in skipped) or "none"
        raise UserError(f"no experiment under {experiments.root} has a {args.phase} log (experiments: {known}); "
                        "train one with: python -m scripts.base_train --model_tag=<id> --research_log=1")
    return ids, skipped


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.output_dir is not None and args.name is not None:
        raise UserError("pass one of --output_dir or --name")
    ids, skipped = select_experiments(args)
    path = generate_research_report(ids, output_dir=args.output_dir, title=args.title, name=args.name,
                                    phase=args.phase, skipped=skipped)
    print(f"report: {path}")
    for study in studies_of(ids):
        print(study_section(study, ExperimentConfig().evaluations_dir, None)[0])
    rows, missing = collect_direction_rows(ids)
    if rows:
        print(direction_matrix_markdown(rows))
    for experiment_id, why, command in missing:
        print(f"{experiment_id}: {why}; produce it with `{command}`")
    for experiment_id, why in skipped:
        print(f"left out {experiment_id}: {why}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
