#!/usr/bin/env bash
# Every test: the systemd units' check, unit, property, storage conformance and the
# cluster tests that start real kiln processes on loopback ports, the container
# image and the compose cluster (where Docker runs), then `kiln demo` end to end
# (on its own cluster in a temporary directory, stopped afterwards).
# Chromium (Debian's package) renders the dashboard pages in the dashboard test.
source "$(dirname "$0")/env.sh"
kiln_install_packages chromium

# The systemd units are checked by systemd-analyze (Debian's systemd package,
# which works without systemd running); skipped only where it cannot be installed.
if command -v systemd-analyze >/dev/null 2>&1 ||
  { kiln_install_packages systemd && command -v systemd-analyze >/dev/null 2>&1; }; then
  deploy/systemd/verify.sh
else
  echo "SKIPPED deploy/systemd/verify.sh: systemd-analyze is missing and the systemd package could not be installed" >&2
fi

cargo build -p kiln-cli
# The real mlflow client's quickstart against a cluster (tests/tests/mlflow_client.rs)
# runs from a venv installed once; where it installed, that test must not skip. (Not a
# KILN_ variable: kiln refuses KILN_ variables it does not read, and the cluster
# tests' kiln processes inherit this environment.)
if [ -n "$(kiln_mlflow_python)" ]; then
  export EXPECT_MLFLOW_CLIENT=1
else
  echo "SKIPPED the mlflow client test: pip could not install its venv" >&2
fi
# NVIDIA's tritonclient calls the KServe v2 extensions (tests/tests/kserve_extensions.rs).
if [ -n "$(kiln_tritonclient_python)" ]; then
  export EXPECT_TRITONCLIENT=1
else
  echo "SKIPPED the tritonclient part of the KServe extensions test: pip could not install its venv" >&2
fi
# ONNX Runtime's library from PyPI's wheel: workers serve on it (the cluster tests'
# kiln processes inherit the variable), and the engine tests compare it with tract.
KILN_ONNXRUNTIME_LIB="$(kiln_onnxruntime_lib)"
if [ -n "$KILN_ONNXRUNTIME_LIB" ]; then
  export KILN_ONNXRUNTIME_LIB
else
  unset KILN_ONNXRUNTIME_LIB
  echo "SKIPPED the ONNX Runtime engine tests: pip could not install onnxruntime" >&2
fi
# Models from the real exporters (torchvision, transformers, skl2onnx), exported
# once into a cache (scripts/models.sh): served on ONNX Runtime against onnxruntime's
# own answers (tests/tests/real_models.rs).
source scripts/models.sh
EXPORTED_MODELS_DIR="$(kiln_exported_models)"
if [ -n "$EXPORTED_MODELS_DIR" ] && [ -n "${KILN_ONNXRUNTIME_LIB:-}" ]; then
  export EXPORTED_MODELS_DIR EXPECT_EXPORTED_MODELS=1
else
  echo "SKIPPED the exported models' test: the exporters or onnxruntime could not be installed" >&2
fi
# The users' own training code (tests/tests/command_jobs.rs): an unchanged
# PyTorch DDP script runs with the exporters' venv's torch (CPU, gloo).
TORCH_PYTHON="$(kiln_exporters_python)"
if [ -n "$TORCH_PYTHON" ]; then
  export TORCH_PYTHON
else
  echo "SKIPPED the PyTorch command job test: pip could not install torch" >&2
fi
cargo test --workspace -- --test-threads=2

# The GPU code's host side, in the `cuda` build: the row-major products mapped onto
# cuBLAS's arguments, the training pass on its host twin (the CUDA C kernels built
# by c++) against candle's, the kernels compiled by NVRTC (which must not skip when
# the wheel installed), and clear errors where there is no driver. The GPU runs
# skip themselves here (no GPU); scripts/device-check.sh runs them on one.
nvrtc_dir="$(kiln_nvrtc_dir)"
expect_nvrtc=1
if [ -z "$nvrtc_dir" ]; then
  echo "SKIPPED the NVRTC compile check: pip could not install nvidia-cuda-nvrtc-cu12" >&2
  expect_nvrtc=""
fi
KILN_TEST_EXPECT_NVRTC=$expect_nvrtc \
  LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+${nvrtc_dir:+:}$LD_LIBRARY_PATH}" \
  cargo test -p kiln-worker --features cuda --lib -- cuda:: train::gpu collective::nccl

# The container image and the compose cluster, where a Docker Engine runs: the
# image built from this binary, its smoke test, 3 coordinators and 3 workers in
# compose running `kiln demo --existing`, then the fault suite (about 4 minutes).
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 &&
  command -v docker-compose >/dev/null 2>&1; then
  kiln_install_packages debootstrap
  deploy/docker/build.sh --tag kiln:ci
  deploy/docker/smoke.sh --tag kiln:ci
  KILN_COMPOSE_IMAGE=kiln:ci deploy/compose/test.sh
  KILN_COMPOSE_IMAGE=kiln:ci deploy/compose/faults.sh
else
  echo "SKIPPED deploy/docker/smoke.sh, deploy/compose/test.sh and faults.sh: no Docker Engine with docker-compose here" >&2
fi

demo_dir="$(mktemp -d)"
trap '"$KILN_BIN" local down --dir "$demo_dir/cluster" >/dev/null 2>&1 || true; rm -rf "$demo_dir"' EXIT
"$KILN_BIN" demo --dir "$demo_dir/cluster" --base-port 17070
