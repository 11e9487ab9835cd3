#!/usr/bin/env bash
# recipe: gsm8k
# application: question answering with arithmetic reasoning (GSM8K)
# method: supervised fine-tuning with LoRA (rank 16 on qkv, proj, fc), merged afterwards;
#   the training rows are worded exactly as `gptkit eval` asks (gptkit sft-data)
# model: SmolLM2-135M-Instruct (the PyPI GGUF; `make models`), its chat template
# data: gsm8k/train.jsonl (train), gsm8k/test.jsonl (score: the first 50 problems)
# subset: 80 steps x 4 = 320 of the 7,473 training problems (calculator annotations dropped)
# expected: exact match above the base model's on the same 50 problems
# measured: exact match 0.08 -> 0.06 (not above the base yet; see the README)
# hardware: 2 CPU cores, no GPU
# wall time: 17 min measured
set -euo pipefail
DATA=${GPTKIT_SHARED_DATA:-../shared/data}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-runs/recipes/gsm8k}
GPTKIT=${GPTKIT:-.venv/bin/gptkit}

mkdir -p $OUT
$GPTKIT eval --model $MODEL --task gsm8k --limit 50 --batch-size 10 --report $OUT/base.json
$GPTKIT sft-data --task gsm8k --data $DATA/gsm8k/train.jsonl --limit 500 --out $OUT/train.jsonl
$GPTKIT finetune sft --init-from $MODEL --data $OUT/train.jsonl --out $OUT/run --lora-rank 16 \
  --lora-alpha 32 --lr 2e-4 --max-steps 80 --batch-size 4 --warmup-steps 5 --eval-every 0 \
  --save-every 0 --merge
$GPTKIT eval --model $OUT/run/merged --task gsm8k --limit 50 --batch-size 10 --report $OUT/tuned.json
