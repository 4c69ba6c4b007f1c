#!/usr/bin/env bash
# GPU check: a short DP fine-tune of the real all-MiniLM-L6-v2, the mechanism metrics' sync check
# (benchmarks/gpu_mechanism_check.py: no host-device synchronisation from privacy_callbacks) and
# the overhead benchmark (benchmarks/bench_overhead.py --mode gpu) on MiniLM- and BERT-base-size
# encoders, on a GPU machine that can neither reach a package index nor receive more than 64 MiB.
# About 6 minutes on one H100/H200; results go to $OUT. Any failed step fails the script.
#
#   bash benchmarks/gpu_check.sh --prepare      # here, with network: fills .whl/ and .model/
#   bash benchmarks/gpu_check.sh                # on the GPU machine, carrying .whl and .model
#   OUT=/tmp/out bash benchmarks/gpu_check.sh --cpu-smoke   # the same steps, tiny, on CPU
#
# --prepare downloads the pure-Python wheels the GPU image may lack (opacus, influxdb-client,
# reactivex) into .whl/ and writes a float16 copy of all-MiniLM-L6-v2 (~44 MB) into .model/; both
# folders are git-ignored. The GPU run installs the wheels into a temporary folder (never into the
# image) and the example upcasts the weights to float32.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mode=gpu
case "${1:-}" in
  "") ;;
  --prepare) mode=prepare ;;
  --cpu-smoke) mode=cpu ;;
  *) echo "usage: $0 [--prepare | --cpu-smoke]" >&2; exit 2 ;;
esac
model=.model/all-MiniLM-L6-v2-fp16

if [ "$mode" = prepare ]; then
  set -e
  mkdir -p .whl
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "opacus==${OPACUS_VERSION:-1.6.0}" "influxdb-client==${INFLUXDB_CLIENT_VERSION:-1.50.0}" \
    "reactivex==${REACTIVEX_VERSION:-4.1.0}"
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" python3 examples/finetune_dp.py --export-half "$model"
  du -sh .whl .model
  exit 0
fi

OUT=${OUT:-$root/gpu_check_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --target "$site" .whl/*.whl || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site:$root"
else
  echo "no carried wheels in .whl/: using the installed packages" >&2
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  python3 -c "import torch, opacus, lightning, transformers; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| opacus', \
opacus.__version__, '| lightning', lightning.__version__, '| transformers', \
transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$mode" = gpu ]; then
  tune=(--accelerator gpu --epochs 3)
  mech=(--size minilm --steps 20 --rounds 2 --warmup 5)
  bench=(--mode gpu --reps 4 --steps 15 --warmup 3)
  tune_limit=100 mech_limit=150 bench_limit=170
else
  tune=(--accelerator cpu --epochs 1 --max-steps 3 --n-train 192 --n-test 64 --batch-size 16
        --max-length 16)
  mech=(--size tiny --steps 8 --rounds 1 --warmup 2 --overhead-every 2)
  # Part 2 (the hooks beside their floor, CPU only), one short round.
  bench=(--mode cpu --reps 1 --steps 2 --warmup 1 --hook-rounds 1 --hook-steps 40)
  tune_limit=240 mech_limit=240 bench_limit=240
fi

status=0
if [ -f "$model/model.safetensors" ]; then
  tune+=(--model-dir "$model")
elif [ "$mode" = gpu ]; then
  echo "!!! no $model carried (run --prepare here and carry .model): skipping the fine-tune !!!" \
    | tee "$OUT/finetune.log" >&2
  status=1
fi
if [ "$status" = 0 ]; then
  echo "== fine-tune: examples/finetune_dp.py ${tune[*]}"
  timeout "$tune_limit" python3 examples/finetune_dp.py "${tune[@]}" --port 0 \
    --summary-json "$OUT/finetune.json" >"$OUT/finetune.log" 2>&1
  rc=$?
  grep -E "^(Privacy metrics|epoch|Summary)|RANDOM|Error" "$OUT/finetune.log"
  [ "$rc" = 0 ] || { echo "fine-tune failed (exit $rc); see finetune.log" >&2; status=1; }
fi

echo "== mechanism sync check: benchmarks/gpu_mechanism_check.py ${mech[*]}"
timeout "$mech_limit" python3 benchmarks/gpu_mechanism_check.py "${mech[@]}" \
  --json "$OUT/mechanism.json" >"$OUT/mechanism.log" 2>&1
rc=$?
grep -E "^(device|sync check|synchronising|fit under)" "$OUT/mechanism.log"
[ "$rc" = 0 ] || { tail -5 "$OUT/mechanism.log" >&2; echo "sync check failed (exit $rc)" >&2; status=1; }

echo "== benchmark: benchmarks/bench_overhead.py ${bench[*]}"
timeout "$bench_limit" python3 benchmarks/bench_overhead.py "${bench[@]}" \
  --json "$OUT/bench_overhead.json" --markdown "$OUT/bench_overhead.md" \
  >"$OUT/bench.log" 2>&1
rc=$?
[ -f "$OUT/bench_overhead.md" ] && cat "$OUT/bench_overhead.md"
[ "$rc" = 0 ] || { tail -5 "$OUT/bench.log" >&2; echo "benchmark failed (exit $rc)" >&2; status=1; }
exit "$status"
