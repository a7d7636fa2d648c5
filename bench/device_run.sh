#!/usr/bin/env bash
# One borrowed-GPU session (see BENCHMARKS.md / docs/RESULTS.md): GPU figures first,
# on a quiet GPU, then four trainings from the 128 px pack side by side.
# Needs: .devdata/pbc128.parquet (python jobs/pack.py --root ../shared/data/pbc --size 128
#        --output .devdata/pbc128.parquet) and .devdata/jpegs/ (512 original PBC JPEGs).
set -u
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-220}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, torchvision, sys; print(sys.version, torch.__version__, torchvision.__version__)"; } > "$OUT/train.log" 2>&1
[ "${SKIP_BENCH:-0}" = 1 ] || timeout 150 python3 bench/gpu.py --jpegs .devdata/jpegs --output "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log" 2>&1 \
  || echo "bench/gpu.py failed or timed out: rc=$?" >> "$OUT/gpu_bench.log"
common="--set pack=.devdata/pbc128.parquet --set batch_size=128 --set time_budget_s=$BUDGET"
declare -A runs
if [ "${RUNSET:-first}" = first ]; then
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
  timeout $((BUDGET + 120)) python3 jobs/train_packed.py $common ${runs[$name]} --set output=/tmp/packed/$name \
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
  [ "$name" != resnet50 ] && [ "$name" != resnet50_pbn ] && [ -d /tmp/packed/$name/checkpoint ] && tar -C /tmp/packed -cf "$OUT/$name.tar" $name
done
ls -la "$OUT"
