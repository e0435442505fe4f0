#!/bin/bash
# The prepared script for a lent GPU (the `device` tool: no network there, torch
# preinstalled, only the repository travels). Before the call, here:
#     mkdir -p results/gpu-data && cp -r ../shared/datasets/mnist results/gpu-data/
# then run `bash benchmarks/gpu_session.sh` there with carry ["results/gpu-data"].
# Brings back in $OUT: the GPU's name; the compiled vs eager step (single runs of
# LeNet-300-100 and LeNet-5, 16 replicas; json, md); the host syncs of one checks="epoch"
# epoch, eager and compiled; a 5-epoch `vbd train` (compiled: --compile auto) summary and
# its metrics; the check-mode benchmark (json, md); the replica step benchmark at K = 1
# and 16 (json, md); a 3-epoch `vbd train --replicas 16` summary and one replica's
# metrics (epoch seconds: the issue's targets). Each step has its own time limit and a
# failed step does not stop the next; log.txt says which ran.
set -uo pipefail
out=${OUT:?set OUT to the folder that comes back}
export PYTHONPATH=src VBD_DATA_DIR=${VBD_DATA_DIR:-results/gpu-data}
deadline=${DEADLINE:-570}  # seconds for the whole script: a device call may last 600
step() {  # step NAME SECONDS COMMAND...: run within its limit and the deadline, log it
    local name=$1 limit=$2; shift 2
    local start=$SECONDS left=$((deadline - SECONDS))
    if ((left < 30)); then echo "$name: skipped, ${left} s left" >> "$out/log.txt"; return; fi
    timeout "$((limit < left ? limit : left))" "$@"
    echo "$name: exit $? after $((SECONDS - start)) s" >> "$out/log.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
step compile 200 python3 benchmarks/bench_compile.py --data-dir "$VBD_DATA_DIR" --device cuda \
    --repeats 2 --replicas 16 --replica-steps 100 --out "$out"
cat > /tmp/sync_debug.py <<'PY'
# one checks="epoch" epoch of LeNet-300-100 VBD with torch's sync debugging, eager and
# compiled: each synchronizing call is a warning (the contract: a fixed few per epoch,
# none per step)
import warnings
import torch
from vbdropout.data import load_dataset
from vbdropout.models import build_model
from vbdropout.train.compiled import CompiledObjective
from vbdropout.train.loop import BatchObjective, make_adam, train_epoch
data = load_dataset("mnist")
x, y = data.train_x.cuda(), data.train_y.cuda()
for name, make in (("eager", BatchObjective), ("compiled", CompiledObjective)):
    model = build_model("lenet300_100", "vbd").cuda()
    optimizer = make_adam(model.parameters(), 1e-3)
    objective = make(model, x.shape[0], *((x.device,) if name == "compiled" else ()))
    kw = dict(batch_size=100, kl_weight=1.0, checks="epoch", objective=objective)
    train_epoch(model, optimizer, x, y, **kw)  # warm-up (and compilation)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = train_epoch(model, optimizer, x, y, **kw)
    torch.cuda.set_sync_debug_mode("default")
    print(f"{name} ({objective.status}): {len(caught)} synchronizing calls in one epoch "
          f"of 600 steps; {stats}")
    for message in sorted({str(w.message).splitlines()[0] for w in caught}):
        print("   ", message)
PY
step sync-debug 90 bash -c 'python3 /tmp/sync_debug.py > "$0/sync-debug.txt" 2>&1' "$out"
step train 90 bash -c 'python3 -m vbdropout train --model lenet300_100 --method vbd \
    --dataset mnist --device cuda --epochs 5 --out /tmp/gpu-run --json \
    > "$0/train-lenet300-vbd.json" && cp /tmp/gpu-run/metrics.jsonl \
    "$0/train-lenet300-vbd-metrics.jsonl"' "$out"
step replicas 80 python3 benchmarks/bench_replicas.py --device cuda --replicas 1 16 \
    --skip-seeds --rounds 3 --out "$out"
step train-replicas 120 bash -c 'python3 -m vbdropout train --model lenet300_100 \
    --method vbd --dataset mnist --device cuda --epochs 3 --replicas 16 \
    --out /tmp/gpu-replicas --json > "$0/train-replicas16.json" && cp \
    /tmp/gpu-replicas/seed0/metrics.jsonl "$0/train-replicas16-metrics.jsonl"' "$out"
step checks 60 python3 benchmarks/bench_checks.py --data-dir "$VBD_DATA_DIR" --device cuda \
    --repeats 1 --out "$out"
