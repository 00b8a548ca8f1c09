#!/usr/bin/env bash
# Issue 23, lever 1 — the A/B of the basis refresh on one GPU (H100 or H200), in one device call of about 7 minutes.
#
# From the repository root, with the test wheels carried (.whl: attrs, hypothesis, pytest, …) and OUT set:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site && bash precond/bench/refine_ab.sh
#
# Stages, in order of what the lever needs most; each runs under `timeout`, and one is skipped when less than half of
# what it asks is left of BUDGET (default 450 s):
#   1. gpu_tests: `pytest -m gpu tests/test_refine.py` — Refine on CUDA (TF32, bfloat16, float32) against the CPU
#      float64 reference, within the bounds stated in tests/test_refine.py.
#   2. step_2048 / step_4096: `step()` time, GPT-2-small shapes, T = 10, fused AdamW in the same process; the fast
#      captured configuration (stagger, TF32, async refresh, captured step) with each refresher: Cholesky-QR2
#      (today's `kl_shampoo_fast_captured`), QRPowerStep, Refine (2 sweeps, TF32), Refine (1 sweep), Refine (bf16).
#   3. quality: `python -m precond.bench.refine_quality` — KL factors captured from a GPT-2-small run on text, then
#      orthogonality and off-diagonal energy after 1 … 20 refreshes of every refresher (eigh as the reference), and
#      the time of one refresh per factor size (batch 1 and 12).
#   4. train_4096: GPT-2-small training tokens/s at max dim 4096, T = 10, AdamW in the same process, if time is left.
#
# What comes back ($OUT, at most 8 files): refine_ab.log (every stage's output), step_2048.json, step_4096.json,
# quality.json, train_4096.json.
set -uo pipefail
OUT=${OUT:-refine_ab_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/refine_ab.log"
BUDGET=${BUDGET:-450}
START=$(date +%s)

elapsed() { echo $(( $(date +%s) - START )); }

stage() {  # name, seconds it asks, command...
  local name=$1 want=$2
  shift 2
  local left=$(( BUDGET - $(elapsed) ))
  if (( left < want / 2 )); then
    echo "== skip $name: ${left}s of the budget left, it asks ${want}s" | tee -a "$LOG"
    return
  fi
  local limit=$(( want < left ? want : left ))
  echo "== $name (limit ${limit}s, at $(elapsed)s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name rc=${PIPESTATUS[0]} at $(elapsed)s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
  git log -1 --format='commit %H' 2>/dev/null; git status --short 2>/dev/null | head -20; } 2>&1 | tee -a "$LOG"

BASES=kl_shampoo_fast_captured,kl_shampoo_qr_fast_captured,kl_shampoo_refine_fast_captured
BASES=$BASES,kl_shampoo_refine1_fast_captured,kl_shampoo_refine_bf16_fast_captured
stage gpu_tests 60 python3 -m pytest -q -m gpu tests/test_refine.py
stage step_2048 100 python3 -m precond.bench --max-dim 2048 --every 10 --optimizers "adamw,$BASES" \
  --json "$OUT/step_2048.json"
stage step_4096 120 python3 -m precond.bench --max-dim 4096 --every 10 --optimizers "adamw,$BASES" \
  --json "$OUT/step_4096.json"
stage quality 120 python3 -m precond.bench.refine_quality --optimizer kl_shampoo_fast --max-dim 4096 --every 10 \
  --warmup 50 --refreshes 20 --budget 45 --json "$OUT/quality.json"
stage train_4096 100 python3 -m precond.bench --train --max-dim 4096 --every 10 \
  --optimizers adamw,kl_shampoo_fast,kl_shampoo_qr_fast,kl_shampoo_refine_fast,kl_shampoo_refine1_fast \
  --json "$OUT/train_4096.json"
echo "== done at $(elapsed)s" | tee -a "$LOG"
