#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for a lent device machine; see benchmarks/README.md):
#   1. benchmarks/gpu_check.py: B1-B3 at Qwen2.5-1.5B shapes, no-sync check, GPU correctness;
#   2. world-size-1 NCCL smoke runs of `molf train` under DDP and FSDP2, each with a
#      sharded checkpoint and a resume that must reproduce the uninterrupted run.
# Needs: the model directory in $MOLF_SMOKE_MODEL (default .devdata/stories260k) and, where
# the machine lacks them, wheels in .whl/ (e.g. sqlglot). Results go to $OUT (else /tmp/molf-out).
set -u
OUT="${OUT:-/tmp/molf-out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
MODEL="${MOLF_SMOKE_MODEL:-.devdata/stories260k}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

echo "== NCCL smoke runs =="
for mode in ddp fsdp2; do
  run=/tmp/smoke-$mode
  rm -rf "$run"
  args=(--model "$MODEL" --data builtin --parallel "$mode" --max-steps 4 --batch-size 4
        --lora-ranks 4,8 --lora-alphas 8,8 --lr 3e-3 --save-steps 2 --check-routing
        --max-eval-samples 4 --max-new-tokens 2 --no-eval-before)
  timeout 180 python3 -m torch.distributed.run --nproc-per-node 1 -m molf train \
    --output-dir "$run" "${args[@]}" > "$OUT/smoke-$mode.log" 2>&1
  echo "$mode run: exit $?"
  cp "$run/final/model.safetensors" "/tmp/expected-$mode.safetensors" 2>/dev/null
  rm -rf "$run/checkpoint-4" "$run/final"
  timeout 180 python3 -m torch.distributed.run --nproc-per-node 1 -m molf train \
    --output-dir "$run" --resume "${args[@]}" >> "$OUT/smoke-$mode.log" 2>&1
  echo "$mode resume: exit $?"
  python3 - "$mode" <<'PY' | tee -a "$OUT/smoke-$mode.log"
import sys, torch
from safetensors.torch import load_file
mode = sys.argv[1]
a = load_file(f"/tmp/expected-{mode}.safetensors")
b = load_file(f"/tmp/smoke-{mode}/final/model.safetensors")
worst = max(float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)) for k in a)
print(f"{mode}: resumed vs uninterrupted final weights, worst relative difference {worst:.2e}")
PY
  grep -E "\[molf\]|Error|error" "$OUT/smoke-$mode.log" | tail -8
done

echo "== gpu_check.py =="
timeout 420 python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log" | tail -60
