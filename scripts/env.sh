# Shared set-up of kiln's scripts: system packages and the cargo target directory.
# Sourced, not run.
set -euo pipefail

KILN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$KILN_ROOT"

# Installs the Debian packages the build needs (protoc for the protobuf contract,
# libclang for RocksDB's bindings), only when something is missing.
kiln_install_packages() {
  local missing=()
  command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
  command -v clang >/dev/null 2>&1 || missing+=(clang)
  # bindgen loads the unversioned libclang.so, which only libclang-dev provides.
  compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || missing+=(libclang-dev)
  command -v c++ >/dev/null 2>&1 || missing+=(build-essential)
  if [ "$#" -gt 0 ]; then
    for extra in "$@"; do
      dpkg -s "$extra" >/dev/null 2>&1 || missing+=("$extra")
    done
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing packages: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# One target directory for tests, the demo and benchmarks (one profile: dev with
# optimised dependencies). A machine-wide cache is reused when it exists, so a
# clean clone does not rebuild RocksDB; without it the build goes to ./target.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if [ -d /var/cache/kiln/target ] && [ -w /var/cache/kiln/target ]; then
    export CARGO_TARGET_DIR=/var/cache/kiln/target
  else
    export CARGO_TARGET_DIR="$KILN_ROOT/target"
  fi
fi
export KILN_BIN="$CARGO_TARGET_DIR/debug/kiln"

# Prints the directory of a libnvrtc for the `cuda` build's host-side tests (the
# training kernels compiled by NVRTC, which needs no GPU): pip's
# nvidia-cuda-nvrtc-cu12 wheel, installed once under the target directory. Prints
# nothing when it cannot be installed; the test then says it skipped.
kiln_nvrtc_dir() {
  local root="$CARGO_TARGET_DIR/nvrtc"
  local lib="$root/nvidia/cuda_nvrtc/lib"
  if ! compgen -G "$lib/libnvrtc.so.*" >/dev/null; then
    kiln_install_packages python3-pip >&2
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "$root" "nvidia-cuda-nvrtc-cu12==12.9.86" >&2 || true
  fi
  if compgen -G "$lib/libnvrtc.so.*" >/dev/null; then
    echo "$lib"
  fi
}
