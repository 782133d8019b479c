"""Compression of the trained tokenizer: UTF-8 bytes per token on train and validation text.

    python -m scripts.tok_eval --max_docs=2000
"""

import argparse
import sys

from nanochat.common import add_flag, run_main
from nanochat.dataset import DocumentSource
from nanochat.tokenizer import get_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print the tokenizer's compression (bytes per token)")
    add_flag(parser, "max_docs", type=int, default=2000, help="documents per split to measure")
    args = parser.parse_args(argv)
    tokenizer = get_tokenizer()
    print(f"vocab size {tokenizer.get_vocab_size()}")
    print(f"{'split':<6} {'docs':>6} {'bytes':>12} {'tokens':>10} {'bytes/token':>12}")
    for split in ("train", "val"):
        texts = [t for _, t in zip(range(args.max_docs), (text for _, text in DocumentSource(split).iter_from()))]
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(ids) for ids in tokenizer.encode(texts))
        print(f"{split:<6} {len(texts):>6} {n_bytes:>12} {n_tokens:>10} {n_bytes / max(1, n_tokens):>12.3f}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
