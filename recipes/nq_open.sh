#!/usr/bin/env bash
# recipe: nq_open
# application: open-domain question answering, closed book (Natural Questions open, NQ-Open)
# method: full fine-tuning (bf16 autocast, lr 5e-5 cosine to 5e-6) on question -> first gold
#   answer chats, worded exactly as `gptkit eval` asks (five-shot: the same five hand-written
#   question/answer turns before every question); base = the same model few-shot prompted
# model: SmolLM2-135M-Instruct (the PyPI GGUF; `make models`), its chat template
# data: train: nq_open/NQ-open.efficientqa.dev.1.1.jsonl (1,800) + NQ-open.dev.jsonl after its
#   first 100; score: the first 100 questions of NQ-open.dev.jsonl (disjoint from training)
# subset: 20 steps x 8 = 160 of the 4,949 training questions
# expected: exact match and token F1 above the base model's (SQuAD normalisation, any gold answer)
# measured: exact match 0.00 -> 0.03, token F1 0.042 -> 0.069 on the 100 scored questions (2026-12-07;
#   for scale: GPT-3 175B few-shot 29.9% exact match on NQ-open test, Brown et al. 2020)
# hardware: 2 CPU cores, no GPU
# wall time: 6 min measured on 2 busy cores (one thread)
set -euo pipefail
DATA=${GPTKIT_DATA:-../shared/data}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-runs/recipes/nq_open}
GPTKIT=${GPTKIT:-.venv/bin/gptkit}
PYTHON=${PYTHON:-.venv/bin/python}
# one thread: on 2 cores shared with other jobs two threads ran slower (set 2 on a quiet machine)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p $OUT
rm -rf $OUT/run  # a fresh fine-tune each time the recipe runs
$GPTKIT eval --model $MODEL --task nq_open --data $DATA/nq_open/NQ-open.dev.jsonl --limit 100 \
  --batch-size 20 --report $OUT/base.json
# SFT rows worded as eval asks (to_sft_rows is `gptkit sft-data`'s reader), shuffled with a seed
DATA=$DATA OUT=$OUT $PYTHON - <<'PY'
import json, os, random
from gptkit.eval.tasks import to_sft_rows
nq = os.environ["DATA"] + "/nq_open/"
rows = to_sft_rows("nq_open", nq + "NQ-open.efficientqa.dev.1.1.jsonl")
rows += to_sft_rows("nq_open", nq + "NQ-open.dev.jsonl", skip=100)  # the first 100 are scored
random.Random(0).shuffle(rows)
with open(os.environ["OUT"] + "/train.jsonl", "w") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
print(f"wrote {len(rows)} examples")
PY
$GPTKIT finetune sft --init-from $MODEL --data $OUT/train.jsonl --out $OUT/run --lr 5e-5 \
  --min-lr 5e-6 --max-steps 20 --batch-size 8 --warmup-steps 2 --eval-every 0 --eval-batches 2 \
  --save-every 0 --precision bf16 --no-progress
$GPTKIT eval --model $OUT/run --task nq_open --data $DATA/nq_open/NQ-open.dev.jsonl --limit 100 \
  --batch-size 20 --report $OUT/tuned.json
