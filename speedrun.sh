#!/usr/bin/env bash
# GPU pipeline (one node of 8 GPUs by default): FineWeb-Edu shards -> tokenizer -> forward,
# backward and bidirectional d20 base models on identical data -> mid -> SFT -> RL each, on real
# conversation and task data when the Hugging Face Hub is reachable -> bpb matrix -> report.
#   NPROC=8 DEPTH=20 bash speedrun.sh
#
# Chat data (TASKS=auto|online|offline, default auto):
#   online   mid-training and SFT on SmolTalk + ARC (easy, challenge) + GSM8K through `datasets`;
#            RL on GSM8K for the forward model (its reward reads the answer, which a forward model
#            writes), and on the two-way arithmetic task for backward and bidirectional models
#            (its reward also exists backward: docs/DESIGN.md §6).
#   offline  the built-in synthetic mixture (arithmetic + reversal facts) for every phase.
#   auto     online if a GSM8K split can be loaded now, else offline, with a message saying so.
#   MID_TASKS / SFT_TASKS override the online mixtures (task names from tasks/registry.py).
#
# Several nodes: run the same command on every node with
#   NNODES=2 NODE_RANK=<0..NNODES-1> RDZV_ENDPOINT=<host of node 0>:29500 bash speedrun.sh
# These become torchrun's --nnodes, --node_rank and --rdzv_endpoint (the orchestrator passes them
# to every phase it launches). Node 0 prepares data and the tokenizer; other nodes need the same
# $NANOCHAT_BASE_DIR contents (a shared filesystem, or copy base_data/ and tokenizer/ first).
set -euo pipefail
cd "$(dirname "$0")"
NPROC=${NPROC:-8}
DEPTH=${DEPTH:-20}
SHARDS=${SHARDS:-240}
TAG=${TAG:-speedrun}
TASKS=${TASKS:-auto}
MID_TASKS=${MID_TASKS:-smoltalk,arc_easy,arc_challenge,gsm8k}
SFT_TASKS=${SFT_TASKS:-smoltalk,arc_easy,arc_challenge,gsm8k}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
export OMP_NUM_THREADS=1
export WANDB_MODE=${WANDB_MODE:-offline}   # `wandb sync` uploads later; set online to stream
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}

bash scripts/setup_env.sh web   # the chat page the run ends by pointing to
PY=.venv/bin/python

# ---- multi-node flags for the orchestrator --------------------------------------------------
NODE_FLAGS=()
if [ "$NNODES" -gt 1 ]; then
    if [ -z "$RDZV_ENDPOINT" ]; then
        echo "error: NNODES=$NNODES needs RDZV_ENDPOINT=<host of node 0>:<port> (the same on every node)" >&2
        exit 2
    fi
    if ! $PY -m scripts.run_backward_experiment --help | grep -q -- "--nnodes"; then
        echo "error: this version of scripts.run_backward_experiment does not pass --nnodes/--node_rank/--rdzv_endpoint" \
             "to torchrun; run on one node (NNODES=1)" >&2
        exit 2
    fi
    NODE_FLAGS=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --rdzv_endpoint="$RDZV_ENDPOINT")
fi

# ---- pretraining data and tokenizer (node 0) ---------------------------------------------------
if [ "$NODE_RANK" = 0 ]; then
    # Download in the background while the tokenizer trains on the first shards.
    $PY -m nanochat.dataset -n 8
    $PY -m nanochat.dataset -n "$SHARDS" &
    DOWNLOAD_PID=$!
    if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.json" ]; then
        $PY -m scripts.tok_train --max_chars=2000000000 --vocab_size=65536
    fi
    $PY -m scripts.tok_eval
    wait $DOWNLOAD_PID
fi

# ---- chat data: online task mixtures, or the offline synthetic one -----------------------------
case "$TASKS" in
    online) ONLINE=1 ;;
    offline) ONLINE=0 ;;
    auto)
        if $PY -c "from tasks.registry import get_task; get_task('gsm8k', 'test')" >/dev/null 2>/tmp/speedrun_hub_check.$$; then
            ONLINE=1
        else
            ONLINE=0
            echo "note: the Hugging Face Hub is not reachable ($(tail -n 1 /tmp/speedrun_hub_check.$$));" \
                 "the chat phases use the offline synthetic mixture (TASKS=online to insist)"
        fi
        rm -f /tmp/speedrun_hub_check.$$ ;;
    *) echo "error: TASKS=$TASKS: use auto, online or offline" >&2; exit 2 ;;
esac

for DIRECTION in forward backward bidirectional; do
    CHAT_FLAGS=()
    if [ "$ONLINE" = 1 ]; then
        # GSM8K's reward exists only forward; backward and bidirectional RL use the two-way task.
        RL_TASK=arithmetic
        [ "$DIRECTION" = forward ] && RL_TASK=gsm8k
        CHAT_FLAGS=(--mid.tasks="$MID_TASKS" --sft.tasks="$SFT_TASKS" --rl.task="$RL_TASK")
    fi
    $PY -m scripts.run_backward_experiment --phase=base,mid,sft,rl --direction=$DIRECTION --depth=$DEPTH \
        --experiment_id=${TAG}_d${DEPTH}_${DIRECTION} --nproc_per_node=$NPROC "${NODE_FLAGS[@]}" \
        --device_batch_size=32 --eval_directions=forward,backward --run=${TAG}_d${DEPTH}_${DIRECTION} \
        "${CHAT_FLAGS[@]}"
done
if [ "$NODE_RANK" = 0 ]; then
    $PY -m scripts.report --experiments=${TAG}_d${DEPTH}_forward,${TAG}_d${DEPTH}_backward,${TAG}_d${DEPTH}_bidirectional \
        --title="speedrun d${DEPTH}"
    echo "talk to the models: $PY -m scripts.chat_web --source=rl --model_tag=${TAG}_d${DEPTH}_forward_rl,${TAG}_d${DEPTH}_backward_rl"
fi
