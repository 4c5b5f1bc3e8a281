#!/usr/bin/env bash
# samlib on one GPU, end to end, within 8 minutes on an H100 (about 4.5-7 with the defaults):
#   (0) a time estimate first (a budget, then a timing probe of the training step),
#   (a) find or build CIFAR-10, (b) the speed benchmark at paper width, (c) a `final` run at
#   full width on a shortened schedule + its strategy table evaluated on the GPU, (d) the small
#   result files (no checkpoints) and nvidia-smi into results/gpu/<device>/.
# Needs only python3 with torch, torchvision, numpy, pandas, matplotlib, tqdm and Pillow;
# samlib is used from this checkout (PYTHONPATH), nothing is installed.
#
#   bash benchmarks/gpu_check.sh                      # or: make gpu-check [DATA_DIR=...]
#   GPU_CHECK_EPOCHS=1 GPU_CHECK_PROFILE=smoke bash benchmarks/gpu_check.sh   # CPU dry run
#
# Data, the first that applies:
#   1. $DATA_DIR (else $GPU_CHECK_DATA, else data) when it holds cifar-10-batches-py;
#   2. else the offline JPEG copy built into that folder by make_cifar10.py from
#      $SAMLIB_SHARED_DATA (the folder holding make_cifar10.py and cifar10-jpeg.tar.gz), or
#      from shared/ at the repo root when it holds those two files;
#   3. else, where the CIFAR-10 server answers, a download (samlib.data.load_cifar10(download=True));
#   4. else one FAILED line saying what to set.
#
# Environment: DATA_DIR / GPU_CHECK_DATA (above), SAMLIB_SHARED_DATA (above),
# GPU_CHECK_EPOCHS (20), GPU_CHECK_PROFILE (paper), GPU_CHECK_RUNS (runs/gpu/<slug>: run
# directories, checkpoints included), GPU_CHECK_RESULTS (results/gpu/<slug>: the small files
# to commit), PYTHON (python3).
#
# Why 20 epochs fit 8 minutes on an H100.  airbench-like speeds: a ResNet of ~4.7M parameters
# at batch 512 in bf16 trains CIFAR-10 at roughly 5-10 s per epoch on an H100.  `final` at the
# paper profile is of that kind (SE-ResNet, widths 64/128/256, bf16 autocast, channels_last) but
# at batch 128 (351 steps per epoch, each with Lookahead, EMA and clipping: more per-step
# overhead) and evaluates ~35,000 images after each epoch (train 5,000, val 5,000 and test
# 10,000 for the model and its EMA), so budget 10 s per epoch.  Around it: data <= 30 s (the
# JPEG copy builds in ~15 s), the probe ~15 s, the benchmark's cuda plan ~2 min (torch.compile
# included), the run's start and final evaluation ~30 s, `evaluate` ~30 s: ~4 min in all.
# 20 x 10 s = 3.3 min of epochs brings the pessimistic total to ~7.3 min, ~5.6 at 5 s/epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
EPOCHS=${GPU_CHECK_EPOCHS:-20}
PROFILE=${GPU_CHECK_PROFILE:-paper}
DATA=${DATA_DIR:-${GPU_CHECK_DATA:-data}}
SHARED=${SAMLIB_SHARED_DATA:-}
T0=$(date +%s)

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" >&2; }   # stderr: keeps stdout for results
fail() { log "FAILED: $*"; exit 1; }
step() {   # step NAME COMMAND...: run it, timed; returns its exit status
    local name=$1 t rc
    shift
    t=$(date +%s)
    log "== $name: $*"
    "$@" && rc=0 || rc=$?
    log "== $name $([ $rc = 0 ] && echo done || echo "exited with $rc") in $(( $(date +%s) - t )) s"
    return $rc
}
mmss() { printf '%d min %02d s' $(( $1 / 60 )) $(( $1 % 60 )); }
has_copy() { [ -n "$1" ] && [ -f "$1/make_cifar10.py" ] && [ -f "$1/cifar10-jpeg.tar.gz" ]; }

"$PY" -c "import torch, torchvision, numpy, pandas, matplotlib, tqdm" 2>/dev/null ||
    fail "$PY lacks one of torch, torchvision, numpy, pandas, matplotlib, tqdm"
read -r SLUG CUDA < <("$PY" -c "
import re, torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else 'cpu-dry-run'
print(re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-'), int(cuda))") || fail "$PY cannot ask torch for the device"
RESULTS=${GPU_CHECK_RESULTS:-results/gpu/$SLUG}
RUNS=${GPU_CHECK_RUNS:-runs/gpu/$SLUG}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
log "device $SLUG, profile $PROFILE, $EPOCHS epochs, data $DATA, results in $RESULTS, runs in $RUNS"

# (0) the estimate, before anything long starts: a budget (see the top), then a probe
if [ "$PROFILE" = smoke ]; then   # CPU dry run: bench --quick, smoke epochs of a few seconds
    BENCH_S=60 EPOCH_S=10 FIXED_S=60 WHERE="on 2 CPU cores (dry run)"
else
    BENCH_S=120 EPOCH_S=10 FIXED_S=75 WHERE="on an H100 (at most; ~5 s/epoch is likelier)"
fi
[ -f "$DATA/cifar-10-batches-py/test_batch" ] && DATA_S=0 || DATA_S=30
EST=$(( DATA_S + 15 + BENCH_S + EPOCHS * EPOCH_S + FIXED_S ))
log "estimate: about $(mmss "$EST") $WHERE: data ${DATA_S} s, probe ~15 s, bench ~${BENCH_S} s," \
    "train $EPOCHS epochs x ~${EPOCH_S} s + start/end and evaluate ~${FIXED_S} s"
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
step probe "$PY" -m samlib sweep --configs final --seeds 84 --profile "$PROFILE" --set "epochs=$EPOCHS" \
    --data-dir "$DATA" --out "$RUNS" --plan || log "the timing probe failed; going on with the budget above"

# (a) data
if [ -f "$DATA/cifar-10-batches-py/test_batch" ]; then
    log "data: $DATA/cifar-10-batches-py present"
elif has_copy "$SHARED" || has_copy shared; then
    has_copy "$SHARED" && SRC=$SHARED || SRC=shared
    "$PY" -c "import PIL" 2>/dev/null || fail "make_cifar10.py needs Pillow: $PY cannot import PIL"
    step data "$PY" "$SRC/make_cifar10.py" "$DATA"
elif "$PY" -c "
import socket, sys
from urllib.parse import urlparse
from samlib.data import URL
try:
    socket.create_connection((urlparse(URL).hostname, 443), timeout=5).close()
except OSError:
    sys.exit(1)" 2>/dev/null; then
    step data "$PY" -c "import sys; from samlib.data import load_cifar10; load_cifar10(sys.argv[1], download=True)" "$DATA"
else
    fail "no CIFAR-10 at $DATA/cifar-10-batches-py, no make_cifar10.py + cifar10-jpeg.tar.gz in" \
         "\$SAMLIB_SHARED_DATA (${SHARED:-unset}) or shared/, and no network to download it: set DATA_DIR" \
         "to a folder holding cifar-10-batches-py, or SAMLIB_SHARED_DATA to the folder holding" \
         "make_cifar10.py and cifar10-jpeg.tar.gz"
fi
[ -f "$DATA/cifar-10-batches-py/test_batch" ] || fail "no $DATA/cifar-10-batches-py/test_batch after the data step"

# (b) speed benchmark: paper width on the GPU; the smoke dry run keeps it quick and narrow
if [ "$PROFILE" = smoke ]; then BENCH_ARGS=(--quick --width 8); else BENCH_ARGS=(--width 64); fi
step bench "$PY" benchmarks/bench.py --out "$RESULTS/bench.json" --data-dir "$DATA" "${BENCH_ARGS[@]}"

# (c) a `final` run on a shortened schedule, then Figure 1's strategy table (on the GPU:
# evaluate's default, named explicitly where there is one)
step train "$PY" -m samlib train --config final --profile "$PROFILE" --set "epochs=$EPOCHS" \
    --data-dir "$DATA" --out "$RUNS" --no-progress | tee "$RESULTS/train.out"
RUN_DIR=$(tail -n 1 "$RESULTS/train.out")
rm "$RESULTS/train.out"
[ -f "$RUN_DIR/final.json" ] || fail "train did not finish a run (last line: $RUN_DIR)"
if [ "$CUDA" = 1 ]; then EVAL_ARGS=(--device cuda); else EVAL_ARGS=(); fi
step evaluate "$PY" -m samlib evaluate "$RUN_DIR" --data-dir "$DATA" "${EVAL_ARGS[@]}"

# (d) small files only (checkpoints stay in $RUN_DIR)
for f in metrics.csv final.json provenance.json config.json strategies.csv; do
    cp "$RUN_DIR/$f" "$RESULTS/" || fail "$RUN_DIR/$f missing"
done
if command -v nvidia-smi >/dev/null; then
    nvidia-smi > "$RESULTS/nvidia-smi.txt"
else
    echo "no nvidia-smi on this machine" > "$RESULTS/nvidia-smi.txt"
fi
"$PY" -c "
import json, sys
b = json.load(open(sys.argv[1]))
print('ratios: augment %.1fx  augment+mixup %.1fx  train_step %.1fx  tta %.1fx' % tuple(
    b[k] for k in ('augment_ratio', 'augment_mixup_ratio', 'train_step_ratio', 'tta_ratio')))
print('s/epoch (45k images): naive %.1f  samlib %.1f' % tuple(b['train_step']['seconds_per_epoch_45k'].values()))
print(open(sys.argv[2]).read())" "$RESULTS/bench.json" "$RESULTS/strategies.csv"
T=$(( $(date +%s) - T0 ))
log "all done in $T s (estimate $EST s); results in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
