#!/usr/bin/env bash
# The GPU check: every chapter's benchmark at the teaching size on CUDA, each writing its JSON, plus the
# tests that compare CUDA with CPU. A few minutes on one GPU.
#
#   OUT=runs/gpu bash tools/gpu_check.sh
#
# torch is pinned to 2.13.0; on a GPU machine install its CUDA build first, e.g.
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export RECBOOK_DEVICE=${RECBOOK_DEVICE:-cuda} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
python - <<'PY'
import torch
assert torch.cuda.is_available(), "tools/gpu_check.sh needs a CUDA device and a CUDA build of torch"
print("GPU:", torch.cuda.get_device_name(), "| bf16:", torch.cuda.is_bf16_supported())
PY
recbook env | tee "$OUT/env.json"
recbook setup wordnet
for name in $(python -c "from recbook.cli import BENCHMARKS; print(' '.join(BENCHMARKS))"); do
  start=$(date +%s)
  recbook bench "$name" --quick --out "$OUT" > "$OUT/$name.log" 2>&1 && status=ok || status=FAILED
  echo "$name: $status in $(( $(date +%s) - start )) s (log: $OUT/$name.log)"
done
python -m pytest tests -q -p no:cacheprovider -k "cuda or gpu" 2>&1 | tail -3
