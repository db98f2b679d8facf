#!/usr/bin/env bash
# One command for a CUDA machine: the step, round and batched-round benchmarks on the GPU, one
# paper-size round (ViT-B/16 architecture, random weights, 10 clients, n_cls 50) sequential
# and batched, with times and peak memory, and the steps of the methods with prompts inside the
# encoders at paper size; at most about 7 minutes (4 parts of at most 100 s each).
# Run from the repository root after the README's install command:
#   bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export FEDPGP_CACHE=${FEDPGP_CACHE:-$(mktemp -d)}
status=0
run() {
  echo "== $*"
  timeout "${STEP_TIMEOUT:-100}" "$PY" "$@" || { echo "(failed or timed out: $*)"; status=1; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
run benchmarks/bench_step.py --device cuda --classes 50 --repeats 10
run benchmarks/bench_round.py --device cuda --clients 1
run benchmarks/bench_batched.py --device cuda --methods fedpgp,promptfl --paper-clients 10
run benchmarks/bench_methods.py --device cuda --methods vpt,ivlp,maple,fedmgp,pfedmma \
  --no-world --stem-repeats 5
exit $status
