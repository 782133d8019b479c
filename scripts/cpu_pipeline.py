"""The whole pipeline on a CPU, offline, in minutes: built-in corpus -> tokenizer -> forward and
backward base models for two seeds (scripts.arrow_study) and a bidirectional one -> bpb in both
directions -> a report that opens with the arrow-of-time gap and its 95% interval.

    bash runcpu.sh                       # sets up .venv, then runs this
    python -m scripts.cpu_pipeline       # same, in an existing environment

Rerunning reuses the data, the tokenizer and completed experiments; `--tag` names a fresh set.
"""

import argparse
import os
import subprocess
import sys
import time

from nanochat.common import UserError, add_flag, get_base_dir, run_main
from nanochat.dataset import list_shards, data_dir
from nanochat.tokenizer import tokenizer_dir


def run(step, args):
    """Run one stage as `python -m ...`, streaming its output; stop the pipeline if it fails."""
    cmd = [sys.executable, "-m", *args]
    print(f"\n=== {step}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise UserError(f"pipeline stage '{step}' failed (exit {result.returncode}): {' '.join(cmd)}")
    print(f"=== {step}: done in {time.time() - t0:.0f}s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="CPU pipeline: data -> tokenizer -> 3 base models -> bpb matrix -> report")
    add_flag(p, "tag", default="cpu", help="study name; experiment ids are <tag>_d<depth>_s<seed>_<fwd|bwd|bidi>")
    add_flag(p, "seeds", default="1,2", help="seeds of the forward/backward pairs (2+ give an interval)")
    add_flag(p, "depth", type=int, default=3)  # 5 models in under 10 minutes on 2 cores
    add_flag(p, "max_seq_len", type=int, default=128)
    add_flag(p, "device_batch_size", type=int, default=8)
    add_flag(p, "num_iterations", type=int, default=300)
    add_flag(p, "vocab_size", type=int, default=4096)
    add_flag(p, "tokenizer_chars", type=int, default=20_000_000)
    add_flag(p, "eval_tokens", type=int, default=40_000)
    add_flag(p, "shuffle", type=int, default=1, choices=(0, 1),
             help="1: each epoch reads the documents in a fresh seeded order; 0: storage order (runs before it)")
    args = p.parse_args(argv)
    t0 = time.time()
    base = get_base_dir()
    print(f"base dir: {base}", flush=True)

    if len(list_shards()) >= 2:
        print(f"\n=== data: reusing {len(list_shards())} shards in {data_dir()}", flush=True)
    else:
        run("data", ["nanochat.dataset", "--builtin"])
    if os.path.exists(os.path.join(tokenizer_dir(), "tokenizer.json")):
        print(f"\n=== tokenizer: reusing {tokenizer_dir()}", flush=True)
    else:
        run("tokenizer", ["scripts.tok_train", f"--vocab_size={args.vocab_size}", f"--max_chars={args.tokenizer_chars}"])
        run("tokenizer eval", ["scripts.tok_eval", "--max_docs=500"])

    common = [f"--max_seq_len={args.max_seq_len}", f"--device_batch_size={args.device_batch_size}",
              f"--total_batch_size={args.device_batch_size * args.max_seq_len}",
              f"--num_iterations={args.num_iterations}", f"--shuffle={args.shuffle}",
              f"--eval_every={max(1, args.num_iterations // 3)}",
              # a lighter validation during training; the final matrix uses --eval_tokens
              f"--eval_tokens={args.eval_tokens}", f"--base.eval_tokens={max(1, args.eval_tokens // 4)}",
              f"--log_every={max(1, args.num_iterations // 20)}", "--sample_every=-1", "--device_type=cpu"]
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    run(f"arrow-of-time study: forward and backward, seeds {', '.join(seeds)}", [
        "scripts.arrow_study", f"--name={args.tag}", f"--seeds={','.join(seeds)}", f"--depths={args.depth}",
        "--directions=forward,backward", *common])
    ids = [f"{args.tag}_d{args.depth}_s{s}_{d}" for s in seeds for d in ("fwd", "bwd")]
    bidi = f"{args.tag}_d{args.depth}_s{seeds[0]}_bidi"
    run("bidirectional model", [
        "scripts.run_backward_experiment", "--phase=base", "--direction=bidirectional", f"--depth={args.depth}",
        f"--experiment_id={bidi}", f"--seed={seeds[0]}", "--eval_directions=forward,backward", *common])
    ids.append(bidi)
    run("report", ["scripts.report", f"--experiments={','.join(ids)}", f"--title=CPU pipeline ({args.tag})"])
    print(f"\nCPU pipeline finished in {time.time() - t0:.0f}s. Experiments: {', '.join(ids)} "
          f"in {os.path.join(base, 'experiments')}", flush=True)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
