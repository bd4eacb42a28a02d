#!/usr/bin/env bash
# End-to-end verl run with an sveb advantage estimator, on one machine with GPUs (one is enough):
#
#     bash examples/verl_gsm8k.sh [sveb_numca|sveb_gae|gae] [model]
#
# Installs sveb_kernels[verl] (from this checkout) and verl's vLLM stack, writes GSM8K in verl's
# dataset format to $DATA (default ~/data/gsm8k), and trains for $STEPS (default 20) steps with
# verl's default (v1) trainer, printing the metrics to the console. Defaults: sveb_numca,
# Qwen/Qwen2.5-0.5B-Instruct. `gae` runs verl's own GAE for comparison with `sveb_gae`.
set -euo pipefail
ESTIMATOR="${1:-sveb_numca}"
MODEL="${2:-Qwen/Qwen2.5-0.5B-Instruct}"
DATA="${DATA:-$HOME/data/gsm8k}"
STEPS="${STEPS:-20}"
GPUS="${GPUS:-$(nvidia-smi -L | wc -l)}"
cd "$(dirname "$0")/.."

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    pip install "verl[vllm]>=0.9,<0.10" && pip install -e ".[verl]"
fi

mkdir -p "$DATA"
python3 - "$DATA" <<'PY'
import re, sys
import datasets

out = sys.argv[1]
instruction = 'Let\'s think step by step and output the final answer after "####".'
for split in ("train", "test"):
    rows = datasets.load_dataset("openai/gsm8k", "main", split=split)

    def convert(row, index, split=split):
        answer = re.search(r"#### (\-?[0-9\.\,]+)", row["answer"]).group(1).replace(",", "")
        return {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": row["question"] + " " + instruction}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": split, "index": index},
        }

    rows.map(convert, with_indices=True, remove_columns=rows.column_names).to_parquet(f"{out}/{split}.parquet")
PY

# Per-estimator lines: sveb_gae (like verl's gae) needs the critic; Numca reads the actor's tokenizer.
case "$ESTIMATOR" in
    sveb_gae|gae) EXTRA=(critic.enable=True "critic.model.path=$MODEL" critic.optim.lr=1e-5
                         critic.ppo_micro_batch_size_per_gpu=8) ;;
    sveb_numca)   EXTRA=('+algorithm.sveb.tokenizer=${actor_rollout_ref.model.path}') ;;
    *) echo "estimator must be sveb_numca, sveb_gae or gae" >&2; exit 2 ;;
esac

# BEGIN verl overrides (tests/test_integration_verl.py composes these with verl's config)
python3 -m verl.trainer.main_ppo \
    "data.train_files=$DATA/train.parquet" "data.val_files=$DATA/test.parquet" \
    data.train_batch_size=64 data.max_prompt_length=512 data.max_response_length=512 \
    "actor_rollout_ref.model.path=$MODEL" \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
    "algorithm.adv_estimator=$ESTIMATOR" \
    "${EXTRA[@]}" \
    trainer.logger=console trainer.val_before_train=False \
    trainer.test_freq=-1 trainer.save_freq=-1 \
    "trainer.n_gpus_per_node=$GPUS" trainer.nnodes=1 \
    "trainer.total_training_steps=$STEPS"
# END verl overrides
