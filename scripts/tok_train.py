"""Train the BPE tokenizer on the train split and save it to $NANOCHAT_BASE_DIR/tokenizer.

    python -m scripts.tok_train --max_chars=2000000000 --vocab_size=65536
    python -m scripts.tok_train --train_direction=both      # the tokenizer control

One tokenizer serves all three directions (it carries the markers; models reverse token ids).
--train_direction fits the merges to forward text (default), character-reversed text (backward)
or both: the control of docs/DESIGN.md §2, described in docs/EVALUATION.md.
"""

import argparse
import os
import sys
import time

from nanochat.common import UserError, add_flag, run_main
from nanochat.paths import check_writable
from nanochat.dataset import DocumentSource
from nanochat.progress import progress
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_dir


def text_iterator(max_chars, doc_cap, data_dir=None):
    """Train documents, each cut to doc_cap characters, until max_chars characters in total."""
    total = 0
    with progress(total=max_chars, desc="tokenizer input", unit="char") as bar:
        for _, text in DocumentSource("train", data_dir).iter_from():
            text = text[:doc_cap]
            yield text
            total += len(text)
            bar.update(len(text))
            if total >= max_chars:
                return


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer (rustbpe) and save it (tiktoken format)")
    add_flag(parser, "max_chars", type=int, default=2_000_000_000, help="characters of training text to use")
    add_flag(parser, "doc_cap", type=int, default=10_000, help="characters taken from each document at most")
    add_flag(parser, "vocab_size", type=int, default=65536, help="vocabulary size including special tokens")
    add_flag(parser, "train_direction", default="forward",
             help="text the merges are fitted to: forward, backward (characters reversed) or both")
    add_flag(parser, "overwrite", action="store_true", help="replace an existing tokenizer")
    args = parser.parse_args(argv)
    if args.max_chars <= 0 or args.doc_cap <= 0:
        raise UserError("--max_chars and --doc_cap must be positive")
    out = tokenizer_dir()
    if os.path.exists(os.path.join(out, "tokenizer.json")) and not args.overwrite:
        raise UserError(f"a tokenizer already exists in {out}; checkpoints trained with it depend on its ids. "
                        "Pass --overwrite to replace it, or set NANOCHAT_BASE_DIR elsewhere")
    check_writable(out, "the tokenizer directory")  # before minutes of training, not after
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(text_iterator(args.max_chars, args.doc_cap), args.vocab_size,
                                              train_direction=args.train_direction)
    train_s = time.time() - t0
    tokenizer.save(out)
    sample = "def add(a, b):\n    return a + b  # héllo wörld 123\n"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample, "the tokenizer does not round-trip text"
    lengths = tokenizer.token_byte_lengths()
    print(f"trained a {tokenizer.get_vocab_size()}-token vocabulary on {args.train_direction} text in {train_s:.1f}s; "
          f"saved to {out}")
    print(f"special tokens: {len(SPECIAL_TOKENS)} (bos={tokenizer.get_bos_token_id()}, "
          f"forward={tokenizer.get_forward_token_id()}, backward={tokenizer.get_backward_token_id()}); "
          f"mean token length {lengths[lengths > 0].mean():.2f} bytes")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
