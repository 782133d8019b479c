"""The reversal benchmark's table and figure (scripts/reversal_eval.py measures; the questions and
methods: docs/EVALUATION.md). Also the report section of a `reversal` evaluation record.
"""

import hashlib
import itertools
import json
import os

import numpy as np

from nanochat.direction import CONCRETE_DIRECTIONS
from nanochat.evaluations import latest_record
from nanochat.rerank import mean_and_se

SECTION_TITLE = "Reversal curse"
SUBSETS = ("name_first", "description_first")
METHODS = ("generation", "rank_conditional", "rank_whole_text")
QUESTIONS = ("same", "reversed", "held-in")
METHOD_TITLES = {"generation": "generation", "rank_conditional": "rank p(entity | prompt)",
                 "rank_whole_text": "rank whole text"}
SHORT = {"forward": "fwd", "backward": "bwd", "bidirectional": "bidi", "name_first": "name-first",
         "description_first": "desc.-first"}


def build_table(per_model, k):
    """Rows model x query direction x subset x question, each method a mean +- s.e. over facts (a fact's
    templates averaged first) or n/a with the reason."""
    rows = []
    for tag, direction, records in per_model:
        groups = {}
        for *key, fact, value in records:
            groups.setdefault(tuple(key), {}).setdefault(fact, []).append(value)
        for query, subset, question in itertools.product(CONCRETE_DIRECTIONS, SUBSETS, QUESTIONS):
            row = {"model": tag, "model_direction": direction, "query_direction": query, "subset": subset,
                   "question": question, "chance": 1 / k}
            for method in METHODS:
                by_fact = groups.get((query, subset, question, method))
                mean, se = mean_and_se([sum(v) / len(v) for v in by_fact.values()]) if by_fact else (0, 0)
                row[method] = ({"mean": mean, "se": se, "facts": len(by_fact)} if by_fact
                               else {"na": f"trained {direction}: it does not read {query}"})
            rows.append(row)
    return rows


def _cell(c):
    return "n/a" if "na" in c else f"{c['mean']:.3f} ± {c['se']:.3f}"


def markdown_table(rows, k):
    """The table in Markdown; a query direction a model does not read is one n/a line with the reason."""
    titles = " | ".join(METHOD_TITLES[m].replace("|", "\\|") for m in METHODS)  # a bare | would split the cell
    lines = [f"| model | query | subset | question | {titles} |",
             "|---|---|---|---|---|---|---|"]
    said = set()
    for r in rows:
        if "na" in r["generation"]:
            if (r["model"], r["query_direction"]) not in said:
                said.add((r["model"], r["query_direction"]))
                lines.append(f"| {r['model']} | {r['query_direction']} | n/a: {r['generation']['na']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['query_direction']} | {r['subset']} | {r['question']} | "
                     + " | ".join(_cell(r[m]) for m in METHODS) + " |")
    return "\n".join(lines + ["", f"Mean ± standard error over facts. Ranking chance = 1/K = {1 / k:.3f} (K = {k} "
                              "candidates from the same subset); generation: the greedy completion contains the "
                              "entity. Methods: docs/EVALUATION.md."])


def plot_reversal(rows, k, path):
    """The table as a grouped bar chart: one panel per method; a group per (model, query direction,
    subset) the model reads; bars held-in / same / reversed with their standard errors; chance dashed.
    Returns a PlotResult whose series[method][question] holds the drawn bar heights, group order."""
    from matplotlib.figure import Figure
    from nanochat.research.plots import PlotResult, save_png
    readable = [r for r in rows if "na" not in r["generation"]]
    groups = list(dict.fromkeys((r["model"], r["model_direction"], r["query_direction"], r["subset"])
                                for r in readable))
    by_key = {(r["model"], r["model_direction"], r["query_direction"], r["subset"], r["question"]): r for r in readable}
    fig = Figure(figsize=(max(6.0, 1.5 + 0.95 * len(groups)), 8.0), layout="constrained")
    axes = fig.subplots(len(METHODS), 1, sharex=True)
    x, width, drawn = np.arange(len(groups)), 0.27, {}
    for ax, method in zip(axes, METHODS):
        drawn[method] = {}
        for j, (question, color) in enumerate(zip(("held-in", "same", "reversed"), ("C7", "C0", "C3"))):
            cells = [by_key[g + (question,)][method] for g in groups]
            means = np.array([c["mean"] for c in cells])
            ses = np.nan_to_num([c["se"] for c in cells])
            ax.bar(x + (j - 1) * width, means, width, yerr=ses, capsize=2, color=color, label=f"{question} question")
            drawn[method][question] = means
        if method != "generation":
            ax.axhline(1 / k, color="black", linestyle="--", linewidth=0.8, label=f"chance 1/{k}")
        ax.set(title=METHOD_TITLES[method], ylim=(0, 1.05), ylabel="accuracy")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x, [f"{SHORT.get(d, d)} model\nasked {SHORT[q]}\n{SHORT[s]}"
                            for _, d, q, s in groups], fontsize="small")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside upper center", ncols=4, fontsize="small")
    return PlotResult(path=save_png(fig, path), series=drawn)


def markdown_section(run_name, evaluations_dir, plots_dir):
    """The report section of a run's latest `reversal` record. The benchmark writes one record, for every
    model, to each model's evaluations/: its table and figure are shown under the first of them in a
    report, and the others point there."""
    latest = latest_record(evaluations_dir, "reversal")
    if latest is None:
        return None
    with open(latest[1]) as f:
        record = json.load(f)
    digest = hashlib.sha256(json.dumps(record["rows"], sort_keys=True).encode()).hexdigest()[:10]
    name = f"reversal_{digest}.png"
    models = ", ".join(f"`{m}`" for m in record.get("models", {}))
    if plots_dir and os.path.exists(os.path.join(plots_dir, name)):
        return f"The same benchmark run as above (models {models}): its table and figure are there."
    lines = [f"{record['facts']} facts, each stated in one order in pretraining and asked both ways "
             f"(`scripts.reversal_eval`, seed {record.get('seed')}); models {models}.", "",
             markdown_table(record["rows"], record["k"])]
    if plots_dir:
        plot_reversal(record["rows"], record["k"], os.path.join(plots_dir, name))
        lines += ["", f"![reversal curse]({name})"]
    return "\n".join(lines)
