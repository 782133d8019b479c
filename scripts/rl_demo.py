"""Does RL learn? Tiny models, on a CPU, in a few minutes: reward after SFT vs after RL, per direction.

    python -m scripts.rl_demo                                   # forward, backward, bidirectional
    python -m scripts.rl_demo --directions=forward --rl_iterations=80

For each direction, in a fresh base directory (temporary unless --base_dir): a depth-2 base model on
the built-in corpus -> a short SFT on two-way arithmetic (RL can only improve a policy that sometimes
earns a reward) -> RL on the same task; one table of the rewards the RL checkpoints recorded. Each
stage is an ordinary `python -m scripts.X` command, printed before it runs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from nanochat.checkpoint_manager import checkpoint_dir_for, find_last_step, load_meta
from nanochat.common import UserError, add_flag, run_main
from nanochat.direction import DIRECTIONS, parse_directions
from nanochat.rl import paired_change

# SFT steps per direction: enough for a clearly non-zero reward, not enough to saturate.
# Factoring (backward) is harder than multiplying, and bidirectional learns both.
SFT_ITERATIONS = {"forward": 100, "backward": 200, "bidirectional": 250}


def run(stage, args, base_dir, quiet):
    print(f"\n=== {stage}: NANOCHAT_BASE_DIR={base_dir} python -m {' '.join(args)}", flush=True)
    t0 = time.time()
    result = subprocess.run([sys.executable, "-m", *args], env=dict(os.environ, NANOCHAT_BASE_DIR=base_dir),
                            capture_output=quiet, text=True)
    if result.returncode != 0:
        if quiet:
            sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise UserError(f"stage '{stage}' failed (exit {result.returncode}): python -m {' '.join(args)}")
    print(f"=== {stage}: done in {time.time() - t0:.0f}s", flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="Reward after SFT vs after RL on two-way arithmetic, per direction")
    add_flag(p, "directions", default="forward,backward,bidirectional", help="comma list of trained directions")
    add_flag(p, "base_dir", default=None, help="where to build everything (default: a new temporary directory)")
    add_flag(p, "base_iterations", type=int, default=50)
    add_flag(p, "sft_iterations", type=int, default=-1, help=f"-1 = per direction: {SFT_ITERATIONS}")
    add_flag(p, "sft_lr_frac", type=float, default=0.5)
    add_flag(p, "rl_iterations", type=int, default=60)
    add_flag(p, "examples_per_step", type=int, default=16)
    add_flag(p, "num_samples", type=int, default=8)
    add_flag(p, "rl_lr_frac", type=float, default=0.2)
    add_flag(p, "eval_examples", type=int, default=200)
    add_flag(p, "eval_k", type=int, default=8)
    add_flag(p, "seed", type=int, default=42)
    add_flag(p, "verbose", type=int, default=0, help="1 = show every stage's output")
    add_flag(p, "keep", type=int, default=0, help="1 = keep the temporary base dir (a --base_dir is always kept)")
    args = p.parse_args(argv)
    directions = parse_directions(args.directions, DIRECTIONS)
    base_dir = args.base_dir or tempfile.mkdtemp(prefix="nanochat_rl_demo_")
    quiet = not args.verbose
    t_start = time.time()
    print(f"base dir: {base_dir}", flush=True)

    if not os.path.isdir(os.path.join(base_dir, "base_data")):
        run("data", ["nanochat.dataset", "--builtin", "--max_docs=1500", "--docs_per_shard=500"], base_dir, quiet)
    if not os.path.exists(os.path.join(base_dir, "tokenizer", "tokenizer.json")):
        run("tokenizer", ["scripts.tok_train", "--vocab_size=512", "--max_chars=1000000"], base_dir, quiet)

    rows = []
    for direction in directions:
        tag = f"demo_{direction}"
        sft_iterations = args.sft_iterations if args.sft_iterations > 0 else SFT_ITERATIONS[direction]
        run(f"base {direction}", [
            "scripts.base_train", f"--direction={direction}", "--depth=2", "--max_seq_len=64", "--device_batch_size=8",
            "--total_batch_size=512", f"--num_iterations={args.base_iterations}", "--eval_every=-1", "--eval_tokens=512",
            "--sample_every=-1", f"--log_every={args.base_iterations}", "--device_type=cpu", f"--model_tag={tag}",
            f"--seed={args.seed}"], base_dir, quiet)
        run(f"sft {direction}", [
            "scripts.chat_sft", "--source=base", f"--model_tag={tag}", "--tasks=arithmetic",
            f"--num_iterations={sft_iterations}", f"--init_lr_frac={args.sft_lr_frac}", "--max_seq_len=32",
            "--device_batch_size=16", "--eval_every=-1", f"--log_every={sft_iterations}", "--device_type=cpu",
            f"--seed={args.seed}"], base_dir, quiet)
        result = run(f"rl {direction}", [
            "scripts.chat_rl", "--source=sft", f"--model_tag={tag}", "--task=arithmetic",
            f"--num_iterations={args.rl_iterations}", f"--examples_per_step={args.examples_per_step}",
            f"--num_samples={args.num_samples}", "--max_new_tokens=16", f"--init_lr_frac={args.rl_lr_frac}",
            f"--eval_examples={args.eval_examples}", f"--eval_k={args.eval_k}", "--eval_every=-1", "--device_type=cpu",
            f"--log_every={max(1, args.rl_iterations // 10)}", f"--seed={args.seed}"], base_dir, quiet)
        if quiet:  # the evaluation lines are the point of the demo: show them anyway
            print("\n".join(line for line in result.stdout.splitlines() if "| eval" in line), flush=True)
        rl_dir = checkpoint_dir_for("rl", tag, base_dir)
        rewards = load_meta(rl_dir, find_last_step(rl_dir))["rewards"]
        rows += [(direction, c, sft_iterations, before, rewards["after"][c]) for c, before in rewards["before"].items()]

    k = args.eval_k
    print(f"\nReward on the arithmetic test split (mean over {args.eval_examples} prompts x {k} samples at "
          f"temperature 1.0; pass@{k} over prompts). RL: {args.rl_iterations} steps x {args.examples_per_step} "
          f"prompts x {args.num_samples} samples, init_lr_frac={args.rl_lr_frac}.")
    header = f"{'model':<14} {'generates':<9} {'SFT steps':>9} | {'reward SFT':>10} {'reward RL':>9} " \
             f"{'change +- s.e.':>16} | {f'pass@{k} SFT':>10} {f'pass@{k} RL':>9}"
    print(header)
    print("-" * len(header))
    for direction, concrete, sft_iterations, before, after in rows:
        change, se = paired_change(before, after)
        print(f"{direction:<14} {concrete:<9} {sft_iterations:>9} | {before['mean_reward']:>10.4f} "
              f"{after['mean_reward']:>9.4f} {f'{change:+.4f} +- {se:.4f}':>16} | "
              f"{before['pass_at_k']:>10.4f} {after['pass_at_k']:>9.4f}")
    print(f"samples per cell: {rows[0][3]['samples'] if rows else 0} ({args.eval_examples} prompts x {k}); s.e. = "
          f"standard error of the paired per-prompt change; total time {time.time() - t_start:.0f}s")
    summary = [{"model": d, "generates": c, "sft_iterations": n,
                **{f"{when}_{key}": r[key] for when, r in (("sft", b), ("rl", a))
                   for key in ("mean_reward", "pass_at_k", "samples")}} for d, c, n, b, a in rows]
    print("json: " + json.dumps(summary))
    if args.base_dir is None and not args.keep:
        shutil.rmtree(base_dir, ignore_errors=True)
    else:
        print(f"everything is in {base_dir}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
