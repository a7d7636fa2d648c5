#!/usr/bin/env bash
# One borrowed-GPU session (see BENCHMARKS.md / docs/RESULTS.md): GPU figures first,
# on a quiet GPU, then four trainings from the 128 px pack side by side.
# Needs: $DEVDATA/pbc128.parquet (python jobs/pack.py --root ../shared/data/pbc --size 128
#        --output $DEVDATA/pbc128.parquet) and $DEVDATA/jpegs/<class>/ (512 original PBC JPEGs).
# RUNSET=robust (issue 21, the default): the from-scratch robust candidates, each with stain normalisation in
# the preset and the robustness augmentation from epoch 1 (3 augmentation worker processes each), and
# bench/gpu_decode.py (the job's actor, GPU decode vs CPU decode). RUNSET=first|second: the earlier sessions' runs.
set -u
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-220}
DEVDATA=${DEVDATA:-.devdata}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, torchvision, sys; print(sys.version, torch.__version__, torchvision.__version__)"; } > "$OUT/train.log" 2>&1
if [ "${RUNSET:-robust}" = robust ]; then
  [ "${SKIP_BENCH:-0}" = 1 ] || BLOODRAY_PBC=$DEVDATA/jpegs timeout 120 python3 bench/gpu_decode.py --device cuda \
    --images 4096 --name gpu_decode_h200 > "$OUT/gpu_decode.log" 2>&1 || echo "gpu_decode failed: rc=$?" >> "$OUT/gpu_decode.log"
  cp bench/results/gpu_decode_h200.* "$OUT/" 2>/dev/null
elif [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 150 python3 bench/gpu.py --jpegs $DEVDATA/jpegs --output "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log" 2>&1 \
  || echo "bench/gpu.py failed or timed out: rc=$?" >> "$OUT/gpu_bench.log"
fi
common="--set pack=$DEVDATA/pbc128.parquet --set batch_size=128 --set time_budget_s=$BUDGET ${EXTRA:-}"
# The robust recipe: configs/train/robust_finetune.yaml's augmentation, from scratch, with stain normalisation.
robust="--set stain_norm=reinhard --set robust_workers=${ROBUST_WORKERS:-3} --set color_jitter=0.2 --set hue_jitter=0.03
  --set min_scale=0.85 --set robust.zoom_out=1.3 --set robust.stain_jitter=0.08 --set robust.gamma=0.2
  --set robust.blur_prob=0.3 --set robust.noise_std=4.0 --set robust.jpeg_prob=0.3 --set precise_bn_batches=20"
declare -A runs
if [ "${RUNSET:-robust}" = robust ]; then
  runs=(
    [robust_bn]="$robust --set model_kwargs.batch_norm=true --set model_kwargs.dropout=0.1"
    [robust_gn]="$robust --set model_kwargs.norm=group --set model_kwargs.dropout=0.1"
    [robust_wide_bn]="$robust --set model_kwargs.batch_norm=true --set model_kwargs.dropout=0.1
      --set model_kwargs.filters=[48,96,96,96,192,384,384] --set model_kwargs.hidden=256"
    [robust_strong_bn]="$robust --set model_kwargs.batch_norm=true --set model_kwargs.dropout=0.1 --set max_scale=1.5
      --set robust.zoom_out=1.6 --set robust.blur_prob=0.5 --set robust.blur_sigma=2.0 --set robust.stain_jitter=0.12"
  )
elif [ "${RUNSET}" = continue ]; then  # a second visit: a warm restart of the two best by val, more workers each
  runs=(
    [robust_bn_c]="$robust --set model_kwargs.batch_norm=true --set model_kwargs.dropout=0.1
      --set init_checkpoint=$PREVIOUS/robust_bn/checkpoint --set lr=0.001 --set warmup_epochs=1"
    [robust_wide_bn_c]="$robust --set model_kwargs.batch_norm=true --set model_kwargs.dropout=0.1
      --set model_kwargs.filters=[48,96,96,96,192,384,384] --set model_kwargs.hidden=256
      --set init_checkpoint=$PREVIOUS/robust_wide_bn/checkpoint --set lr=0.001 --set warmup_epochs=1"
  )
elif [ "${RUNSET}" = first ]; then
  runs=(
    [bloodnet_bn]="--set model=bloodnet --set model_kwargs.batch_norm=true --set epochs=120"
    [bloodnet_bn_d01]="--set model=bloodnet --set model_kwargs.batch_norm=true --set model_kwargs.dropout=0.1 --set epochs=120"
    [mobilenet_v2]="--set model=mobilenet_v2 --set epochs=100"
    [resnet50]="--set model=resnet50 --set epochs=60"
  )
else  # second session: precise BN for the deep BN networks, a second seed for the bloodnet recipe
  runs=(
    [bloodnet_bn_d01_seed1]="--set model=bloodnet --set model_kwargs.batch_norm=true --set model_kwargs.dropout=0.1 --set epochs=120 --set seed=1"
    [bloodnet_bn_d0]="--set model=bloodnet --set model_kwargs.batch_norm=true --set model_kwargs.dropout=0.0 --set epochs=120"
    [mobilenet_v2_pbn]="--set model=mobilenet_v2 --set epochs=80 --set precise_bn_batches=20"
    [resnet50_pbn]="--set model=resnet50 --set epochs=60 --set precise_bn_batches=20"
  )
fi
for name in "${!runs[@]}"; do
  timeout $((BUDGET + 120)) python3 jobs/train_packed.py $common --set epochs=${EPOCHS:-100} ${runs[$name]} \
    --set output=/tmp/packed/$name \
    > /tmp/packed_$name.log 2>&1 &
done
wait
for name in "${!runs[@]}"; do
  { echo "=== $name"; cat /tmp/packed_$name.log; } >> "$OUT/train.log"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = {}
for p in sorted(pathlib.Path("/tmp/packed").glob("*/result.json")):
    r = json.loads(p.read_text())
    out[p.parent.name] = r
pathlib.Path(sys.argv[1], "results.json").write_text(json.dumps(out, indent=1))
PY
for name in "${!runs[@]}"; do
  [ "$name" != resnet50 ] && [ "$name" != resnet50_pbn ] && [ -d /tmp/packed/$name/checkpoint ] \
    && tar -C /tmp/packed --exclude='*.npy' -cf "$OUT/$name.tar" $name
done
ls -la "$OUT"
