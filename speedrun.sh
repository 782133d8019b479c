#!/usr/bin/env bash
# GPU pipeline (one node, 8 GPUs by default): FineWeb-Edu shards -> tokenizer -> forward,
# backward and bidirectional d20 base models on identical data (-> mid -> SFT -> RL each)
# -> bpb matrix -> report.
#   NPROC=8 DEPTH=20 bash speedrun.sh
set -euo pipefail
cd "$(dirname "$0")"
NPROC=${NPROC:-8}
DEPTH=${DEPTH:-20}
SHARDS=${SHARDS:-240}
TAG=${TAG:-speedrun}
export OMP_NUM_THREADS=1
export WANDB_MODE=${WANDB_MODE:-offline}   # `wandb sync` uploads later; set online to stream
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}

bash scripts/setup_env.sh
PY=.venv/bin/python

# Data: download in the background while the tokenizer trains on the first shards.
$PY -m nanochat.dataset -n 8
$PY -m nanochat.dataset -n "$SHARDS" &
DOWNLOAD_PID=$!
if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.json" ]; then
    $PY -m scripts.tok_train --max_chars=2000000000 --vocab_size=65536
fi
$PY -m scripts.tok_eval
wait $DOWNLOAD_PID

for DIRECTION in forward backward bidirectional; do
    # base -> mid -> sft -> rl; the chat phases use the offline synthetic task mixture unless
    # --mid.tasks / --sft.tasks name online datasets (smoltalk, gsm8k, ...)
    $PY -m scripts.run_backward_experiment --phase=base,mid,sft,rl --direction=$DIRECTION --depth=$DEPTH \
        --experiment_id=${TAG}_d${DEPTH}_${DIRECTION} --nproc_per_node=$NPROC \
        --device_batch_size=32 --eval_directions=forward,backward --run=${TAG}_d${DEPTH}_${DIRECTION}
done
$PY -m scripts.report --experiments=${TAG}_d${DEPTH}_forward,${TAG}_d${DEPTH}_backward,${TAG}_d${DEPTH}_bidirectional \
    --title="speedrun d${DEPTH}"
