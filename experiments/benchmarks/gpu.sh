#!/usr/bin/env bash
# The one prepared run on one NVIDIA GPU (H100/H200): tests, layer grid, small models' training steps and
# ResNet-50 bf16 against PyTorch, about 9 minutes, each part under a hard limit (experiments/benchmarks/gpu_suite.py).
#
#   OUT=/some/folder GIT_COMMIT=$(git rev-parse HEAD) bash experiments/benchmarks/gpu.sh [gpu_suite.py flags]
#   OUT=/tmp/gpu bash experiments/benchmarks/gpu.sh --dry-run    # every part at its smallest, any machine
#
# Writes $OUT/gpu.json, $OUT/gpu.md and $OUT/gpu.log. Wheels in .whl/ (tensorflow-datasets and the rest that
# convlib.train's import of convlib.data needs, see docs/guides/gpu.md) are installed to /tmp/site first; without
# an importable convlib.train it names what is missing and stops.
set -u
OUT=${OUT:?set OUT to the output folder}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."  # the repository root

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu.sh: installing the wheels in .whl/ failed" | tee "$OUT/gpu.log"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! error=$("$PYTHON" -c "import convlib.train, flax, optax, orbax.checkpoint, tqdm" 2>&1); then
  echo "gpu.sh: cannot import convlib.train and its libraries with $PYTHON: ${error##*$'\n'}" | tee "$OUT/gpu.log"
  exit 1
fi
exec "$PYTHON" experiments/benchmarks/gpu_suite.py --out "$OUT" "$@"
