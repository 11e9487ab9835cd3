#!/usr/bin/env bash
# recipe: humaneval
# application: code generation (HumanEval, evaluation only; training on TheAlgorithms/Python)
# method: supervised fine-tuning with LoRA (rank 16 on qkv, proj, fc), merged afterwards, on
#   HumanEval-style rows (imports + signature + docstring -> body) cut from real Python files
#   (gptkit sft-data --task python); plain continuation, no chat template
# model: SmolLM2-135M-Instruct (the PyPI GGUF; `make models`)
# data: thealgorithms_python/python_files_part1.jsonl (train), humaneval (score: the first 40
#   problems, running each program against the problem's tests)
# subset: 50 steps x 4 = 200 of the 964 documented functions of part 1
# expected: pass@1 above the base model's on the same 40 problems
# measured: pass@1 0/40 -> 6/40
# hardware: 2 CPU cores, no GPU
# wall time: 10 min measured
# warning: runs model-written code (--execute); use a sandbox
set -euo pipefail
DATA=${GPTKIT_DATA:-../shared/data}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-runs/recipes/humaneval}
GPTKIT=${GPTKIT:-.venv/bin/gptkit}

mkdir -p $OUT
$GPTKIT eval --model $MODEL --task humaneval --execute --no-chat --limit 40 --batch-size 8 \
  --report $OUT/base.json
$GPTKIT sft-data --task python --data $DATA/thealgorithms_python/python_files_part1.jsonl \
  --out $OUT/train.jsonl
$GPTKIT finetune sft --init-from $MODEL --data $OUT/train.jsonl --no-chat --out $OUT/run \
  --lora-rank 16 --lora-alpha 32 --lr 1e-3 --max-steps 50 --batch-size 4 --warmup-steps 5 \
  --eval-every 0 --save-every 0 --merge
$GPTKIT eval --model $OUT/run/merged --task humaneval --execute --no-chat --limit 40 \
  --batch-size 8 --report $OUT/tuned.json
