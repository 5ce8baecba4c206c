#!/usr/bin/env bash
# What HPC staff run once per version: a self-contained install of hpc_asr plus its modulefiles.
#
#   env/provision.sh --prefix /opt/apps/hpc_asr/0.1.0 [--modulefiles DIR] [--gpu] [--site FILE]
#   env/provision.sh --prefix DIR --modulefiles-only      # rewrite the modulefiles of an install
#
# Edit env/site.yaml first: before installing anything, every site module it names (modulefile.deps
# or cpu_deps, env.modules) must pass `module is-avail` (Lmod or environment-modules, from the
# calling shell); a missing one stops here with the list and the line to edit. Last, provisioning
# checks its own result: `module use DIR && module load hpc_asr/VERSION` must give PREFIX's python.
#
# The install is a virtualenv at PREFIX (torch, the cached Horovod build from env/setup-local.sh,
# checked with `horovodrun --check-build`, and the toolkit copied in, not linked to this checkout).
# The modulefiles are DIR/hpc_asr/VERSION.lua (Lmod) and DIR/hpc_asr/VERSION (Tcl); DIR defaults to
# PREFIX/modulefiles. They load the site's dependencies (env/site.yaml: modulefile.deps on GPU
# installs, modulefile.cpu_deps otherwise), put PREFIX/bin on PATH (no PYTHONPATH), set the
# NCCL/HDF5 presets of env/nccl.env and HPC_ASR_SITE=PREFIX/env/site.yaml (a copy of --site);
# `module unload hpc_asr` restores the environment.
#   Users: module use DIR && module load hpc_asr && python -m hpc_asr doctor
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX="" MODDIR="" GPU=0 SITE=${HPC_ASR_SITE:-$ROOT/env/site.yaml} ONLY_MODULES=0
while (($#)); do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
    --modulefiles) MODDIR=${2:?--modulefiles needs a directory}; shift ;;
    --site) SITE=${2:?--site needs a file}; shift ;;
    --gpu) GPU=1 ;;
    --modulefiles-only) ONLY_MODULES=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "provision: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$PREFIX" ] || { echo "provision: --prefix DIR is required" >&2; exit 2; }
[ -f "$SITE" ] || { echo "provision: site file $SITE not found" >&2; exit 2; }
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
MODDIR=${MODDIR:-$PREFIX/modulefiles}
VERSION=$(sed -n 's/^ *version="\([^"]*\)".*/\1/p' "$ROOT/setup.py")
say() { printf '[provision] %s\n' "$*"; }

# ---- 0. every site module the site file names exists, before anything is installed ------------
# `module` comes from the calling shell (Lmod and environment-modules export it) or a known init.
have_module() { type module >/dev/null 2>&1; }
for init in ${LMOD_PKG:+$LMOD_PKG/init/bash} ${MODULESHOME:+$MODULESHOME/init/bash} /etc/profile.d/lmod.sh \
            /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
  have_module && break
  if [ -f "$init" ]; then set +u; . "$init" >/dev/null 2>&1 || true; set -u; fi
done
have_module || { echo "provision: no \`module\` command (Lmod or environment-modules): run it from a shell" \
  "where \`module avail\` works" >&2; exit 2; }
site_modules() {  # "LINE KEY MODULE" for each site module $SITE names (the hpc_asr module itself excluded)
  PYTHONPATH="$ROOT" "${PYTHON:-python3}" - "$SITE" "$GPU" <<'PY'
import re, sys
path, gpu = sys.argv[1:]
try:
    from hpc_asr.ops.site import JobError, load_site  # the one reader of the site file
except ImportError as e:
    sys.exit(f"provision: reading {path} needs a python3 with PyYAML ({e}): set PYTHON=/path/to/python")
try:
    site = load_site(path)
except JobError as e:
    sys.exit(f"provision: {e}")
lines = open(path).read().splitlines()
key = "deps" if gpu == "1" else "cpu_deps"
for key, mods in ((key, site.modulefile.get(key)), ("modules", site.env.get("modules"))):
    line = next((i + 1 for i, ln in enumerate(lines) if re.match(rf"\s*{key}:", ln)), 0)
    for mod in mods or []:
        if str(mod).split("/")[0] != "hpc_asr":
            print(line, key, mod)
PY
}
NAMED=$(site_modules) || exit 2
MISSING="" WHERE=""
while read -r line key mod; do
  [ -n "$mod" ] || continue
  set +u
  if module is-avail "$mod" >/dev/null 2>&1; then set -u; continue; fi
  set -u
  MISSING="$MISSING $mod"
  case " $WHERE " in *" $line:$key "*) ;; *) WHERE="$WHERE $line:$key" ;; esac
done <<< "$NAMED"
if [ -n "$MISSING" ]; then
  echo "provision: site modules not found (module is-avail):$MISSING" >&2
  for w in $WHERE; do
    echo "provision: edit $SITE line ${w%%:*} (${w#*:}) to the names \`module avail\` shows, then re-run" >&2
  done
  exit 2
fi

# ---- 1. the install: one code path with env/setup-local.sh, into PREFIX, non-editable ---------
if [ "$ONLY_MODULES" = 0 ]; then
  say "installing hpc_asr $VERSION into $PREFIX ($([ "$GPU" = 1 ] && echo GPU || echo CPU))"
  bash "$ROOT/env/setup-local.sh" --venv "$PREFIX" --no-editable --no-apt $([ "$GPU" = 1 ] && echo --gpu)
  "$PREFIX/bin/horovodrun" --check-build | sed 's/^/[provision]   /'
fi
[ -x "$PREFIX/bin/python" ] || { echo "provision: $PREFIX/bin/python missing (install first)" >&2; exit 2; }

# ---- 2. modulefiles, rendered from env/modulefiles/*.in with the site's choices ---------------
# The site file and its nccl_env are read by hpc_asr/ops/site.py (the one parser) and copied into
# PREFIX/env/, where the modulefile points HPC_ASR_SITE (so `hpc-asr jobs` finds them after a load).
"$PREFIX/bin/python" -m hpc_asr.ops.site install --site "$SITE" --dest "$PREFIX/env" \
  | sed 's/^/[provision] site file: /'
mkdir -p "$MODDIR/hpc_asr"
"$PREFIX/bin/python" - "$ROOT" "$PREFIX/env/site.yaml" "$PREFIX" "$MODDIR/hpc_asr" "$VERSION" "$GPU" <<'PY'
import datetime, sys
from pathlib import Path

from hpc_asr.ops.site import load_site

root, site_path, prefix, out, version, gpu = sys.argv[1:]
site = load_site(site_path)
deps = site.modulefile.get("deps" if gpu == "1" else "cpu_deps") or []
env = site.nccl_vars()
from importlib.metadata import PackageNotFoundError, version as dist_version
try:
    torch_v, hvd_v = dist_version("torch"), dist_version("horovod")
except PackageNotFoundError:
    torch_v = hvd_v = "?"
subs = {
    "@VERSION@": version, "@PREFIX@": prefix, "@DATE@": datetime.date.today().isoformat(),
    "@FLAVOUR@": "GPU, NCCL" if gpu == "1" else "CPU", "@TORCH@": torch_v, "@HOROVOD@": hvd_v,
    # pushenv: unload puts back whatever value the user had before loading.
    "@DEPS_LUA@": "\n".join(f'depends_on("{d}")' for d in deps),
    "@DEPS_TCL@": "\n".join(f"module load {d}" for d in deps),
    "@ENV_LUA@": "\n".join(f'pushenv("{k.strip()}", "{v.strip()}")' for k, v in env),
    "@ENV_TCL@": "\n".join(f'pushenv {k.strip()} "{v.strip()}"' for k, v in env),
}
for src, name in (("hpc_asr.lua.in", f"{version}.lua"), ("hpc_asr.tcl.in", version)):
    text = (Path(root) / "env" / "modulefiles" / src).read_text()
    for k, v in subs.items():
        text = text.replace(k, v)
    (Path(out) / name).write_text(text)
    print(f"[provision] wrote {Path(out) / name}")
PY

# ---- 3. the final check: the module loads, with its dependencies, and runs this install -------
LOADED=$(set +eu; module use "$MODDIR" && module load "hpc_asr/$VERSION" 2>&1 && command -v python \
         && python -m hpc_asr --help >/dev/null 2>&1 && echo LOADED_OK) || true
case "$LOADED" in
  *"$PREFIX/bin/python"*LOADED_OK*) say "checked: module load hpc_asr/$VERSION (python: $PREFIX/bin/python)" ;;
  *) echo "provision: \`module load hpc_asr/$VERSION\` from $MODDIR failed:" >&2
     printf '%s\n' "$LOADED" | sed 's/^/provision:   /' >&2; exit 1 ;;
esac
say "done: module use $MODDIR && module load hpc_asr/$VERSION && python -m hpc_asr doctor"
