#!/bin/bash
# The prepared script for a lent GPU (the `device` tool: no network there, torch
# preinstalled, only the repository travels). Before the call, here:
#     mkdir -p results/gpu-data && cp -r ../shared/datasets/mnist results/gpu-data/
# then run `bash benchmarks/gpu_session.sh` there with carry ["results/gpu-data"].
# Brings back 10 files in $OUT: the GPU's name, the check-mode benchmark (json, md), the
# host syncs of one checks="epoch" epoch, a 5-epoch `vbd train` summary and its metrics,
# the replica step benchmark at K = 1 and 16 (json, md) and a 3-epoch `vbd train
# --replicas 16` summary and one replica's metrics (epoch seconds: the issue's targets).
set -euo pipefail
out=${OUT:?set OUT to the folder that comes back}
export PYTHONPATH=src VBD_DATA_DIR=${VBD_DATA_DIR:-results/gpu-data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
python3 benchmarks/bench_checks.py --data-dir "$VBD_DATA_DIR" --device cuda --repeats 3 \
    --out "$out"
python3 - > "$out/sync-debug.txt" 2>&1 <<'PY'
# one checks="epoch" epoch of LeNet-300-100 VBD with torch's sync debugging: each
# synchronizing call is a warning (the contract: a fixed few per epoch, none per step)
import warnings
import torch
from vbdropout.data import load_dataset
from vbdropout.models import build_model
from vbdropout.train.loop import make_adam, train_epoch
data = load_dataset("mnist")
x, y = data.train_x.cuda(), data.train_y.cuda()
model = build_model("lenet300_100", "vbd").cuda()
optimizer = make_adam(model.parameters(), 1e-3)
train_epoch(model, optimizer, x, y, batch_size=100, kl_weight=1.0, checks="epoch")  # warm-up
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    stats = train_epoch(model, optimizer, x, y, batch_size=100, kl_weight=1.0, checks="epoch")
torch.cuda.set_sync_debug_mode("default")
print(f"{len(caught)} synchronizing calls in one epoch of 600 steps; {stats}")
for message in sorted({str(w.message).splitlines()[0] for w in caught}):
    print(message)
PY
python3 -m vbdropout train --model lenet300_100 --method vbd --dataset mnist --device cuda \
    --epochs 5 --out /tmp/gpu-run --json > "$out/train-lenet300-vbd.json"
cp /tmp/gpu-run/metrics.jsonl "$out/train-lenet300-vbd-metrics.jsonl"
python3 benchmarks/bench_replicas.py --device cuda --replicas 1 16 --skip-seeds --rounds 3 \
    --out "$out"
python3 -m vbdropout train --model lenet300_100 --method vbd --dataset mnist --device cuda \
    --epochs 3 --replicas 16 --out /tmp/gpu-replicas --json > "$out/train-replicas16.json"
cp /tmp/gpu-replicas/seed0/metrics.jsonl "$out/train-replicas16-metrics.jsonl"
