#!/usr/bin/env bash
# Install what graphopt's ARM (aarch64) tests need on a Debian/Ubuntu x86-64 machine:
#
#   1. apt: g++-aarch64-linux-gnu (cross compiler + aarch64 libc/libstdc++) and qemu-user-static (qemu-aarch64)
#   2. an aarch64 Python runtime for qemu-user, in $GRAPHOPT_AARCH64_ROOT (default ~/.cache/graphopt/aarch64-runtime):
#        sysroot/  Debian's arm64 python3.X + the shared libraries it and TVM need (extracted .debs, nothing
#                  is installed into the system: a private apt state downloads them)
#        site/     PyPI's aarch64 wheels of apache-tvm / apache-tvm-ffi (the host's versions, runtime only:
#                  libtvm_compiler.so is removed), numpy, ml_dtypes, cloudpickle, psutil
#        bin/python3  wrapper: runs the aarch64 python under qemu with the variables below
#
# The runtime serves `python -m tvm.exec.rpc_server` (or graphopt's faster rpc_device_server.py) under qemu, so
# TVM's RPC uploads an aarch64 library built here and runs it "remotely" (tests/backends/test_arm.py).
#
# Idempotent: when everything is in place (same TVM versions), it exits in well under a second.
# Usage: scripts/setup_cross.sh [--force]      (--force rebuilds the aarch64 runtime)
set -euo pipefail

ROOT="${GRAPHOPT_AARCH64_ROOT:-$HOME/.cache/graphopt/aarch64-runtime}"
FORMAT=1
PYTHON="${PYTHON:-python3}"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

log() { echo "setup_cross: $*" >&2; }
die() { log "error: $*"; exit 1; }

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi

# ------------------------------------------------------------------------------------------ 1. apt packages
need_apt=()
command -v aarch64-linux-gnu-g++ >/dev/null || need_apt+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user-static)
if (( ${#need_apt[@]} )); then
    command -v apt-get >/dev/null || die "apt-get not found: install ${need_apt[*]} with your package manager"
    [[ $(id -u) -eq 0 || -n "$SUDO" ]] || die "installing ${need_apt[*]} needs root (or passwordless sudo)"
    log "apt-get install ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
QEMU="$(command -v qemu-aarch64-static || command -v qemu-aarch64)"

# ------------------------------------------------------------------------------- 2. aarch64 Python runtime
TVM_VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("apache-tvm"))')" \
    || die "apache-tvm is not installed for $PYTHON"
FFI_VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')" \
    || die "apache-tvm-ffi is not installed for $PYTHON"
WANT="format=$FORMAT tvm=$TVM_VERSION tvm-ffi=$FFI_VERSION"
MARKER="$ROOT/graphopt-runtime.txt"
if [[ $FORCE -eq 0 && -f "$MARKER" && -x "$ROOT/bin/python3" ]] && grep -qxF "$WANT" "$MARKER"; then
    log "aarch64 runtime already in $ROOT ($WANT)"
    exit 0
fi

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "apt-get and dpkg-deb are needed"
BUILD="$ROOT.partial.$$"
rm -rf "$BUILD"
trap 'rm -rf "$BUILD"' EXIT
mkdir -p "$BUILD"/{apt/lists/partial,apt/cache/archives/partial,debs,sysroot,site,bin}
APT=(-o "Dir::State::Lists=$BUILD/apt/lists" -o "Dir::Cache=$BUILD/apt/cache" -o "APT::Architecture=arm64"
     -o "APT::Architectures::=arm64" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" -qq)

log "arm64 package lists (private apt state, the system's dpkg is not touched)"
apt-get "${APT[@]}" update
PYPKG="$(apt-cache "${APT[@]}" depends python3-minimal:arm64 2>/dev/null | grep -o 'python3\.[0-9]*-minimal' | head -1)"
[[ -n "$PYPKG" ]] || die "no arm64 python3-minimal in this distribution's apt sources"
PYV="${PYPKG#python}"; PYV="${PYV%-minimal}"          # e.g. 3.11
CPTAG="cp${PYV/./}"

log "downloading arm64 python$PYV and libraries"
(cd "$BUILD/debs" && apt-get "${APT[@]}" download \
    "python$PYV-minimal:arm64" "libpython$PYV-minimal:arm64" "libpython$PYV-stdlib:arm64" \
    libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 libgomp1:arm64 libexpat1:arm64 zlib1g:arm64 libffi8:arm64 \
    libbz2-1.0:arm64 liblzma5:arm64 libcrypt1:arm64 libssl3:arm64 libuuid1:arm64 libsqlite3-0:arm64 \
    libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 >/dev/null)
for deb in "$BUILD"/debs/*.deb; do dpkg-deb -x "$deb" "$BUILD/sysroot"; done

log "aarch64 wheels: apache-tvm==$TVM_VERSION apache-tvm-ffi==$FFI_VERSION ($CPTAG)"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$BUILD/site" \
    --only-binary=:all: --implementation cp --python-version "$PYV" \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" cloudpickle psutil 2>&1 \
    | grep -v -e "^WARNING: Location" -e "WARNING: Running pip as" >&2 || true
[[ -d "$BUILD/site/tvm" && -d "$BUILD/site/tvm_ffi" ]] || die "pip could not install the aarch64 TVM wheels"
rm -f "$BUILD"/site/tvm/lib/libtvm_compiler.so          # runtime only (~250 MB); TVM_USE_RUNTIME_LIB=1 below

# sys.executable must be the wrapper, so that TVM's worker processes (PopenWorker) start under qemu too.
cat > "$BUILD/site/sitecustomize.py" <<'EOF'
import os
import sys

_exe = os.environ.get("GRAPHOPT_GUEST_PYTHON")
if _exe:
    sys.executable = _exe
EOF
cat > "$BUILD/bin/python3" <<EOF
#!/bin/sh
# aarch64 python$PYV with TVM's runtime, under qemu-user (written by graphopt's scripts/setup_cross.sh)
R="\$(cd "\$(dirname "\$0")/.." && pwd)"
unset PYTHONHOME PYTHONSTARTUP LD_LIBRARY_PATH LD_PRELOAD
export QEMU_LD_PREFIX="\$R/sysroot" PYTHONPATH="\$R/site" PYTHONNOUSERSITE=1 TVM_USE_RUNTIME_LIB=1 \\
       GRAPHOPT_GUEST_PYTHON="\$R/bin/python3"
exec "\${GRAPHOPT_QEMU_AARCH64:-$QEMU}" "\$R/sysroot/usr/bin/python$PYV" "\$@"
EOF
chmod +x "$BUILD/bin/python3"

log "smoke test: import tvm under qemu-aarch64"
"$BUILD/bin/python3" -c 'import platform, tvm, tvm.rpc; assert platform.machine() == "aarch64"; print("aarch64 tvm", tvm.__version__)' >&2 \
    || die "the aarch64 runtime does not start under $QEMU"
rm -rf "$BUILD/apt" "$BUILD/debs"
echo "$WANT" > "$BUILD/graphopt-runtime.txt"
rm -rf "$ROOT"
mkdir -p "$(dirname "$ROOT")"
mv "$BUILD" "$ROOT"
trap - EXIT
log "aarch64 runtime ready in $ROOT"
