#!/usr/bin/env bash
# The GPU throughput table of issue 10: depth 12 and 20, every direction, B=32, T=2048, vocab 32,768,
# with the real loader (built-in corpus) behind the prefetcher. One command, sized for one device call.
#
#   bash scripts/gpu_bench.sh --prepare   # on the development machine: shards + tokenizer (~14 MB) in
#                                         # out/gpu_bench_base (out/ is git-ignored), built with .venv
#   bash scripts/gpu_bench.sh             # on the GPU machine, carrying out/gpu_bench_base; results in $OUT
#
# With the device tool: run(command="bash scripts/gpu_bench.sh", carry=["out/gpu_bench_base"], timeout_s=600).
# The tokenizer is trained here (rustbpe is not installed on the device); the device only needs torch,
# tiktoken and pyarrow. Shards are built here too, so both machines benchmark the same corpus (the built-in
# corpus is this Python's standard library, which differs between Python versions).
#
# Files written to $OUT (default out/gpu_bench): env.txt, d12.txt/.json, d20.txt/.json, and
# d20_plain_loss.txt/.json (forward only, --chunked_loss=0: the plain-logits loss for comparison; it may
# run out of memory, which is itself the measurement). Each part has its own time limit, so a slow part
# costs only its own rows; progress lines appear as they come.
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$REPO/out/gpu_bench_base}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$REPO/out/gpu_bench}"
mkdir -p "$OUT" "$NANOCHAT_BASE_DIR"
if [ -x "$REPO/.venv/bin/python" ]; then PY="${PYTHON:-$REPO/.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi

prepare() {
    if ! ls "$NANOCHAT_BASE_DIR"/base_data/shard_*.parquet >/dev/null 2>&1; then
        "$PY" -m nanochat.dataset --builtin || return 1
    fi
    if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.json" ]; then
        "$PY" -m scripts.tok_train --vocab_size=32768 || {
            echo "error: no tokenizer in $NANOCHAT_BASE_DIR/tokenizer and it cannot be trained here;" \
                 "run 'bash scripts/gpu_bench.sh --prepare' on the development machine and carry out/gpu_bench_base" >&2
            return 1
        }
    fi
}

if [ "${1:-}" = "--prepare" ]; then
    prepare && du -sh "$NANOCHAT_BASE_DIR" && exit 0
    exit 1
fi
prepare || exit 1

{
    date -u
    nvidia-smi 2>&1 | head -20
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

COMMON=(--device_batch_size=32 --max_seq_len=2048 --steps=8 --split_steps=3 --warmup_steps=3
        --loader_batches=10 --compile=1 --prefetch=2)
D12=12 D20=20
if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then  # check this script's plumbing on a CPU: tiny shapes, same parts
    COMMON=(--device_batch_size=2 --max_seq_len=64 --steps=1 --split_steps=1 --warmup_steps=1
            --loader_batches=1 --compile=0 --prefetch=2 --device_type=cpu --tokenizer_threads=1)
    D12=1 D20=2
fi
bench() {  # name, time limit (s), flags...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$PY" -m scripts.bench_direction "${COMMON[@]}" "$@" --out="$OUT/$name.json" 2>&1 \
        | tee "$OUT/$name.txt" | grep -v -i warning
    echo "== $name exit ${PIPESTATUS[0]}"
}
bench d12 220 --depth=$D12
bench d20 260 --depth=$D20
bench d20_plain_loss 100 --depth=$D20 --directions=forward --chunked_loss=0 --loader_batches=0
