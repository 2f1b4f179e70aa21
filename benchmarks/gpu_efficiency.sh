#!/usr/bin/env bash
# The efficiency stack on one NVIDIA GPU (written for an H200): a ViT trained in plain fp32 with eager
# attention vs bf16 + SDPA + torch.compile (forced through greenstack's policies), plus the default stack
# in auto mode with compile enabled. Energy from NVML's cumulative counter (measured), steady state after
# compilation. Target: >= 2.5x samples per joule for bf16+SDPA+compile over fp32.
#
#   bash benchmarks/gpu_efficiency.sh                      # vit_base_patch16_224, batch 128, 60 steps
#   MODEL=vit_large_patch16_224 BATCH=64 STEPS=80 bash benchmarks/gpu_efficiency.sh
#
# Prints the per-contender lines, each policy's one-line decision, and a final `BENCH {json}` line;
# exits 1 when the target is missed, 2 when there is no usable GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
MODEL="${MODEL:-vit_base_patch16_224}"
BATCH="${BATCH:-128}"
STEPS="${STEPS:-60}"
WARMUP="${WARMUP:-15}"
TARGET="${TARGET:-2.5}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no NVIDIA GPU visible (nvidia-smi failed)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total --format=csv,noheader
"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
PY

export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/greenstack-inductor}"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LOG="$(mktemp)"
"$PYTHON" -m benchmarks.efficiency --gpu --gpu-model "$MODEL" --gpu-batch "$BATCH" --steps "$STEPS" \
  --gpu-warmup "$WARMUP" 2>&1 | tee "$LOG"

BENCH_LINE="$(grep '^BENCH ' "$LOG" | tail -1)"
rm -f "$LOG"
"$PYTHON" - "$BENCH_LINE" "$TARGET" <<'PY'
import json, sys
bench, target = json.loads(sys.argv[1][len("BENCH "):]), float(sys.argv[2])
ratio = bench["samples_per_j_ratio"]
print(f"{'PASS' if ratio >= target else 'FAIL'}: bf16+SDPA+compile = {ratio:.2f}x samples/J of fp32 "
      f"on {bench['gpu']} ({bench['model']}); target >= {target}")
sys.exit(0 if ratio >= target else 1)
PY
