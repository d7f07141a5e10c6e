#!/usr/bin/env bash
# GPU check for a CUDA machine, in under 15 minutes: the CUDA-marked tests (bfloat16 and float16 per
# family, two workers on one GPU, --devices placement, onnxruntime's CUDA provider), then the
# serving benchmark and the SAM 2 video benchmark with full-size models on GPU 0, then the SAM 3 video
# benchmark (tiny model) there. Run from anywhere after `bash scripts/install.sh test`;
# output goes to the terminal and to gpu-check-<date>.log (paste its tables into docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOG=${GPU_CHECK_LOG:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ).log}
exec > >(tee "$LOG") 2>&1

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch: nothing to check"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "bf16:", torch.cuda.is_bf16_supported())
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i))
try:
    import onnxruntime
    print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
except ImportError:
    print("onnxruntime not installed")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

echo "== pytest -m cuda"
timeout 300 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/http/test_cuda.py

echo "== bench/serving.py --full --device cuda"
timeout 200 "$PY" bench/serving.py --full --device cuda --rounds 2
echo "== bench/video.py --full --device cuda --http"
timeout 240 "$PY" bench/video.py --full --device cuda --http --frames 24 --live-frames 100
echo "== bench/sam3_video.py --device cuda"
timeout 120 "$PY" bench/sam3_video.py --device cuda --frames 24
echo "gpu check done: $LOG"
