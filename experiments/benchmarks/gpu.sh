#!/usr/bin/env bash
# The benchmark suites on one NVIDIA GPU (H100/H200), bounded to about 6 minutes in all.
#
#   OUT=/some/folder bash experiments/benchmarks/gpu.sh [REPEATS] [RESNET50_BATCH]
#
# Time budget (hard limits, `timeout`), 5.5 minutes in all: environment check ~10 s; layer suite <= 140 s (NHWC
# cases only; modes autodiff and custom, since on a GPU `custom` plans the textbook formulation); the four small
# models' training steps <= 80 s; ResNet-50 bfloat16 training steps on 224x224 inputs <= 110 s (its two
# compilations take most of it). REPEATS (default 10) timed calls per function and RESNET50_BATCH (default 128)
# trade time for precision; a suite cut off by its limit writes nothing, the others are kept. Writes into $OUT:
# environment.txt, bench.log, gpu-layers.{json,md}, gpu-training.{json,md}, gpu-resnet50.{json,md}. Needs a
# CUDA-enabled JAX with flax, optax, orbax-checkpoint and tqdm already installed (no network there); without them
# it names what is missing in environment.txt and stops.
set -u
OUT=${OUT:?set OUT to the output folder}
REPEATS=${1:-10}
RESNET50_BATCH=${2:-128}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."  # the repository root

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not found"
  "$PYTHON" --version 2>&1
  "$PYTHON" -c 'import jax; print(jax.devices())' 2>&1
  pip list 2>/dev/null | grep -i jax
  "$PYTHON" -m pip list 2>/dev/null | grep -i -E "jax|flax|optax|orbax|torch|numpy|nvidia-cudnn"
} 2>&1 | tee "$OUT/environment.txt"

missing=$("$PYTHON" - 2>&1 <<'PY'
import importlib
missing = []
for name in ("jax", "flax", "optax", "orbax.checkpoint", "tqdm", "numpy"):
    try:
        importlib.import_module(name)
    except Exception as error:  # any import failure means: cannot run
        missing.append(f"{name} ({type(error).__name__})")
if not missing:
    import jax
    if jax.default_backend() != "gpu":
        missing.append(f"a CUDA-enabled jaxlib (the backend is {jax.default_backend()})")
print(", ".join(missing))
PY
)
if [ -n "$missing" ]; then
  echo "Missing in $PYTHON: $missing. Nothing timed on the GPU." | tee -a "$OUT/environment.txt"
  exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run() {  # run SECONDS NAME bench.py-arguments...: one suite under a hard time limit
  local limit=$1 name=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$PYTHON" experiments/benchmarks/bench.py "$@" --repeats "$REPEATS" --out "$OUT" --name "$name" \
    --no-progress >>"$OUT/bench.log" 2>&1
  echo "$name: exit $?, $((SECONDS - start)) s of $limit" | tee -a "$OUT/environment.txt"
}
run 140 gpu-layers layers --layouts NHWC --modes autodiff,custom
run 80 gpu-training training
run 110 gpu-resnet50 training --models resnet50 --resnet50-batch "$RESNET50_BATCH"
tail -n 5 "$OUT/bench.log"
