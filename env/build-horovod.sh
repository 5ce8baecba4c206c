#!/usr/bin/env bash
# Build a Horovod wheel from its source tarball against the torch of PYTHON; the one recipe that
# env/setup-local.sh (CPU and --gpu) and env/gpu-check.sh share.
#
#   env/build-horovod.sh SRC.tar.gz WHEEL_DIR cpu|cuda      (PYTHON: the interpreter to build for)
#
# Horovod 0.28.1 (the last release) predates the toolchains on current nodes; each patch below is
# one that a real build needed (Debian 12 + torch 2.13 CPU here; CUDA 13 + torch 2.11 + GCC 13 +
# CMake 4 on an H200 node, 2026-11-26):
# - C++17 for torch >= 2.1 headers (Horovod asks for C++14), and for CUDA 13's headers (it asks 11);
# - CMake 4 refuses gloo's cmake_minimum_required(2.8): CMAKE_POLICY_VERSION_MINIMUM=3.5;
# - GCC 13 headers no longer pull in <string>/<stdexcept> transitively: pre-include the lot;
# - CUDA 13 has no sm < 75: build for the visible GPU's capability (HOROVOD_BUILD_CUDA_CC_LIST);
# - NCCL from the nvidia-nccl wheel that CUDA torch installs: it ships libnccl.so.2 only, so the
#   build links through a folder that names it libnccl.so.
set -euo pipefail
SRC_TGZ=$1 WHEEL_DIR=$2 FLAVOUR=$3
PY=$(command -v "${PYTHON:-python3}")
[[ "$PY" == /* ]] || PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, links kept (venvs)
SRC_TGZ=$(cd "$(dirname "$SRC_TGZ")" && pwd)/$(basename "$SRC_TGZ")
mkdir -p "$WHEEL_DIR" && WHEEL_DIR=$(cd "$WHEEL_DIR" && pwd)
B=$(mktemp -d)
trap 'rm -rf "$B"' EXIT
tar -xzf "$SRC_TGZ" -C "$B"
cd "$B"/horovod-*
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' CMakeLists.txt horovod/torch/CMakeLists.txt
sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' horovod/common/ops/cuda/CMakeLists.txt
grep -q 'CMAKE_CXX_STANDARD 17' horovod/torch/CMakeLists.txt \
  || { echo "build-horovod: C++17 patch did not apply to $PWD" >&2; exit 1; }
"$PY" -m pip install -q psutil pyyaml cloudpickle packaging cffi 2>/dev/null \
  || "$PY" -c 'import psutil, yaml, cloudpickle, packaging, cffi'  # offline nodes: already there
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)"
export CXXFLAGS="${CXXFLAGS:-} -include bits/stdc++.h"
if [ "$FLAVOUR" = cuda ]; then
  SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
  NCCL_H=${NCCL_H:-$(find "$SITE"/nvidia -name nccl.h 2>/dev/null | head -1)}
  [ -n "$NCCL_H" ] || { echo "build-horovod: nccl.h not found under $SITE/nvidia (set NCCL_H)" >&2; exit 1; }
  NCCL_SO=$(find "$(dirname "$(dirname "$NCCL_H")")" -name 'libnccl.so*' | head -1)
  mkdir -p "$B/nccl/include" "$B/nccl/lib"
  ln -sf "$NCCL_H" "$B/nccl/include/nccl.h" && ln -sf "$NCCL_SO" "$B/nccl/lib/libnccl.so"
  CAP=${HOROVOD_BUILD_CUDA_CC_LIST:-$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')}
  export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_INCLUDE="$B/nccl/include" HOROVOD_NCCL_LIB="$B/nccl/lib"
  export HOROVOD_NCCL_LINK=SHARED HOROVOD_BUILD_CUDA_CC_LIST=$CAP
  export HOROVOD_CUDA_HOME=${HOROVOD_CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
  command -v mpicc >/dev/null && export HOROVOD_WITH_MPI=1  # else Gloo only (horovodrun --gloo)
  echo "build-horovod: NCCL $NCCL_SO, CUDA $HOROVOD_CUDA_HOME, sm_$CAP"
else
  export HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-MPI}
fi
"$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$B/dist" .
mkdir -p "$WHEEL_DIR"
mv "$B"/dist/horovod-*.whl "$WHEEL_DIR/"
echo "build-horovod: $(ls "$WHEEL_DIR"/horovod-*.whl)"
