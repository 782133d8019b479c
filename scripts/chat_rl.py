"""Reinforcement learning on a task with a verifiable reward, in the parent checkpoint's direction.

    python -m scripts.chat_rl --source=sft --model_tag=d4_backward --task=arithmetic --num_iterations=50

Forward models are rewarded for the answer they write to a question; backward models are given
the answer and rewarded for the question they write before it (arithmetic: a product x*y, x, y > 1,
that equals the answer); bidirectional models for both. The algorithm: nanochat/rl.py.
"""

import argparse
import json
import sys

from nanochat.common import UserError, add_flag, compute_cleanup, compute_init, print0, run_main
from nanochat.direction import DirectionSpec
from nanochat.engine import Engine
from nanochat.phases import PHASES
from nanochat.rl import RLTrainer, Rollouts, evaluate, flat_eval, format_eval, paired_change
from nanochat.training import Every, LossMonitor, StepLog, autocast_context, run_loop
from scripts.phase_flags import (add_optimizer_flags, add_parent_flags, add_run_flags, check_flags, check_phase_flags,
                                 flag_values, later_phase_run)
from tasks.common import check_task_direction
from tasks.registry import TASKS, get_task

# Flags that define the rollouts of a step (a resumed run keeps the checkpoint's values).
MODEL_DATA_DEFAULTS = {"task": "arithmetic", "examples_per_step": 16, "num_samples": 8, "max_new_tokens": 128,
                       "temperature": 1.0, "top_k": -1, "seed": 42}
# Optimizer and schedule flags: on resume they apply from the resume step (recorded in the metadata).
SCHEDULE_FLAGS = ("init_lr_frac", "embedding_lr", "unembedding_lr", "matrix_lr")


def build_parser():
    p = argparse.ArgumentParser(description="RL (group-normalised policy gradient) in the parent checkpoint's direction")
    add_parent_flags(p, PHASES["rl"].parent)
    # Flags that define the rollouts default to None: MODEL_DATA_DEFAULTS, or the checkpoint's values.
    add_flag(p, "task", default=None, help="task with a reward: arithmetic (any direction, default), gsm8k (forward)")
    add_flag(p, "num_iterations", type=int, default=100, help="RL steps")
    add_flag(p, "examples_per_step", type=int, default=None, help="prompts per step, all ranks together (default 16)")
    add_flag(p, "num_samples", type=int, default=None, help="completions per prompt, the group (default 8)")
    add_flag(p, "max_new_tokens", type=int, default=None, help="default 128")
    add_flag(p, "temperature", type=float, default=None, help="default 1.0")
    add_flag(p, "top_k", type=int, default=None, help="-1 = sample from the whole vocabulary (default)")
    add_optimizer_flags(p, 0.05)  # small: the policy stays near its SFT parent (the rate decays to 0)
    add_flag(p, "eval_every", type=int, default=50, help="evaluate every N steps (-1 = only before and after)")
    add_flag(p, "eval_examples", type=int, default=100, help="test prompts per evaluation")
    add_flag(p, "eval_k", type=int, default=8, help="samples per test prompt (pass@k)")
    add_run_flags(p)
    return p


def usable_directions(task_name, model_direction):
    """The directions in which the task can be generated and rewarded for this model (one UserError
    if none), checked on the task's class where possible: before its data loads."""
    task = TASKS.get(task_name)
    if not isinstance(task, type):  # unknown name (get_task says so) or a factory: build it
        task = get_task(task_name, "test")
    return list(check_task_direction(task, model_direction))


def lr_multiplier(step, num_iterations):
    """RL's schedule (step counts from 0): linear decay from the full rate (--init_lr_frac x the
    base rates) to zero at the last step, which keeps the policy near its SFT parent."""
    return (num_iterations - 1 - step) / max(1, num_iterations)


def check_args(args):
    check_phase_flags(args)
    check_flags(args, positive=("temperature", "num_iterations", "examples_per_step", "num_samples", "max_new_tokens",
                                "eval_examples", "eval_k"), positive_or_off=("eval_every",))
    if args.num_samples is not None and args.num_samples < 2:
        raise UserError(f"--num_samples={args.num_samples}: a group needs at least 2 completions "
                        "(with one, every advantage is 0)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        # A task that cannot work on the parent's direction is refused before any file is touched.
        with later_phase_run("rl", args, MODEL_DATA_DEFAULTS, rank, device,
                             check_parent=lambda d: usable_directions(args.task or MODEL_DATA_DEFAULTS["task"], d)
                             ) as (run, model, tokenizer, spec, parent, resume_meta):
            check_args(args)  # the values resolved from the defaults or the checkpoint
            if args.examples_per_step % world_size:
                raise UserError(f"--examples_per_step={args.examples_per_step} must be divisible by the number of "
                                f"processes ({world_size})")
            train(args, run, model, tokenizer, spec.direction, parent, resume_meta, rank, world_size, device)
    finally:
        compute_cleanup()


def train(args, run, model, tokenizer, direction, parent, resume_meta, rank, world_size, device):
    # The directions in which the task (a resumed run's: the checkpoint's) can be generated and
    # rewarded for this model; a bidirectional model draws each example's (nanochat/rl.py).
    directions = usable_directions(args.task, direction)
    train_task, test_task = get_task(args.task, "train"), get_task(args.task, "test")
    spec = DirectionSpec.from_tokenizer(direction, tokenizer, seed=args.seed, p_backward=args.p_backward)
    engine = Engine(model, tokenizer, spec=spec)
    autocast = autocast_context(device.type)
    print0(f"rl: parent {parent['checkpoint_dir']} step {parent['step']} (trained {direction}); "
           f"task {args.task} in {', '.join(directions)}; {len(train_task)} train / {len(test_task)} test examples")
    print0(f"{args.num_iterations} steps x {args.examples_per_step} prompts x {args.num_samples} samples; "
           f"saving to {run.checkpoint_dir}")

    rollouts = Rollouts(train_task, directions, args.examples_per_step, args.num_samples, args.max_new_tokens,
                        args.temperature, None if args.top_k <= 0 else args.top_k, args.seed)
    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr)
    trainer = RLTrainer(model, optimizers, engine, spec, rollouts, world_size, device, autocast,
                        lr_schedule=lambda step: lr_multiplier(step, args.num_iterations), lr_scale=args.init_lr_frac)
    start_step = run.restore(trainer, None, args.num_iterations, flag_values(args, SCHEDULE_FLAGS))

    # Evaluation before RL, every --eval_every steps and at the end: the same test prompts and
    # sampling seeds each time, so evaluations differ only in the weights.
    evals = {}

    def run_eval(step):
        model.eval()
        results = evaluate(engine, spec, test_task, directions, args.eval_examples, args.eval_k, seed=args.seed,
                           rank=rank, world_size=world_size, autocast=autocast, **rollouts.sampling)
        print0(f"step {step:05d} | eval {format_eval(results, args.eval_k)}")
        evals["last"] = results
        return flat_eval(results)

    user_config = dict(vars(args))
    meta = run.meta(spec, model, tokenizer, user_config, parent, task=args.task, task_directions=directions,
                    num_iterations=args.num_iterations, world_size=world_size)

    def save(step, last):
        rewards = {"before": evals["before"], "after": evals["last"], "eval_k": args.eval_k,
                   "train_reward_first": trainer.first_reward, "train_reward_last": trainer.last_reward}
        run.save(step, model, trainer.optimizer_state(), None, dict(meta, rewards=rewards))

    run.clear()
    with run.logs(direction, user_config) as (logger, wb):
        if resume_meta is None:
            run_eval(0)
            evals["before"] = evals["last"]
            if logger is not None:
                logger.log_step(0, flat_eval(evals["before"]))
        else:  # the evaluation before RL, and the rewards so far, were recorded by the checkpoint
            recorded = resume_meta.get("rewards") or {}
            evals["before"], evals["last"] = recorded.get("before"), recorded.get("after")
            trainer.first_reward = recorded.get("train_reward_first")
        run_loop(trainer, start_step, args.num_iterations,
                 StepLog(print0, args.log_every, show=("reward",), logger=logger, wandb_run=wb),
                 LossMonitor(spike_factor=0),  # a policy-gradient loss is not a likelihood: no spike warnings
                 evaluate=Every(args.eval_every, run_eval), save=Every(args.save_every, save))
        before, after = evals["before"], evals["last"]
        for d in directions:
            change, se = paired_change(before[d], after[d])
            print0(f"{d}: test mean reward {before[d]['mean_reward']:.4f} before RL -> "
                   f"{after[d]['mean_reward']:.4f} after ({change:+.4f} +- {se:.4f} paired s.e. over "
                   f"{after[d]['prompts']} prompts x {args.eval_k} samples)")
        print0("final: " + json.dumps({"before": flat_eval(before), "after": flat_eval(after)}))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
