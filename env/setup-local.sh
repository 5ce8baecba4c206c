#!/usr/bin/env bash
# Idempotent set-up for one node: Debian packages, .venv, Python deps, and a Horovod build with
# the C++17 patch. A second run only checks stamps and returns in seconds.
#
#   env/setup-local.sh            # CPU node (torch CPU wheel, Horovod with MPI + Gloo)
#   env/setup-local.sh --gpu      # GPU node (CUDA torch + matching torchaudio, Horovod with NCCL)
#   env/setup-local.sh --venv DIR --no-editable --no-apt   # a self-contained install (env/provision.sh)
#
# Overrides (environment): TORCH_VERSION, HOROVOD_VERSION, VENV, HPC_ASR_CACHE, PYTHON,
# TENSORRT_PACKAGE and TENSORRT_VERSION (--gpu only: the FP16 engine of hpc_asr.deploy.tensorrt).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GPU=0 EDITABLE=1 APT=1
while (($#)); do
  case "$1" in
    --gpu) GPU=1 ;;
    --venv) [ $# -ge 2 ] || { echo "setup-local: --venv needs a directory" >&2; exit 2; }; VENV=$2; shift ;;
    --no-editable) EDITABLE=0 ;;  # copy the toolkit into the venv (shared installs)
    --no-apt) APT=0 ;;            # packages are managed by the site (provisioning)
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "setup-local: unknown argument '$1' (expected --gpu, --venv DIR, --no-editable, --no-apt)" >&2; exit 2 ;;
  esac
  shift
done

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
# TensorRT 10: hpc_asr.deploy.tensorrt uses its weakly typed BuilderFlag.FP16, which 11 may drop. The CUDA 12
# build bundles its own CUDA 12 runtime (the driver runs it beside a CUDA 13 torch); tensorrt-cu13 also exists.
TENSORRT_PACKAGE=${TENSORRT_PACKAGE:-tensorrt-cu12}
TENSORRT_VERSION=${TENSORRT_VERSION:-10.16.1.11}
VENV=${VENV:-$ROOT/.venv}
CACHE=${HPC_ASR_CACHE:-$HOME/.cache/hpc_asr}
PYTHON=${PYTHON:-python3}
say() { printf '[setup] %s\n' "$*"; }
# pip, quietly: some images point pip at local indexes that don't exist, and pip warns per package.
pipq() {
  local out rc=0
  out=$("$PY" -m pip "$@" 2>&1) || rc=$?
  grep -v -e 'is ignored: it is neither a file nor a directory' -e '^ *$' <<<"$out" || true
  return "$rc"
}

# ---- 1. Debian packages (only the missing ones) -------------------------------------------
# slurm-wlm + libpmix-dev: the real one-node SLURM of the tests (srun --mpi=pmix); lmod + tcl:
# modulefile tests (environment-modules conflicts with lmod as a package: see step 1b).
# mbrola* (contrib/non-free) and rhvoice* (non-free): voice-assistant corpus engines (docs/data.md);
# festvox-*: its festival test voices.
APT_PKGS=(openmpi-bin libopenmpi-dev cmake g++ make espeak-ng libsndfile1 sox
          slurm-wlm slurm-wlm-basic-plugins libpmix-dev lmod tcl festival festvox-kallpc16k
          festvox-kdlpc16k festvox-rablpc16k festvox-us-slt-hts
          mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 rhvoice rhvoice-english
          chromium)  # chromium: the service page's browser test (headless, fake microphone)
NONFREE_PKGS=" mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 rhvoice rhvoice-english "
NONFREE_SOURCES=/etc/apt/sources.list.d/hpc-asr-contrib-non-free.sources
missing=()
[ "$APT" = 1 ] || APT_PKGS=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# Debian's contrib and non-free components, only when a package from them is missing and they are not
# enabled yet: one deb822 file beside the system's sources, same mirror and suites (idempotent).
enable_contrib_non_free() {
  local src=/etc/apt/sources.list.d/debian.sources uri suites
  [ -f "$NONFREE_SOURCES" ] && return 0
  if grep -rqsE '^(Components:.*|deb .*)\bnon-free( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
      && grep -rqsE '^(Components:.*|deb .*)\bcontrib\b' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  uri=$(sed -n 's/^URIs: *//p' "$src" 2>/dev/null | head -1); uri=${uri:-http://deb.debian.org/debian}
  suites=$(. /etc/os-release && echo "$VERSION_CODENAME $VERSION_CODENAME-updates")
  say "enabling Debian contrib and non-free in $NONFREE_SOURCES (for mbrola and rhvoice voices)"
  printf '%s\n' "# Added by hpc_asr env/setup-local.sh: Debian's mbrola* (contrib, non-free) and rhvoice* (non-free)" \
    "Types: deb" "URIs: $uri" "Suites: $suites" "Components: contrib non-free" \
    "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" | $SUDO tee "$NONFREE_SOURCES" >/dev/null
}
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  for p in "${missing[@]}"; do
    [[ "$NONFREE_PKGS" == *" $p "* ]] && { enable_contrib_non_free; break; }
  done
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 1b. environment-modules (Tcl) beside Lmod: unpacked, not installed ---------------------
# Both packages own /usr/share/modules-style `module` functions, so Debian won't install both.
# The tests need both real implementations: Tcl's modulecmd.tcl runs fine from an unpacked .deb.
ENVMOD_DIR="$CACHE/environment-modules"
if [ "$APT" = 1 ] && [ ! -f "$ENVMOD_DIR/usr/lib/x86_64-linux-gnu/modulecmd.tcl" ]; then
  say "unpacking environment-modules (Tcl) into $ENVMOD_DIR"
  DL=$(mktemp -d)
  (cd "$DL" && apt-get download -q environment-modules >/dev/null 2>&1) \
    || { echo "setup-local: apt-get download environment-modules failed" >&2; exit 1; }
  mkdir -p "$ENVMOD_DIR" && dpkg -x "$DL"/environment-modules_*.deb "$ENVMOD_DIR"
  rm -rf "$DL"
fi

# ---- 2. virtual environment + Python packages ----------------------------------------------
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info.major}{sys.version_info.minor}")')
FLAVOUR=$([ "$GPU" = 1 ] && echo cuda || echo cpu)

REQ_HASH=$(cat "$ROOT/env/requirements.txt" "$ROOT/setup.py" | sha1sum | cut -c1-12)
STAMP="$VENV/.hpc_asr-deps-$FLAVOUR-torch$TORCH_VERSION-$REQ_HASH"
[ "$GPU" = 1 ] && STAMP="$STAMP-$TENSORRT_PACKAGE$TENSORRT_VERSION"
if [ ! -f "$STAMP" ]; then
  say "installing Python packages (torch $TORCH_VERSION, $FLAVOUR)"
  pipq install -q --upgrade pip setuptools wheel
  if [ "$GPU" = 1 ]; then
    # The CUDA wheel comes from the default index; torchaudio must be the release built against
    # the same torch (its minor version tracks torch's), so both are resolved in one install.
    TA_VERSION=${TORCHAUDIO_VERSION:-$(echo "$TORCH_VERSION" | awk -F. '{print $1"."$2".0"}')}
    pipq install -q "torch==$TORCH_VERSION" "torchaudio==$TA_VERSION"
    pipq install -q "$TENSORRT_PACKAGE==$TENSORRT_VERSION"  # GPU only: the FP16 engine (hpc_asr.deploy.tensorrt)
  else
    pipq install -q "torch==$TORCH_VERSION" \
      || pipq install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
  pipq install -q -r "$ROOT/env/requirements.txt" "torch==$TORCH_VERSION"
  rm -f "$VENV"/.hpc_asr-deps-*
  touch "$STAMP"
fi

# The toolkit itself: editable for development; for shared installs a copy in site-packages,
# redone only when the sources changed, so the install works without this checkout.
if [ "$EDITABLE" = 1 ]; then
  SRC_STAMP="$VENV/.hpc_asr-src-editable"
else
  SRC_STAMP="$VENV/.hpc_asr-src-$(cd "$ROOT" && find setup.py hpc_asr data_prep -name '*.py' -o -name '*.yaml' \
    | sort | xargs cat | sha1sum | cut -c1-12)"
fi
if [ ! -f "$SRC_STAMP" ]; then
  if [ "$EDITABLE" = 1 ]; then
    pipq install -q --no-deps -e "$ROOT"
  else
    BUILD_SRC=$(mktemp -d) && cp -r "$ROOT/setup.py" "$ROOT/hpc_asr" "$ROOT/data_prep" "$BUILD_SRC/"
    pipq install -q --no-deps --no-build-isolation "$BUILD_SRC" && rm -rf "$BUILD_SRC"
  fi
  rm -f "$VENV"/.hpc_asr-src-*
  touch "$SRC_STAMP"
fi

# ---- 3. Horovod, built once per (horovod, torch, python, flavour) and cached outside the repo -
TORCH_FULL=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')
WHEEL_DIR="$CACHE/wheels/horovod-$HOROVOD_VERSION-torch$TORCH_FULL-py$PYVER-$FLAVOUR"
if ! "$PY" -c 'import horovod.torch' 2>/dev/null; then
  if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION against torch $TORCH_FULL ($FLAVOUR); takes ~3-5 min"
    BUILD=$(mktemp -d)
    pipq download -q --no-deps --no-binary :all: -d "$BUILD" "horovod==$HOROVOD_VERSION"
    PYTHON="$PY" bash "$ROOT/env/build-horovod.sh" "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" "$WHEEL_DIR" "$FLAVOUR" \
      > "$BUILD/build.log" 2>&1 || { tail -40 "$BUILD/build.log" >&2; exit 1; }
    rm -rf "$BUILD"
  fi
  say "installing cached Horovod wheel from $WHEEL_DIR"
  pipq install -q "$WHEEL_DIR"/horovod-*.whl
fi

CHECK="$VENV/.hpc_asr-horovod-checked-$FLAVOUR"
if [ ! -f "$CHECK" ]; then
  out=$("$VENV/bin/horovodrun" --check-build)
  for fw in PyTorch MPI Gloo; do
    echo "$out" | grep -qE "\[X\] $fw" || { echo "$out" >&2; echo "setup-local: Horovod lacks $fw" >&2; exit 1; }
  done
  touch "$CHECK"
fi
say "ready: $VENV (torch $TORCH_FULL, horovod $HOROVOD_VERSION, $FLAVOUR)"
