"""Evaluate base checkpoints, the same way in every direction (docs/DESIGN.md §3, §7; docs/EVALUATION.md).

    python -m scripts.base_eval --eval=bpb --model_tag=d4_backward --eval_directions=forward,backward
    python -m scripts.base_eval --model_tag=fwd,bwd,bidi      # prints the cross-direction bpb matrix
    python -m scripts.base_eval --eval=bpb,core,consistency --model_tag=fwd,bwd,bidi --max_per_task=500

--eval is a comma list of bpb (nanochat/loss_eval.py), core (nanochat/core_eval.py) and consistency
(nanochat/consistency.py). Records go to each run's evaluations/ directory; every output path is checked
before any model is evaluated, and none is replaced without --overwrite. EVALUATIONS below is the one
table of what --eval can run: a new metric is its module and a row there.
"""

import argparse
import math
import sys
from datetime import datetime, timezone
from typing import Callable, NamedTuple

from nanochat.checkpoint_manager import artifact_dirs, load_meta, load_model, resolve_checkpoint
from nanochat.common import UserError, add_flag, compute_cleanup, compute_init, print0, run_main
from nanochat.consistency import consistency_record, format_stats, per_document_bpb, write_consistency
from nanochat.core_eval import BUNDLE_URL, CoreBenchmark, format_table
from nanochat.direction import DirectionSpec, is_two_way, parse_directions
from nanochat.evaluations import record_path, refuse_existing, write_record
from nanochat.loss_eval import arrow_of_time_gap, evaluate_bpb, select_documents
from nanochat.tokenizer import get_token_bytes
from nanochat.training import autocast_context


class Evaluation(NamedTuple):
    """One row of EVALUATIONS: the records an evaluation writes and the functions that run it."""
    records: Callable            # records(models) -> {key: path}: every record it will write (a model's tag
                                 # or a (forward tag, backward tag) pair), planned and checked before any work
    run: Callable                # run(job, loaded): evaluate one loaded model, write its records
    prepare: Callable = None     # prepare(args): before any model is loaded (the CORE task bundle)
    finish: Callable = None      # finish(job): after every model (the forward/backward pairs)


class Job:
    """What the evaluations of one call share: flags, devices, planned records, the documents read."""

    def __init__(self, args, directions, models, records, prepared, rank, world_size, device):
        self.args, self.directions, self.models = args, directions, models
        self.records, self.prepared = records, prepared  # {evaluation: {key: path}}, {evaluation: what prepare gave}
        self.rank, self.world_size, self.device = rank, world_size, device
        self.matrix, self.per_doc, self._docs = [], {}, None  # bpb rows; consistency's readings by tag

    def documents(self, tokenizer):
        """(validation documents, token bytes): the same documents for every model and direction."""
        if self._docs is None:
            self._docs = (select_documents(tokenizer, self.args.eval_tokens, "val", self.rank, self.world_size),
                          get_token_bytes(self.device))
        return self._docs

    def write(self, path, record, *extra, writer=write_record, **options):
        """Rank 0 writes the record, as writer(path, record, *extra, **options) (write_record takes the report
        section=), and says so."""
        if self.rank == 0:
            writer(path, record, *extra, **options)
            print0(f"wrote {path}")


class Loaded(NamedTuple):
    """One model, loaded for evaluation."""
    model: object
    tokenizer: object
    meta: dict
    tag: str        # the resolved tag: its records' keys
    seq_len: int
    autocast: object
    common: dict    # the fields every record of this model carries


def one_per_model(kind):
    """The records function of an evaluation that writes one `kind` record per model."""
    return lambda models: {m["tag"]: record_path(m["evaluations"], kind, m["step"]) for m in models}


# ---- bpb ----------------------------------------------------------------------------------------------
def run_bpb(job, m):
    docs, token_bytes = job.documents(m.tokenizer)
    tag, step, trained = m.meta["model_tag"], m.meta["step"], m.meta["direction"]
    results = evaluate_bpb(m.model, m.tokenizer, token_bytes, docs, job.directions, trained, m.seq_len,
                           job.args.device_batch_size, job.device, m.autocast)
    gap = arrow_of_time_gap(results)
    for d, r in results.items():
        print0(f"{tag} (trained {trained}) step {step}: bpb {d} = {r['bpb']:.4f} "
               f"({r['tokens']:,} tokens, {r['bytes']:,} bytes, {r['documents']} documents)")
    if gap is not None:
        print0(f"{tag}: cross-direction penalty (bwd - fwd) / fwd = {100 * gap:+.2f}%")
    path = job.records["bpb"][m.tag]
    job.write(path, dict(m.common, eval="bpb", split="val", eval_tokens=job.args.eval_tokens, results=results,
                         arrow_of_time_gap=gap))
    bad = [d for d, r in results.items() if not math.isfinite(r["bpb"])]
    if bad:  # recorded (it is the result), but a NaN is a failed evaluation: exit non-zero
        raise UserError(f"{tag}: bpb {', '.join(bad)} is not finite ({path}); the weights or the evaluation data "
                        "are broken")
    job.matrix.append((tag, trained, {d: r["bpb"] for d, r in results.items()}))


# ---- CORE ---------------------------------------------------------------------------------------------
def prepare_core(args):
    labels = [s.strip() for s in args.core_tasks.split(",") if s.strip()]
    return CoreBenchmark.prepare(args.bundle_dir or None, args.bundle_url, args.max_per_task, labels)


def run_core(job, m):
    core, tag, step, trained = job.prepared["core"], m.meta["model_tag"], m.meta["step"], m.meta["direction"]
    results = core.evaluate(m.model, m.tokenizer, trained, job.directions, job.device, m.seq_len,
                            job.args.device_batch_size, m.autocast, job.rank, job.world_size)
    print0(f"\n{tag} (trained {trained}) step {step}: CORE\n" + format_table(results))
    job.write(job.records["core"][m.tag], dict(m.common, eval="core", bundle_dir=core.bundle_dir,
                                               max_per_task=job.args.max_per_task, **results))


# ---- consistency --------------------------------------------------------------------------------------
def consistency_records(models):
    """A bidirectional model's two readings, and each forward/backward pair among the models (the i-th
    forward-trained with the i-th backward-trained one), recorded in the forward model's run."""
    paths = {m["tag"]: record_path(m["evaluations"], "consistency", m["step"])
             for m in models if is_two_way(m["direction"])}
    forwards = [m for m in models if m["direction"] == "forward"]
    backwards = [m for m in models if m["direction"] == "backward"]
    for fwd, bwd in zip(forwards, backwards):
        paths[fwd["tag"], bwd["tag"]] = record_path(fwd["evaluations"], f"consistency_pair_{bwd['tag']}", fwd["step"])
    if not paths:
        raise UserError("--eval=consistency needs a bidirectional model or a forward and a backward model "
                        "together (--model_tag=<forward tag>,<backward tag>): a one-way model has one reading")
    return paths


def run_consistency(job, m):
    # A one-way model is read in its own direction only here: it is half of a pair.
    docs, token_bytes = job.documents(m.tokenizer)
    tag, step, trained = m.meta["model_tag"], m.meta["step"], m.meta["direction"]
    native = DirectionSpec.for_model(m.meta, m.tokenizer).generation_directions()
    readings = {d: per_document_bpb(m.model, m.tokenizer, token_bytes, docs, trained, d, m.seq_len,
                                    job.args.device_batch_size, job.device, m.autocast) for d in native}
    job.per_doc[tag] = readings
    if is_two_way(trained):
        record = consistency_record(trained, readings["forward"], readings["backward"], readings["forward"][1],
                                    label=tag, eval_tokens=job.args.eval_tokens, **m.common)
        print0(format_stats(f"{tag} consistency (one model, two readings)", record["stats"]))
        job.write(job.records["consistency"][m.tag], record, f"{tag} (bidirectional), step {step}",
                  writer=write_consistency)


def pair_consistency(job):
    steps = {m["tag"]: m["step"] for m in job.models}
    for key, path in job.records["consistency"].items():
        if not isinstance(key, tuple):
            continue
        fwd, bwd = key
        forward, backward = job.per_doc[fwd]["forward"], job.per_doc[bwd]["backward"]
        label = f"{fwd} + {bwd}"
        record = consistency_record("pair", forward, backward, forward[1], label=label, source=job.args.source,
                                    forward_model=fwd, forward_step=steps[fwd], backward_model=bwd,
                                    backward_step=steps[bwd], eval_tokens=job.args.eval_tokens,
                                    created_at=datetime.now(timezone.utc).isoformat())
        print0(format_stats(f"{label} consistency (forward model vs backward model)", record["stats"]))
        job.write(path, record, f"{label}: forward model vs backward model", writer=write_consistency)


# What --eval can run, in the order it runs for each model.
EVALUATIONS = {
    "bpb": Evaluation(records=one_per_model("bpb"), run=run_bpb),
    "core": Evaluation(records=one_per_model("core"), run=run_core, prepare=prepare_core),
    "consistency": Evaluation(records=consistency_records, run=run_consistency, finish=pair_consistency),
}


def format_matrix(rows):
    """rows: [(label, trained_direction, {direction: bpb})] -> a text table with the gap."""
    lines = [f"{'model':<28} {'trained':<14} {'bpb fwd':>9} {'bpb bwd':>9} {'gap':>8}"]
    for label, trained, bpb in rows:
        f, b = bpb.get("forward"), bpb.get("backward")
        gap = f"{100 * (b - f) / f:+.1f}%" if f and b else "-"
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        lines.append(f"{label:<28} {trained:<14} {fmt(f):>9} {fmt(b):>9} {gap:>8}")
    return "\n".join(lines)


def parse_evals(spec):
    """The --eval names, in EVALUATIONS order."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    unknown = [n for n in names if n not in EVALUATIONS]
    if not names or unknown:
        raise UserError(f"--eval={spec!r}: use a comma list of {', '.join(EVALUATIONS)}")
    return [n for n in EVALUATIONS if n in names]


def build_parser():
    parser = argparse.ArgumentParser(description="Evaluate base checkpoints in each direction: bpb, CORE, consistency")
    add_flag(parser, "eval", default="bpb", help=f"comma list of {', '.join(EVALUATIONS)}")
    add_flag(parser, "source", default="base", help="checkpoint source: base | mid | sft | rl")
    add_flag(parser, "model_tag", default=None, help="one tag or a comma list (default: newest)")
    add_flag(parser, "step", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(parser, "eval_directions", default="forward,backward",
             help="comma list of forward, backward (bpb and core; consistency always reads both)")
    add_flag(parser, "eval_tokens", type=int, default=20 * 524288, help="validation text tokens to score (bpb, consistency)")
    add_flag(parser, "max_seq_len", type=int, default=-1, help="context per row (-1 = the checkpoint's)")
    add_flag(parser, "device_batch_size", type=int, default=32)
    add_flag(parser, "max_per_task", type=int, default=-1, help="core: items per task, the first of each file (-1 = all)")
    add_flag(parser, "core_tasks", default="", help="core: comma list of task labels (empty = every task of the bundle)")
    add_flag(parser, "bundle_dir", default="", help="core: an unpacked bundle (default: $NANOCHAT_BASE_DIR/eval_bundle, "
                                                    "downloaded on first use)")
    add_flag(parser, "bundle_url", default=BUNDLE_URL, help="core: where the bundle zip is downloaded from")
    add_flag(parser, "device_type", default="")
    add_flag(parser, "overwrite", action="store_true", help="replace existing evaluation files")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    names = parse_evals(args.eval)
    if args.eval_tokens <= 0 or args.device_batch_size <= 0:
        raise UserError("--eval_tokens and --device_batch_size must be positive")
    if args.max_per_task == 0 or args.max_per_task < -1:
        raise UserError("--max_per_task must be positive (or -1 for every item)")
    directions = parse_directions(args.eval_directions)
    tags = [t.strip(" ") for t in args.model_tag.split(",")] if args.model_tag else [None]  # "nl\n" stays refused
    models = [resolve(args, tag) for tag in tags]
    # Every record every evaluation will write, refused before any work if one exists without --overwrite.
    records = {name: EVALUATIONS[name].records(models) for name in names}
    refuse_existing([path for paths in records.values() for path in paths.values()], args.overwrite)
    prepared = {name: EVALUATIONS[name].prepare(args) for name in names if EVALUATIONS[name].prepare}
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    try:
        job = Job(args, directions, models, records, prepared, rank, world_size, device)
        for entry in models:
            loaded = load(args, entry, device)
            for name in names:
                EVALUATIONS[name].run(job, loaded)
        if job.matrix and (len(job.matrix) > 1 or len(directions) > 1):
            print0("\n" + format_matrix(job.matrix))
        for name in names:
            if EVALUATIONS[name].finish:
                EVALUATIONS[name].finish(job)
    finally:
        compute_cleanup()


def resolve(args, tag):
    """A checkpoint to evaluate (metadata only): {tag, step, direction, evaluations}."""
    directory, step, tag = resolve_checkpoint(args.source, tag, args.step)
    meta = load_meta(directory, step)
    if "direction" not in meta:  # the message build_model gives the other scripts
        raise UserError(f"checkpoint metadata in {directory} lacks 'direction'/'model_config': not a nanochat checkpoint")
    return {"tag": tag, "step": step, "direction": meta["direction"],
            "evaluations": artifact_dirs(args.source, tag)["evaluations"]}


def load(args, entry, device):
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=entry["tag"], step=entry["step"])
    trained_len = meta["model_config"]["sequence_len"]
    T = trained_len if args.max_seq_len == -1 else args.max_seq_len
    if not 0 < T <= trained_len:
        raise UserError(f"--max_seq_len={args.max_seq_len}: use a positive context of at most {trained_len} (the "
                        "checkpoint's training context), or -1 for the checkpoint's")
    common = {"source": args.source, "model_tag": meta["model_tag"], "step": meta["step"],
              "trained_direction": meta["direction"], "max_seq_len": T,
              "created_at": datetime.now(timezone.utc).isoformat()}
    return Loaded(model, tokenizer, meta, entry["tag"], T, autocast_context(device.type), common)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
