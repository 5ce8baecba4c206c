#!/usr/bin/env bash
# GPU node acceptance: run the CUDA tests and `bench-gpu` with a python that already holds a CUDA
# torch (+ the matching torchaudio), optionally building Horovod with NCCL first. For nodes
# without internet, --wheels installs our remaining Python dependencies from a folder of wheels.
#
#   env/gpu-check.sh [--out DIR] [--wheels DIR] [--horovod-src horovod-0.28.1.tar.gz] [--budget SECONDS]
#                    [--steps tests,bench,doctor]  (which of the non-Horovod steps to run)
#                    [--fixtures DIR]  (shared/fixtures, when ../shared is not beside the checkout)
#
# Writes DIR/env.txt, DIR/tests.log, DIR/junit-*.xml, DIR/gpu.json, DIR/horovod-build.log,
# DIR/horovod-tests.log. Each step runs even if an earlier one failed; the exit status is the
# number of failed steps. --budget bounds the wall time (the Horovod build is abandoned past it).
set -u
OUT=runs/gpu-check WHEELS="" HVD_SRC="" BUDGET=540 STEPS=tests,bench,doctor FIXTURES=""
while (($#)); do
  case "$1" in
    --out) OUT=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --horovod-src) HVD_SRC=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --fixtures) FIXTURES=$(cd "$2" && pwd); shift ;;
    *) echo "gpu-check: unknown argument '$1' (expected --out, --wheels, --horovod-src, --budget, --steps, --fixtures)" >&2
       exit 2 ;;
  esac
  shift
done
START=$SECONDS
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
failed=0
step() { printf '\n[gpu-check %4ds] %s\n' $((SECONDS - START)) "$*"; }
left() { echo $((BUDGET - (SECONDS - START))); }

step "environment"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
  "devices", torch.cuda.device_count())'
  "$PY" -c 'import torchaudio; print("torchaudio", torchaudio.__version__)' 2>&1 | tail -1
  for t in nvcc gcc g++ cmake mpirun; do printf '%s: %s\n' "$t" "$(command -v $t || echo absent)"; done
  nproc; } 2>&1 | tee "$OUT/env.txt"

if [ -n "$WHEELS" ]; then
  step "installing wheels from $WHEELS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl 2>&1 | grep -v "^$" | tail -5 \
    || failed=$((failed + 1))
fi

HVD_PID=""
if [ -n "$HVD_SRC" ]; then
  step "building Horovod with NCCL in the background → $OUT/horovod-build.log"
  (
    set -e
    PYTHON="$PY" bash env/build-horovod.sh "$HVD_SRC" /tmp/horovod-wheel cuda
    "$PY" -m pip install -q --no-deps /tmp/horovod-wheel/horovod-*.whl
    horovodrun --check-build
  ) >"$OUT/horovod-build.log" 2>&1 &
  HVD_PID=$!
fi

# The tests read the LibriSpeech fixture from ../shared/fixtures; --fixtures DIR supplies it where absent.
if [ -n "$FIXTURES" ] && [ ! -d ../shared/fixtures ]; then mkdir -p ../shared && cp -r "$FIXTURES" ../shared/fixtures; fi

has() { [[ ",$STEPS," == *",$1,"* ]]; }
if has tests; then
step "CUDA tests (no Horovod)"
timeout $(($(left) - 200)) "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/junit-gpu.xml" \
  tests/test_gpu_train.py tests/test_gpu_dist.py tests/test_gpu_bench.py tests/test_features.py \
  tests/test_prep.py::test_cuda_fbank_matches_cpu tests/test_data.py tests/test_tensorrt.py \
  -k "cuda or gpu or torchaudio or amp or fused or compiled or nccl or tensorrt" --deselect \
  tests/test_gpu_train.py::test_horovod_gradscaler_order_and_inf_skip_on_gpus 2>&1 | tee "$OUT/tests.log" | tail -40
[ "${PIPESTATUS[0]}" = 0 ] || failed=$((failed + 1))
fi

if has bench; then
step "bench-gpu"
timeout $(($(left) - 90)) "$PY" -m hpc_asr bench gpu --out "$OUT/gpu.json" 2>&1 | tail -60
[ "${PIPESTATUS[0]}" = 0 ] || failed=$((failed + 1))
fi
has doctor && { step "doctor"; "$PY" -m hpc_asr doctor 2>&1 | tail -20 | tee "$OUT/doctor.txt"; }

if [ -n "$HVD_PID" ]; then
  step "waiting for the Horovod build (up to $(($(left) - 60)) s)"
  for _ in $(seq 1 $(($(left) - 60))); do kill -0 "$HVD_PID" 2>/dev/null || break; sleep 1; done
  if kill -0 "$HVD_PID" 2>/dev/null; then
    echo "Horovod build still running at the budget: abandoned"; kill "$HVD_PID"; failed=$((failed + 1))
  elif wait "$HVD_PID"; then
    step "Horovod GPU tests"
    timeout $(($(left) - 10)) "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/junit-horovod.xml" \
      tests/test_gpu_dist.py::test_horovod_on_gpu \
      tests/test_gpu_train.py::test_horovod_gradscaler_order_and_inf_skip_on_gpus 2>&1 | tee "$OUT/horovod-tests.log" | tail -40
    [ "${PIPESTATUS[0]}" = 0 ] || failed=$((failed + 1))
    step "doctor with Horovod"; "$PY" -m hpc_asr doctor 2>&1 | tail -20 | tee "$OUT/doctor-horovod.txt"
  else
    echo "Horovod build failed:"; tail -30 "$OUT/horovod-build.log"; failed=$((failed + 1))
  fi
fi
step "done: $failed failed step(s)"
exit "$failed"
