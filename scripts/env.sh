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

# Prints the path of ONNX Runtime's library for serving (worker --onnxruntime-lib,
# KILN_ONNXRUNTIME_LIB): PyPI's onnxruntime wheel, of the version the MLflow venv
# pins, unpacked once under the target directory without its dependencies (only
# onnxruntime/capi/libonnxruntime.so.* is used). Prints nothing when it cannot be
# installed; the tests that need it then say they skipped.
kiln_onnxruntime_lib() {
  local root="$CARGO_TARGET_DIR/onnxruntime-1.32.0"
  local lib="$root/onnxruntime/capi/libonnxruntime.so.1.32.0"
  if [ ! -f "$lib" ]; then
    kiln_install_packages python3-pip >&2
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "$root" "onnxruntime==1.32.0" >&2 || true
  fi
  if [ -f "$lib" ]; then
    echo "$lib"
  fi
}

# Prints the python of a virtual environment with the real MLflow client and what
# its quickstart needs (onnx; onnxruntime, which mlflow.onnx.save_model imports;
# matplotlib; numpy), installed once from PyPI under the target directory, for the
# test that drives kiln's coordinators with it. A half-made venv has no marker (the
# pins) and is made again; a lock keeps two callers from making it at once. Prints
# nothing when it cannot be installed; the test then says it skipped.
kiln_mlflow_python() {
  kiln_pinned_venv mlflow "mlflow==3.17.2 onnx==1.23.2 onnxruntime==1.32.0 matplotlib==3.11.2 numpy==2.4.6 scikit-learn==1.9.1"
}

# NVIDIA's tritonclient (HTTP and gRPC), for the test that calls kiln's KServe v2
# extensions with it (tests/tests/kserve_extensions.rs). Prints nothing when it
# cannot be installed.
kiln_tritonclient_python() {
  kiln_pinned_venv tritonclient "tritonclient[http,grpc]==2.73.0 numpy==2.4.6"
}

# Prints the python of the virtual environment "$CARGO_TARGET_DIR/venvs/NAME" with
# exactly PINS installed from PyPI, made once. A half-made venv has no marker (the
# pins) and is made again; a lock keeps two callers from making it at once. Prints
# nothing when it cannot be installed.
kiln_pinned_venv() { # NAME PINS
  local venv="$CARGO_TARGET_DIR/venvs/$1"
  local pins="$2"
  local marker="$venv/kiln-pins.txt"
  mkdir -p "$CARGO_TARGET_DIR/venvs" 2>/dev/null || return 0
  (
    flock -w 1800 9 || exit 0
    [ "$(cat "$marker" 2>/dev/null)" = "$pins" ] && exit 0
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >&2 2>/dev/null; then
      rm -rf "$venv"
      kiln_install_packages python3-venv >&2 || true
      python3 -m venv "$venv" >&2 || exit 0
    fi
    # shellcheck disable=SC2086 # one argument per pin
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      $pins >&2 || exit 0
    echo "$pins" >"$marker"
  ) 9>"$CARGO_TARGET_DIR/venvs/$1.lock" || true
  if [ "$(cat "$marker" 2>/dev/null)" = "$pins" ]; then
    echo "$venv/bin/python"
  fi
}
