"""Run an experiment chain (base -> mid -> sft -> rl) as tracked experiments, resumable by rerunning.

    python -m scripts.run_backward_experiment --phase=base --direction=backward --depth=4 \
        --experiment_id=bwd_d4 --num_iterations=200 --max_seq_len=128
    python -m scripts.run_backward_experiment --phase=mid,sft --parent_experiment=bwd_d4

Each phase is one experiment trained by its phase's script in a subprocess; this script validates
everything first, records each outcome in config.json, and skips completed phases on a rerun.
Unknown flags go to every phase's script (`--<phase>.<flag>=value` to one phase only).
Exit status: 0 all phases completed, 1 a phase failed, 2 bad input. Details: docs/EXPERIMENTS.md.
"""

import argparse
import functools
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections import namedtuple
from datetime import datetime, timezone

from nanochat.checkpoint_manager import list_steps, load_meta
from nanochat.common import UserError, add_flag, run_main
from nanochat.locking import acquire_run_lock, env_with_locks, parent_death_signal
from nanochat.direction import parse_directions, validate_direction
from nanochat.evaluations import record_path
from nanochat.experiment_config import PHASES, ExperimentConfig
from nanochat.phases import PHASES as PHASE_TABLE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The orchestrator's own training flags: forwarded, when given, to every phase whose script takes
# them (its build_parser decides; nanochat/phases.py names the script).
SHARED_FLAGS = ("device_batch_size", "num_iterations", "init_lr_frac", "device_type", "eval_tokens")
EVAL_FLAGS = ("device_batch_size", "eval_tokens", "device_type")
DEFAULT_DEPTH = 20  # scripts.base_train's default; always passed explicitly so the record is exact


@functools.lru_cache(maxsize=None)
def accepted_flags(phase):
    """Flag names (underscore spelling) the phase's script accepts."""
    parser = importlib.import_module(PHASE_TABLE[phase].script).build_parser()
    return set(vars(parser.parse_args([])))  # every flag has a default: its name is a key


def shared_flags(phase):
    return [name for name in SHARED_FLAGS if name in accepted_flags(phase)]


# Flags that tie a run to its experiments: only the orchestrator sets them.
MANAGED_FLAGS = ("model_tag", "output_tag", "source", "parent_experiment", "resume_from_step", "research_log")
# Settings of the whole chain: never scoped to one phase.
CHAIN_FLAGS = ("phase", "direction", "depth", "experiment_id", "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint",
               "eval_directions")

# parent_phase: the phase of `parent` (the checkpoint source the script loads it from).
Step = namedtuple("Step", "phase experiment_id parent parent_phase")
# One pass-through flag: the phase it is scoped to (None = all), its name, recorded value, tokens.
Passthrough = namedtuple("Passthrough", "scope name value tokens")


def build_parser():
    # allow_abbrev=False: an unknown pass-through flag must never be taken for an abbreviation of
    # one of ours (--eval would otherwise match --eval_directions).
    p = argparse.ArgumentParser(description="Run base/mid/sft/rl phases as tracked, resumable experiments",
                                allow_abbrev=False)
    add_flag(p, "phase", default="base", help="a phase or a comma list, in order: base, mid, sft, rl")
    add_flag(p, "direction", default=None,
             help="forward | backward | bidirectional (required for base; later phases inherit it)")
    add_flag(p, "depth", type=int, default=None, help=f"model depth (base default {DEFAULT_DEPTH}; inherited later)")
    add_flag(p, "experiment_id", default=None, help="id of the first phase's experiment (later: <id>_<phase>)")
    add_flag(p, "parent_experiment", default=None, help="experiment a non-base first phase continues from")
    add_flag(p, "device_batch_size", type=int, default=None, help="rows per micro-batch (training and eval)")
    add_flag(p, "num_iterations", type=int, default=None, help="optimizer steps per phase")
    add_flag(p, "init_lr_frac", type=float, default=None, help="scale all learning rates")
    add_flag(p, "nproc_per_node", type=int, default=1, help=">1: launch each script under torchrun")
    add_flag(p, "nnodes", type=int, default=1, help="torchrun --nnodes: nodes taking part (run the same command on each)")
    add_flag(p, "node_rank", type=int, default=0, help="torchrun --node_rank of this node (0 .. nnodes-1)")
    add_flag(p, "rdzv_endpoint", default="", help="torchrun --rdzv_endpoint host:port of node 0 (nnodes > 1)")
    add_flag(p, "eval_directions", default="forward,backward",
             help="after a base phase, bpb in these directions ('none' = no evaluation)")
    add_flag(p, "eval_tokens", type=int, default=None, help="validation tokens (training evals and base_eval)")
    add_flag(p, "device_type", default=None, help="cuda | mps | cpu (default: the scripts autodetect)")
    return p


# ---------------------------------------------------------------------------------- flags

def _coerce(value):
    """'4' -> 4, '0.5' -> 0.5, anything else stays text: how a pass-through flag is recorded."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_passthrough(tokens):
    """Unknown arguments -> [Passthrough]: what to record, and the tokens each script receives.

    `--x=y` and `--x y` carry a value, a lone `--x` is recorded as True; `--<phase>.x...` is scoped
    to one phase and reaches its script as `--x...`. The tokens are otherwise passed verbatim;
    names are recorded with underscores whichever spelling was used.
    """
    found = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise UserError(f"unexpected argument {token!r}: training flags are passed as --name=value")
        flag, eq, value = token[2:].partition("=")
        given = [token]
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, i = tokens[i + 1], i + 1
                given.append(value)
            else:
                value = True
        scope, dot, flag_name = flag.partition(".")
        if not dot:
            scope, flag_name = None, flag
        elif scope not in PHASES:
            raise UserError(f"--{flag}: {scope!r} is not a phase; scope a flag to one phase as "
                            f"--<phase>.<flag> with a phase among {', '.join(PHASES)}")
        name = flag_name.replace("-", "_")
        if name in MANAGED_FLAGS:
            hint = " (use --experiment_id)" if name in ("model_tag", "output_tag") else ""
            raise UserError(f"--{flag} is set by the orchestrator for each phase; do not pass it{hint}")
        if scope is not None:
            if name in CHAIN_FLAGS:
                raise UserError(f"--{flag}: --{name} is a setting of the whole chain; pass it unscoped")
            given[0] = "--" + token[2 + len(scope) + 1:]
        found.append(Passthrough(scope, name, value if value is True else _coerce(value), given))
        i += 1
    return found


def parse_phases(spec):
    phases = [s.strip() for s in spec.split(",") if s.strip()]
    if not phases:
        raise UserError(f"--phase is empty: use one or a comma list of {', '.join(PHASES)}")
    for phase in phases:
        if phase not in PHASES:
            raise UserError(f"unknown phase {phase!r} in --phase: use one or a comma list of {', '.join(PHASES)}")
    order = [PHASES.index(p) for p in phases]
    if order != sorted(set(order)):
        raise UserError(f"--phase={spec}: phases must be distinct and in the order {', '.join(PHASES)}")
    return phases


def parse_eval_directions(spec):
    if spec.strip().lower() in ("", "none"):
        return []
    return parse_directions(spec)


# ---------------------------------------------------------------------------------- plan

def plan_chain(args, passthrough, experiments):
    """Validate the request and return (steps, direction, depth). Reads only: writes nothing."""
    phases = parse_phases(args.phase)
    for p in passthrough:
        if p.scope is not None and p.scope not in phases:
            raise UserError(f"--{p.scope}.{p.name} is scoped to phase {p.scope!r}, which is not in "
                            f"--phase={args.phase}")
    missing = [ph for ph in phases if importlib.util.find_spec(PHASE_TABLE[ph].script) is None]
    accepted = {ph: accepted_flags(ph) for ph in phases if ph not in missing}
    for p in passthrough:
        targets = [p.scope] if p.scope is not None else list(accepted)
        if targets and not any(p.name in accepted.get(ph, ()) for ph in targets):
            raise UserError(f"--{p.name} is not a flag of the {'/'.join(targets)} script(s); "
                            "see `python -m <script> --help`")
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--nnodes={args.nnodes} --node_rank={args.node_rank}: need nnodes >= 1 and 0 <= node_rank < nnodes")
    if args.nnodes > 1 and ":" not in args.rdzv_endpoint:
        raise UserError("--nnodes > 1 needs --rdzv_endpoint=<host of node 0>:<port>, the same on every node")
    if args.eval_tokens is not None and args.eval_tokens <= 0:
        raise UserError(f"--eval_tokens must be positive, got {args.eval_tokens}")
    if args.depth is not None and args.depth <= 0:
        raise UserError(f"--depth must be positive, got {args.depth}")
    parse_eval_directions(args.eval_directions)

    first = phases[0]
    if first == "base":
        if args.parent_experiment is not None:
            raise UserError("--parent_experiment: a base phase trains from scratch and has no parent; "
                            "start the chain at a later phase to continue an experiment")
        if args.direction is None:
            raise UserError("--direction is required for a base phase: forward, backward or bidirectional")
        direction = validate_direction(args.direction)
        depth = args.depth if args.depth is not None else DEFAULT_DEPTH
        parent, parent_phase = None, None
        first_id = args.experiment_id or f"base_d{depth}_{direction}"
    else:
        parent = args.parent_experiment
        if parent is None:
            raise UserError(f"a chain starting at phase {first!r} continues an earlier experiment: "
                            "pass --parent_experiment=<id>")
        parent_config = experiments.load_config(parent)  # a clear error when it does not exist or is no name
        if parent_config.get("phase") not in PHASES[:PHASES.index(first)]:
            raise UserError(f"parent experiment {parent!r} is a {parent_config.get('phase')} experiment: "
                            f"a {first} phase continues from one of {', '.join(PHASES[:PHASES.index(first)])}")
        if parent_config.get("status") != "completed":
            raise UserError(f"parent experiment {parent!r} is {parent_config.get('status')}, not completed: "
                            "finish it first (rerun the command that started it)")
        direction, depth, parent_phase = parent_config["direction"], parent_config.get("depth"), parent_config["phase"]
        if args.direction is not None and validate_direction(args.direction) != direction:
            raise UserError(f"--direction={args.direction} contradicts parent experiment {parent!r}, which is "
                            f"{direction!r}: omit --direction to inherit it")
        if args.depth is not None and args.depth != depth:
            raise UserError(f"--depth={args.depth} contradicts parent experiment {parent!r}, which has depth "
                            f"{depth}: a later phase keeps the model's size")
        first_id = args.experiment_id or f"{parent}_{first}"

    steps = []
    for k, phase in enumerate(phases):
        experiment_id = experiments.validate_id(first_id if k == 0 else f"{first_id}_{phase}")
        if experiment_id == parent:
            raise UserError(f"experiment {experiment_id!r} cannot be its own parent: choose another --experiment_id")
        steps.append(Step(phase, experiment_id, parent, parent_phase))
        parent, parent_phase = experiment_id, phase

    for step in steps:  # checked for the whole chain before anything runs
        if experiments.exists(step.experiment_id):
            experiments.check_same(step.experiment_id, phase=step.phase, direction=direction, depth=depth,
                                   parent_experiment=step.parent)
        else:
            experiments.refuse_shadowing(step.experiment_id)
    if missing:  # named last: the rest of the chain was valid
        raise UserError(f"phase {missing[0]!r} is not available yet: "
                        f"{PHASE_TABLE[missing[0]].script.replace('.', '/')}.py is not in this checkout")
    return steps, direction, depth


# ---------------------------------------------------------------------------------- running

class PhaseFailed(Exception):
    """A phase's script failed: the message says how, and how to retry (exit status 1, not 2)."""


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def launcher(module, nproc_per_node, nnodes=1, node_rank=0, rdzv_endpoint=""):
    """How to start `module`: plain `python -m`, or one process per GPU under torchrun (one node:
    --standalone; several: the same command on every node, with its --node_rank and node 0's
    rendezvous endpoint)."""
    if nnodes == 1 and nproc_per_node == 1:
        return [sys.executable, "-m", module]
    rendezvous = ["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}", f"--node_rank={node_rank}",
                                                       "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc_per_node}",
            "-m", module]


# The experiment locks this process holds (experiment id -> RunLock), named to every child.
HELD_LOCKS = {}


def lock_experiment(experiments, experiment_id):
    """Hold the experiment's run lock until this process exits (fails at once if another holds it)."""
    if experiment_id not in HELD_LOCKS:
        HELD_LOCKS[experiment_id] = acquire_run_lock(experiments.experiment_dir(experiment_id),
                                                     f"experiment {experiment_id!r}", trainer=False)
    return HELD_LOCKS[experiment_id]


def child_env(experiments):
    """The scripts must find this repo's packages and write under the same base dir as we read;
    they inherit the experiment locks we hold."""
    env = env_with_locks(os.environ, list(HELD_LOCKS.values()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["NANOCHAT_BASE_DIR"] = os.path.abspath(experiments.base_dir)
    return env


def run_command(experiments, experiment_id, phase, command):
    """Run one script with its output streaming through; record the attempt; raise on failure."""
    text = shlex.join(command)
    print(f"$ {text}", flush=True)
    attempts = experiments.load_config(experiment_id).get("attempts", [])
    attempt = {"command": text, "started_at": _now(), "finished_at": None, "returncode": None}
    experiments.update_config(experiment_id, attempts=attempts + [attempt])
    # The child dies with us (Linux: parent-death signal; elsewhere it watches the lock holder).
    process = subprocess.Popen(command, env=child_env(experiments), preexec_fn=parent_death_signal())
    # A SIGTERM aimed at us alone (a scheduler, `kill <pid>`) must not leave the script training
    # unwatched while the experiment says "running": pass it on, then record the failure.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        returncode = process.wait()
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group: let the script finish its own cleanup.
        returncode = process.wait()
        if returncode == 0:
            returncode = -signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
    attempt.update(finished_at=_now(), returncode=returncode)
    experiments.update_config(experiment_id, attempts=attempts + [attempt])
    if returncode == 0:
        return
    if returncode < 0:
        how = f"signal {-returncode}"
    elif 128 < returncode < 128 + 65:  # a script that stopped cleanly on a signal
        how = f"signal {returncode - 128}, exit status {returncode}"
    else:
        how = f"exit status {returncode}"
    raise PhaseFailed(f"phase {phase} of experiment {experiment_id} failed ({how}); the command was:\n  {text}\n"
                      f"experiment {experiment_id} is marked failed; rerun this orchestrator command to retry it "
                      "(completed phases are skipped)")


def note_flag_changes(experiments, experiment_id, config, flags, will_run):
    old = config.get("flags", {})
    changed = {k: (old.get(k), flags.get(k)) for k in sorted(set(old) | set(flags)) if old.get(k) != flags.get(k)}
    if not changed:
        return
    listing = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if not will_run:
        print(f"note: experiment {experiment_id} was completed with different flags ({listing}); "
              "they are not applied: pass a new --experiment_id to train with these", flush=True)
        return
    print(f"note: experiment {experiment_id} was started with different flags ({listing}); "
          "continuing with the new ones (the old ones are kept under flags_history)", flush=True)
    history = config.get("flags_history", []) + [{"flags": old, "replaced_at": _now()}]
    experiments.update_config(experiment_id, flags=flags, flags_history=history)


def phase_flags(args, passthrough, phase):
    """(what the experiment records as its flags, the pass-through tokens its script receives)."""
    recorded = {name: getattr(args, name) for name in shared_flags(phase) if getattr(args, name) is not None}
    recorded["nproc_per_node"] = args.nproc_per_node
    if phase == "base":
        recorded["eval_directions"] = args.eval_directions
    tokens = []
    # Unscoped flags first, then this phase's scoped ones: the last value wins, in the record as
    # in the script's argparse, so a scoped value overrides an unscoped one wherever it was given.
    accepted = accepted_flags(phase)
    unscoped = [p for p in passthrough if p.scope is None and p.name in accepted]
    for p in unscoped + [p for p in passthrough if p.scope == phase]:
        recorded[p.name] = p.value
        tokens += p.tokens
    return recorded, tokens


def training_command(args, flags, tokens, experiments, step, direction, depth):
    """The training command for this attempt, or None when training already finished. Every phase
    script resumes (--resume_from_step) and moves aside a research log it cannot continue."""
    checkpoint_dir = experiments.checkpoint_dir(step.experiment_id)
    saved = list_steps(checkpoint_dir)
    resume = []
    if saved:
        last = saved[-1]
        planned = load_meta(checkpoint_dir, last).get("num_iterations")
        # Asking for more steps than the finished run took continues it.
        wanted = flags.get("num_iterations")
        wants_more = isinstance(wanted, int) and wanted > last
        if planned is not None and last >= planned and not wants_more:
            print(f"{step.experiment_id}: training finished earlier (checkpoint at step {last} of {planned}); "
                  "not rerunning it", flush=True)
            return None
        print(f"{step.experiment_id}: resuming {step.phase} training from its checkpoint at step {last}", flush=True)
        resume = [f"--resume_from_step={last}"]

    command = launcher(PHASE_TABLE[step.phase].script, args.nproc_per_node, args.nnodes, args.node_rank,
                       args.rdzv_endpoint)
    if step.phase == "base":
        command += [f"--model_tag={step.experiment_id}", f"--direction={direction}", f"--depth={depth}"]
    else:
        command += [f"--source={step.parent_phase}", f"--model_tag={step.parent}",
                    f"--output_tag={step.experiment_id}", f"--parent_experiment={step.parent}"]
    command.append("--research_log=1")
    command += [f"--{name}={getattr(args, name)}" for name in shared_flags(step.phase) if getattr(args, name) is not None]
    return command + tokens + resume


def find_bpb_evaluation(experiments, experiment_id, step):
    """The bpb evaluation record of `step` in the experiment's evaluations/ (with its "file" name), or None."""
    path = record_path(experiments.evaluations_dir(experiment_id), "bpb", step)
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f), file=os.path.basename(path))
    except (OSError, json.JSONDecodeError):
        return None


def evaluate_base(args, experiments, step, eval_directions, last_step):
    """Score the final checkpoint in each direction (skipped when that evaluation exists)."""
    existing = find_bpb_evaluation(experiments, step.experiment_id, last_step)
    if existing is not None and set(eval_directions) <= set(existing.get("results", {})):
        print(f"{step.experiment_id}: evaluation of step {last_step} exists ({existing['file']}); not rerunning it",
              flush=True)
        return existing
    command = launcher("scripts.base_eval", args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint) + [
        f"--model_tag={step.experiment_id}", "--source=base", f"--step={last_step}",
        f"--eval_directions={','.join(eval_directions)}"]
    command += [f"--{name}={getattr(args, name)}" for name in EVAL_FLAGS if getattr(args, name) is not None]
    if existing is not None:
        command.append("--overwrite")  # it lacks a requested direction
    run_command(experiments, step.experiment_id, step.phase, command)
    return find_bpb_evaluation(experiments, step.experiment_id, last_step)


def final_results(experiments, experiment_id, evaluation):
    """(results, seed): the numbers worth seeing in config.json without opening the logs, and the
    seed the script actually used (from the final checkpoint's record of its flags)."""
    checkpoint_dir = experiments.checkpoint_dir(experiment_id)
    saved = list_steps(checkpoint_dir)
    if not saved:
        return None, None
    meta = load_meta(checkpoint_dir, saved[-1])
    results = {"step": saved[-1]}
    # The scripts store their last metrics in the checkpoint metadata: train_loss, val_bpb_<dir>,
    # val_loss; RL its rewards before and after.
    results.update({k: v for k, v in meta.items()
                    if (k.startswith(("train_", "val_")) and isinstance(v, (int, float))) or k == "rewards"})
    if evaluation is not None:
        results["bpb"] = {d: r.get("bpb") for d, r in evaluation.get("results", {}).items()}
        results["arrow_of_time_gap"] = evaluation.get("arrow_of_time_gap")
        results["evaluation"] = evaluation.get("file")
    return results, (meta.get("user_config") or {}).get("seed")


def run_step(args, passthrough, experiments, step, direction, depth):
    flags, tokens = phase_flags(args, passthrough, step.phase)
    lock_experiment(experiments, step.experiment_id)  # before reading its state: no one else writes it now
    exists = experiments.exists(step.experiment_id)
    if exists:
        config = experiments.load_config(step.experiment_id)
        if config.get("status") == "completed":
            print(f"=== phase {step.phase}: experiment {step.experiment_id} is completed; skipping it", flush=True)
            note_flag_changes(experiments, step.experiment_id, config, flags, will_run=False)
            return
        print(f"=== phase {step.phase}: retrying experiment {step.experiment_id} (it was {config.get('status')})",
              flush=True)
        note_flag_changes(experiments, step.experiment_id, config, flags, will_run=True)
    else:
        print(f"=== phase {step.phase}: experiment {step.experiment_id} ({direction}, depth {depth}"
              f"{', parent ' + step.parent if step.parent else ''})", flush=True)
    experiments.create_experiment(step.phase, direction, depth, parent_experiment=step.parent,
                                  experiment_id=step.experiment_id, resume=exists, **flags)
    experiments.update_config(step.experiment_id, status="running",
                              runner={"pid": os.getpid(), "host": socket.gethostname()})
    try:
        command = training_command(args, flags, tokens, experiments, step, direction, depth)
        if command is not None:
            run_command(experiments, step.experiment_id, step.phase, command)
        evaluation = None
        eval_directions = parse_eval_directions(args.eval_directions)
        if step.phase == "base" and eval_directions:
            checkpoint_dir = experiments.checkpoint_dir(step.experiment_id)
            saved = list_steps(checkpoint_dir)
            if not saved:
                raise UserError(f"{step.experiment_id}: training exited cleanly but left no checkpoint in "
                                f"{checkpoint_dir}")
            evaluation = evaluate_base(args, experiments, step, eval_directions, saved[-1])
    except BaseException:
        experiments.update_config(step.experiment_id, status="failed")
        raise
    results, effective_seed = final_results(experiments, step.experiment_id, evaluation)
    done = {"status": "completed", "results": results, "runner": None}
    if experiments.load_config(step.experiment_id).get("seed") is None and effective_seed is not None:
        done["seed"] = effective_seed  # the script's default seed, so the record says what ran
    experiments.update_config(step.experiment_id, **done)
    summary = ""
    if results and results.get("bpb"):
        summary = " | " + " | ".join(f"bpb {d} {v:.4f}" for d, v in results["bpb"].items())
    print(f"=== phase {step.phase}: experiment {step.experiment_id} completed{summary}", flush=True)


def main(argv=None):
    args, unknown = build_parser().parse_known_args(argv)
    passthrough = parse_passthrough(unknown)
    experiments = ExperimentConfig()
    steps, direction, depth = plan_chain(args, passthrough, experiments)
    # The existing experiments of the chain are locked now (a concurrent run fails before anything
    # starts); new ones when they are created. All stay locked until this process exits.
    try:
        for step in steps:
            if experiments.exists(step.experiment_id):
                lock_experiment(experiments, step.experiment_id)
        for step in steps:
            try:
                run_step(args, passthrough, experiments, step, direction, depth)
            except PhaseFailed as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                sys.exit(1)
    finally:
        for lock in HELD_LOCKS.values():
            lock.release()
        HELD_LOCKS.clear()


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
