#!/usr/bin/env bash
# samlib on one GPU, end to end, in about 8 minutes on an H100:
#   (a) build data/ from the offline JPEG copy, (b) the speed benchmark at paper width,
#   (c) a `final` run at full width on a shortened schedule + its strategy table,
#   (d) the small result files (no checkpoints) and nvidia-smi into results/gpu/<device>/.
# Needs only python3 with torch, torchvision, numpy, pandas, matplotlib, tqdm and Pillow;
# samlib is used from this checkout (PYTHONPATH), nothing is installed, no network.
# Data: shared/cifar10-jpeg.tar.gz and shared/make_cifar10.py at the repo root (git-ignored).
#
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_EPOCHS=1 GPU_CHECK_PROFILE=smoke bash benchmarks/gpu_check.sh   # CPU dry run
#
# Environment: GPU_CHECK_EPOCHS (30), GPU_CHECK_PROFILE (paper), GPU_CHECK_DATA (data),
# GPU_CHECK_RUNS (runs/gpu/<slug>: run directories, checkpoints included), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
EPOCHS=${GPU_CHECK_EPOCHS:-30}
PROFILE=${GPU_CHECK_PROFILE:-paper}
DATA=${GPU_CHECK_DATA:-data}
T0=$(date +%s)

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" >&2; }   # stderr: keeps stdout for results
fail() { log "FAILED: $*"; exit 1; }
step() {   # step NAME COMMAND...: run it, timed
    local name=$1 t
    shift
    t=$(date +%s)
    log "== $name: $*"
    "$@"
    log "== $name done in $(( $(date +%s) - t )) s"
}

"$PY" -c "import torch, torchvision, numpy, pandas, matplotlib, tqdm" 2>/dev/null ||
    fail "$PY lacks one of torch, torchvision, numpy, pandas, matplotlib, tqdm"
SLUG=$("$PY" -c "
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu-dry-run'
print(re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-'))")
RESULTS=results/gpu/$SLUG
RUNS=${GPU_CHECK_RUNS:-runs/gpu/$SLUG}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
log "device $SLUG, profile $PROFILE, $EPOCHS epochs, results in $RESULTS, runs in $RUNS"
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

# (a) data
if [ -f "$DATA/cifar-10-batches-py/test_batch" ]; then
    log "data: $DATA/cifar-10-batches-py present"
else
    [ -f shared/cifar10-jpeg.tar.gz ] && [ -f shared/make_cifar10.py ] ||
        fail "no $DATA/cifar-10-batches-py, and no shared/cifar10-jpeg.tar.gz + shared/make_cifar10.py to build it"
    "$PY" -c "import PIL" 2>/dev/null || fail "make_cifar10.py needs Pillow: $PY cannot import PIL"
    step data "$PY" shared/make_cifar10.py "$DATA"
fi

# (b) speed benchmark: paper width on the GPU; the smoke dry run keeps it quick and narrow
if [ "$PROFILE" = smoke ]; then BENCH_ARGS=(--quick --width 8); else BENCH_ARGS=(--width 64); fi
step bench "$PY" -m samlib bench --out "$RESULTS/bench.json" "${BENCH_ARGS[@]}"

# (c) a `final` run on a shortened schedule, then Figure 1's strategy table
step train "$PY" -m samlib train --config final --profile "$PROFILE" --set "epochs=$EPOCHS" \
    --data-dir "$DATA" --out "$RUNS" --no-progress | tee "$RESULTS/train.out"
RUN_DIR=$(tail -n 1 "$RESULTS/train.out")
rm "$RESULTS/train.out"
[ -f "$RUN_DIR/final.json" ] || fail "train did not finish a run (last line: $RUN_DIR)"
step evaluate "$PY" -m samlib evaluate "$RUN_DIR" --data-dir "$DATA"

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
log "all done in $(( $(date +%s) - T0 )) s; results in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
