"""Arrow-of-time study: forward and backward (optionally bidirectional) models for several seeds
(and depths) on the same data, each scored on the same held-out documents, the gap paired by seed.

    python -m scripts.arrow_study --name=shakespeare_d2 --seeds=1,2,3 --depths=2 \
        --num_iterations=300 --max_seq_len=128 --device_batch_size=8 --total_batch_size=1024
    python -m scripts.arrow_study --name=... --directions=forward,backward,bidirectional --depths=2,4

Each cell (depth, seed, direction) is one experiment `<name>_d<depth>_s<seed>_<fwd|bwd|bidi>`
run by the orchestrator (scripts.run_backward_experiment), which gets every flag this script does
not know. Rerunning resumes. The record and table go to <base_dir>/studies/<name>/ (study.json,
study.md); `python -m scripts.report --study=<name>` shows the same table. See docs/ARROW_OF_TIME.md.
"""

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

from nanochat.paths import atomic_write_json
from nanochat.research.arrow_study import (LOG_POSITION_EDGES, POSITIONS_FILE, STUDY_FILE, cell_key, study_dir,
                                          study_section)
from nanochat.common import UserError, add_flag, print0, run_main
from nanochat.direction import DIRECTIONS, parse_directions
from nanochat.experiment_config import ExperimentConfig

SHORT = {"forward": "fwd", "backward": "bwd", "bidirectional": "bidi"}


def build_parser():
    p = argparse.ArgumentParser(description="Arrow-of-time study: the gap between backward and forward models, by seed",
                                allow_abbrev=False)  # --seed must not pass for --seeds: unknown flags go to training
    add_flag(p, "name", required=True, help="study name (plain name); experiment ids start with it")
    add_flag(p, "directions", default="forward,backward", help="forward,backward[,bidirectional]")
    add_flag(p, "seeds", default="1,2,3", help="comma list of seeds (model init and data draw)")
    add_flag(p, "depths", default="2", help="comma list of depths")
    add_flag(p, "eval_tokens", type=int, default=40000,
             help="held-out tokens every model is scored on (passed to the orchestrator; also the position table)")
    add_flag(p, "positions", type=int, default=1, help="1: also the gap by position in the document (0 = skip)")
    return p


def position_tables(study, eval_tokens):
    """For every finished (depth, seed) pair: bits per byte by position in the reading direction,
    forward model read forward and backward model read backward, on the study's documents."""
    import torch
    from nanochat.checkpoint_manager import load_model
    from nanochat.common import autodetect_device_type
    from nanochat.loss_eval import evaluate_bpb_by_position, select_documents
    from nanochat.tokenizer import get_token_bytes
    device = autodetect_device_type()
    experiments = ExperimentConfig()
    tables, docs = {}, None
    for depth in study["depths"]:
        for seed in study["seeds"]:
            pair = {}
            for direction in ("forward", "backward"):
                exp = study["experiments"].get(cell_key(depth, seed, direction))
                if not exp or not experiments.exists(exp) or not experiments.load_config(exp).get("status") == "completed":
                    break
                model, tokenizer, meta = load_model("base", device, model_tag=exp)
                if docs is None:
                    docs = select_documents(tokenizer, eval_tokens)
                T = model.config.sequence_len
                autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else None
                pair[direction] = evaluate_bpb_by_position(model, tokenizer, get_token_bytes(device), docs, direction,
                                                           direction, T, 16, device, edges=LOG_POSITION_EDGES,
                                                           autocast_ctx=autocast)
            if len(pair) == 2:
                tables[f"d{depth}_s{seed}"] = {"depth": depth, "seed": seed, **pair}
    return tables


def _ints(spec, name):
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name}={spec!r}: use a comma list of integers")
    if not values or len(set(values)) != len(values):
        raise UserError(f"--{name}={spec!r}: give one or more distinct values")
    return values


def experiment_id(name, depth, seed, direction):
    return f"{name}_d{depth}_s{seed}_{SHORT[direction]}"


def plan(args):
    directions = parse_directions(args.directions, allowed=DIRECTIONS)
    if not {"forward", "backward"} <= set(directions):
        raise UserError("--directions must include forward and backward (the gap pairs them)")
    ExperimentConfig.validate_id(args.name)
    seeds, depths = _ints(args.seeds, "seeds"), _ints(args.depths, "depths")
    cells = {cell_key(d, s, x): experiment_id(args.name, d, s, x) for d in depths for s in seeds for x in directions}
    return directions, seeds, depths, cells


def main(argv=None):
    args, passthrough = build_parser().parse_known_args(argv)
    for flag in passthrough:
        if flag.split("=")[0].lstrip("-").replace("-", "_") in ("seed", "direction", "depth", "experiment_id", "phase"):
            raise UserError(f"{flag}: the study sets --seed, --direction, --depth and the experiment ids itself")
    directions, seeds, depths, cells = plan(args)
    passthrough = passthrough + [f"--eval_tokens={args.eval_tokens}"]
    folder = study_dir(args.name)
    path = os.path.join(folder, STUDY_FILE)
    study = {"name": args.name, "directions": directions, "seeds": seeds, "depths": depths,
             "experiments": cells, "flags": passthrough,
             "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if (sorted(old["flags"]), old["directions"]) != (sorted(passthrough), directions):
            raise UserError(f"study {args.name} exists with other flags/directions ({' '.join(old['flags'])}; "
                            f"{','.join(old['directions'])}): choose another --name")
        study["created_at"] = old.get("created_at", study["created_at"])
        # seeds and depths may grow: the new cells join the study
        study["seeds"] = sorted(set(old["seeds"]) | set(seeds))
        study["depths"] = sorted(set(old["depths"]) | set(depths))
        study["experiments"] = {**old["experiments"], **cells}
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(path, study)
    print0(f"study {args.name}: {len(cells)} experiments ({len(depths)} depth(s) x {len(seeds)} seed(s) x "
           f"{len(directions)} direction(s)); record {path}")
    for n, (depth, seed, direction) in enumerate((d, s, x) for d in depths for s in seeds for x in directions):
        exp = cells[cell_key(depth, seed, direction)]
        print0(f"[{n + 1}/{len(cells)}] depth {depth}, seed {seed}, {direction}: experiment {exp}", flush=True)
        cmd = [sys.executable, "-m", "scripts.run_backward_experiment", "--phase=base", f"--direction={direction}",
               f"--depth={depth}", f"--experiment_id={exp}", f"--seed={seed}", *passthrough]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"the cell {exp} failed (its output is above); fix it and rerun the same command "
                            "to resume the study")
    if args.positions:
        print0("bits per byte by position in the document, for every forward/backward pair ...", flush=True)
        atomic_write_json(os.path.join(folder, POSITIONS_FILE), position_tables(study, args.eval_tokens))
    experiments = ExperimentConfig()
    text, _ = study_section(study, experiments.evaluations_dir, folder)
    with open(os.path.join(folder, "study.md"), "w") as f:
        f.write(f"# {args.name}\n\n{text}")
    print0("\n" + text)
    print0(f"study table: {os.path.join(folder, 'study.md')}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
