#!/bin/bash
# One prepared run for a lent GPU (the device tool): the divergence-check benchmark and a
# timed `vbd train`, results under $OUT. From the repository root:
#   pip install torch==2.13.0 -e . ; OUT=/tmp/out bash benchmarks/gpu_session.sh
set -euo pipefail
out=${OUT:?set OUT to the folder that comes back}
data=${VBD_DATA_DIR:-shared/datasets}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.csv" || true
python benchmarks/bench_checks.py --data-dir "$data" --device cuda --repeats 3 --out "$out"
python -m vbdropout train --model lenet300_100 --method vbd --dataset mnist --data-dir "$data" \
    --device cuda --epochs 5 --out "$out/run-lenet300-vbd" --json > "$out/train-lenet300-vbd.json"
python - "$out/run-lenet300-vbd/metrics.jsonl" > "$out/epoch-seconds.txt" <<'PY'
import json, sys
print([round(json.loads(line)["seconds"], 3) for line in open(sys.argv[1])])
PY
