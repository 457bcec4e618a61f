#!/usr/bin/env bash
# ONE prepared GPU check, for a session that is lent a GPU machine (under 8 minutes of device time).
# The GPU image has torch/transformers/peft/accelerate but not trl, datasets, bitsandbytes, ray or deepspeed:
# carry their wheels in .whl/ (git-ignored), as the device notes explain, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 nvidia-ml-py (+ their missing deps: multiprocess,
#     xxhash, dill, ...)
# then run:  bash bench/gpu_check.sh   (writes its figures to $OUT or ./gpu_check_out)
#
# What it shows, on a random-init model with the real Qwen2-0.5B-Instruct architecture (bench/qwen2_0.5b_config.json):
#   1. tunefleet QLoRA SFT and DPO vs a plain TRL script with TRL's defaults: tokens/s, peak GPU memory, ratio;
#   2. whether 4-bit layers were really used (run.json qlora_4bit_layers) and the fast-path choices;
#   3. the ZeRO-3 + QLoRA path (one process, deepspeed carried) loads and trains a few steps;
#   4. packing: 4 QLoRA runs on one GPU at once (gpus_per_run: auto) vs one after another, as a throughput ratio,
#      and the memory estimate against torch.cuda.max_memory_allocated of each run;
#   5. full fine-tuning on the GPU (bf16), plain and through ZeRO-3 (one process, deepspeed carried), from a recipe in
#      TRL's form (no use_peft: the whole model trains): status, peak memory, the saved model's dtype, and run.json's
#      cost (GPU-seconds, tokens/s, and the energy NVML measured: absent where nvidia-ml-py was not carried).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
# tunefleet itself: the `tunefleet` namespace maps this checkout's folders (pyproject.toml), so install it.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . \
  || { echo "tunefleet install failed"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, trl, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)" \
  | tee -a "$out/gpu.txt"

echo "== 1-2. tunefleet vs plain TRL, QLoRA, Qwen2-0.5B architecture (random init)"
timeout 240 python3 bench/train_throughput.py --models --qwen05b --qlora --methods sft dpo --samples 192 --batch 8 \
  --json "$out/train_throughput_gpu.json" 2>&1 | grep -vE "Warning|warn\(" | tee "$out/train_throughput_gpu.txt"

echo "== 3. ZeRO-3 + QLoRA (one process)"
if python3 -c "import deepspeed" 2>/dev/null; then
  timeout 150 python3 -m tunefleet.launcher.cli train --method sft --model_name tunefleet/tiny-qwen2 \
    --dataset tunefleet/tiny-ultrafeedback --split train_sft --output_dir /tmp/zero3-qlora --max_steps 4 \
    --accelerate_config zero3 --use_qlora true --overwrite 2>&1 | tail -5 | tee "$out/zero3_qlora.txt"
  python3 -c "import json; r=json.load(open('/tmp/zero3-qlora/run.json')); print({k: r.get(k) for k in \
('status', 'distributed_type', 'qlora_4bit_layers', 'peak_gpu_mb', 'launch')})" | tee -a "$out/zero3_qlora.txt"
else
  echo "deepspeed not carried: ZeRO-3 step skipped" | tee "$out/zero3_qlora.txt"
fi

echo "== 4. packing: 4 QLoRA runs on one GPU at once vs one after another; memory estimate vs measured"
timeout 200 python3 bench/gpu_packing.py --runs 4 --steps 10 --json "$out/packing_gpu.json" 2>&1 \
  | grep -vE "Warning|warn\(" | tail -6 | tee "$out/packing_gpu.txt"

echo "== 5. full fine-tuning from a recipe in TRL's form (bf16), plain and ZeRO-3"
cat > /tmp/full_recipe.yaml <<'YAML'
model_name_or_path: tunefleet/tiny-qwen2
dataset_name: tunefleet/tiny-ultrafeedback
dataset_train_split: train_sft
torch_dtype: bfloat16
bf16: true
learning_rate: 1.0e-3
lr_scheduler_type: cosine
warmup_ratio: 0.1
max_steps: 20
per_device_train_batch_size: 8
logging_steps: 5
YAML
for config in auto zero3; do
  if [ "$config" = zero3 ] && ! python3 -c "import deepspeed" 2>/dev/null; then
    echo "deepspeed not carried: ZeRO-3 full step skipped" | tee -a "$out/full_finetune.txt"; continue
  fi
  timeout 150 python3 -m tunefleet.launcher.cli train --method sft --config /tmp/full_recipe.yaml \
    --output_dir "/tmp/full-$config" --accelerate_config "$config" --overwrite 2>&1 | tail -3 | tee -a "$out/full_finetune.txt"
  python3 -c "import json, sys; r=json.load(open(sys.argv[1] + '/run.json')); print(sys.argv[2], {k: r.get(k) for k in \
('status', 'distributed_type', 'peak_gpu_mb', 'train_runtime_s', 'launch', 'cost')}, r['config']['finetune'])" "/tmp/full-$config" "$config" \
    | tee -a "$out/full_finetune.txt"
done
