"""Export a checkpoint to a Hugging Face folder (Qwen3ForCausalLM + tokenizer + model card).

    python -m scripts.export_hf --source=sft --model_tag=d20_bwd --out=exports/d20_bwd
    python -m scripts.export_hf --source=base --model_tag=d4_bidi --out=/tmp/d4_bidi --dtype=bfloat16

What is exported and why it is exact: nanochat/hf_export.py and docs/QUICKSTART.md, "Export".
"""

import argparse
import os
import sys

from nanochat.checkpoint_manager import load_model
from nanochat.common import UserError, add_flag, print0, run_main
from nanochat.hf_export import EXPORT_DTYPES, check_export, export


def build_parser():
    p = argparse.ArgumentParser(description="Export a checkpoint to a Hugging Face transformers folder")
    add_flag(p, "source", default="sft", help="checkpoint source: base | mid | sft | rl")
    add_flag(p, "model_tag", default=None, help="tag or experiment id (default: newest)")
    add_flag(p, "step", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(p, "out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    add_flag(p, "dtype", default="float32", help=f"weights dtype: {', '.join(EXPORT_DTYPES)}")
    add_flag(p, "overwrite", action="store_true", help="write into a non-empty --out")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = os.path.abspath(args.out)
    check_export(out, args.dtype, args.overwrite)  # before the model loads
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise UserError("the export needs safetensors: pip install -e '.[hf]'")
    model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag, step=args.step)
    files = export(model, tokenizer, meta, out, dtype=args.dtype, overwrite=args.overwrite)
    print0(f"exported the {meta['direction']} {args.source} model '{meta['model_tag']}' (step {meta['step']}) to {out}:")
    print0("  " + ", ".join(files))
    print0("load it with transformers.AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained; "
           "README.md there says how to prompt it")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
