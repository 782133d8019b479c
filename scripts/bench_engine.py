"""Benchmark: generation tokens/s with and without the KV cache, at batch 1 and 8.

    python -m scripts.bench_engine --source=base --model_tag=d4 --max_tokens=100

A checkpoint with --model_tag, else a fresh model of --depth (the speed does not depend on the
weights). One line per (batch, cache) setting.
"""

import argparse
import sys
import time

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import add_flag, autodetect_device_type, print0, run_main
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import get_tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description="Generation throughput with and without the KV cache")
    add_flag(p, "source", default="base")
    add_flag(p, "model_tag", default=None, help="checkpoint to load (default: a random model of --depth)")
    add_flag(p, "depth", type=int, default=4)
    add_flag(p, "max_seq_len", type=int, default=512)
    add_flag(p, "max_tokens", type=int, default=100, help="tokens generated per sample")
    add_flag(p, "prompt_tokens", type=int, default=16)
    add_flag(p, "device_type", default="")
    args = p.parse_args(argv)
    device = torch.device(args.device_type or autodetect_device_type())
    if args.model_tag:
        model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag)
    else:
        tokenizer = get_tokenizer()
        torch.manual_seed(0)
        model = GPT.build(config_for_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len), device).eval()
        meta = {"direction": "forward"}
    engine = Engine(model, tokenizer, meta)
    prompt = [tokenizer.get_bos_token_id()] + list(range(10, 10 + args.prompt_tokens - 1))
    print0(f"device={device} params={model.num_params():,} context={model.config.sequence_len} "
           f"prompt={len(prompt)} new tokens={args.max_tokens} threads={torch.get_num_threads()}")
    print0(f"{'batch':>5} {'kv cache':>9} {'tokens/s':>10} {'seconds':>8}")
    for batch in (1, 8):
        for use_cache in (True, False):
            engine.generate(prompt, num_samples=batch, max_tokens=4, use_cache=use_cache)  # warm-up
            t0 = time.time()
            out = engine.generate(prompt, num_samples=batch, max_tokens=args.max_tokens, temperature=1.0,
                                  use_cache=use_cache)
            dt = time.time() - t0
            n = sum(len(s) for s in out)
            print0(f"{batch:>5} {'yes' if use_cache else 'no':>9} {n / dt:>10,.0f} {dt:>8.2f}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
