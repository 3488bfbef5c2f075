#!/usr/bin/env bash
# The GPU check of kiln's NCCL all-reduce, for a machine with an NVIDIA driver and
# nothing else assumed: no network, no Rust toolchain, maybe no CUDA toolkit. It
# runs a kiln built elsewhere with `--features kiln-cli/cuda`.
#
#   scripts/device-check.sh [path/to/kiln] [path/to/kiln_worker-test-binary]
#
# (or KILN_BIN=... WORKER_TESTS_BIN=...; kiln refuses KILN_* variables it does
# not know, hence the second name). It prints the GPUs, finds libnccl
# (ldconfig, the usual library directories, Python's nvidia-nccl wheels, conda),
# puts it on LD_LIBRARY_PATH under a name cudarc opens (cudarc looks for
# libnccl.so, not NCCL's soname libnccl.so.2, so a link is made in a scratch
# directory), then runs `kiln bench nccl` with one rank, and with one rank per GPU
# when there are several; `kiln bench train --gpu 0` (the training pass on the
# GPU against PyTorch's on the same GPU, when a python3 there has torch); and
# scripts/gpu-job.sh (one training job on the GPU through a local cluster). It
# finds libcublas and libnvrtc as it finds libnccl. With a kiln-worker test binary
# built with the cuda feature, it also runs the collective::nccl, train::gpu and
# cuda unit tests on the GPU. Either binary
# may come gzipped (name ending in .gz), to fit a carry limit.
#
# Exit status: 0 when every run passed; the first failure's status otherwise.
set -u

kiln=${1:-${KILN_BIN:-./kiln}}
worker_tests=${2:-${WORKER_TESTS_BIN:-}}
# Run from the repository root (`kiln bench train --python` finds the PyTorch
# script under scripts/, and gpu-job.sh sits beside this one), with the binaries'
# paths made absolute first.
kiln=$(readlink -f "$kiln")
[ -n "$worker_tests" ] && worker_tests=$(readlink -f "$worker_tests")
cd "$(dirname "$0")/.."
run_timeout_s=${RUN_TIMEOUT_S:-240}
sizes=${NCCL_SIZES:-1M,64M,256M}
status=0

section() { printf '\n=== %s\n' "$*"; }
note_failure() { [ "$status" -ne 0 ] || status=$1; }

section "machine"
uname -a
[ -r /etc/os-release ] && . /etc/os-release && echo "${PRETTY_NAME:-}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi
  nvidia-smi --query-gpu=index,name,pci.bus_id,memory.total,driver_version --format=csv
  gpus=$(nvidia-smi --list-gpus | grep -c '^GPU ')
else
  echo "nvidia-smi not found"
  gpus=0
fi
echo "GPUs: $gpus"

section "libcuda (driver)"
ldconfig -p | grep -E 'libcuda\.so' || echo "libcuda not in the ldconfig cache"
extra_dirs=()
for d in /usr/local/nvidia/lib64 /usr/lib/wsl/lib; do
  if ls "$d"/libcuda.so* >/dev/null 2>&1; then
    echo "libcuda in $d"
    extra_dirs+=("$d")
  fi
done

# Python site directories, where pip's nvidia-* wheels (as torch installs them)
# put the CUDA libraries.
pythons=()
for py in python3 python /opt/conda/bin/python /usr/local/bin/python3; do
  command -v "$py" >/dev/null 2>&1 && pythons+=("$py")
done
site_dirs=()
for py in ${pythons[@]+"${pythons[@]}"}; do
  while read -r d; do [ -n "$d" ] && site_dirs+=("$d"); done < <(
    "$py" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))' 2>/dev/null
  )
done
site_dirs+=(/usr/lib/python3*/dist-packages /usr/local/lib/python3*/dist-packages
  /usr/local/lib/python3*/site-packages "${HOME:-/root}"/.local/lib/python3*/site-packages
  /opt/conda/lib/python3*/site-packages)

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
lib_dirs=()

# find_library NAME: finds libNAME.so* (ldconfig, the usual library directories,
# the CUDA toolkit, Python's nvidia wheels, conda) and links it into the scratch
# directory as libNAME.so, the name cudarc opens first (cudarc does not search
# sonames such as libnccl.so.2 or CUDA 13's libcublas.so.13). The real file's
# directory goes on LD_LIBRARY_PATH too, for the libraries it needs in turn.
find_library() {
  local name=$1 found="" f dir real
  local candidates=()
  section "lib$name"
  while read -r f; do
    [ -n "$f" ] && candidates+=("$f")
  done < <(ldconfig -p | awk -v n="lib$name.so" 'index($1, n) == 1 {print $NF}')
  for dir in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib \
    /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 /usr/local/cuda/targets/*/lib \
    /usr/local/cuda-*/targets/*/lib /usr/local/lib /opt/conda/lib /opt/nccl/lib \
    /usr/local/nccl/lib; do
    for f in "$dir"/lib"$name".so*; do [ -e "$f" ] && candidates+=("$f"); done
  done
  for d in "${site_dirs[@]}"; do
    for f in "$d"/nvidia/*/lib/lib"$name".so* "$d"/nvidia/lib/lib"$name".so*; do
      [ -e "$f" ] && candidates+=("$f")
    done
  done
  for f in ${candidates[@]+"${candidates[@]}"}; do
    case $f in *.alt.so* | *builtins*) continue ;; esac
    real=$(readlink -f "$f")
    echo "found $f -> $real"
    [ -z "$found" ] && found=$real
  done
  if [ -z "$found" ]; then
    echo "no lib$name on this machine: kiln must fail below with a clear 'lib$name not found'"
    return
  fi
  ln -sf "$found" "$scratch/lib$name.so"
  case $name in nccl) ln -sf "$found" "$scratch/libnccl.so.2" ;; esac
  lib_dirs+=("$(dirname "$found")")
  echo "using $found (linked as $scratch/lib$name.so)"
}

find_library nccl
[ -e "$scratch/libnccl.so" ] &&
  { strings "$scratch/libnccl.so" 2>/dev/null | grep -m1 -E '^NCCL version' || true; }
find_library cublas
find_library nvrtc

lib_path=$scratch
for d in ${extra_dirs[@]+"${extra_dirs[@]}"} ${lib_dirs[@]+"${lib_dirs[@]}"}; do
  lib_path=$lib_path:$d
done
export LD_LIBRARY_PATH=$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# CUDA ordinals in the order of nvidia-smi and NVML.
export CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER:-PCI_BUS_ID}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# Unpacks a gzipped binary into the scratch directory; prints the path to run.
unpacked() {
  case $1 in
    *.gz)
      local out
      out=$scratch/$(basename "${1%.gz}")
      gzip -dc "$1" >"$out" && chmod +x "$out" && echo "$out"
      ;;
    *) echo "$1" ;;
  esac
}

section "kiln"
kiln=$(unpacked "$kiln")
if [ ! -x "$kiln" ]; then
  echo "no kiln binary at $kiln (pass its path, or set KILN_BIN)"
  exit 2
fi
ls -l "$kiln"
"$kiln" --version || true

run() {
  echo
  echo "\$ $*"
  timeout "$run_timeout_s" "$@"
  local rc=$?
  echo "exit status $rc"
  note_failure "$rc"
}

section "one rank"
run "$kiln" bench nccl --ranks 1 --bytes "$sizes" --iters 20
run "$kiln" bench nccl --ranks 1 --bytes 64M --iters 20 --json
if [ "$gpus" -gt 1 ]; then
  section "$gpus ranks, one per GPU"
  run "$kiln" bench nccl --ranks "$gpus" --bytes "$sizes" --iters 20
  run env NCCL_ALGO=Ring "$kiln" bench nccl --ranks "$gpus" --bytes 256M --iters 20
fi

section "the training pass on the GPU, against PyTorch on the same GPU"
torch_python=""
for py in ${pythons[@]+"${pythons[@]}"}; do
  if "$py" -c 'import torch' >/dev/null 2>&1; then torch_python=$py; break; fi
done
if [ -n "$torch_python" ]; then
  run "$kiln" bench train --gpu 0 --steps 2000 --python "$torch_python"
else
  run "$kiln" bench train --gpu 0 --steps 2000
fi

section "a training job on the GPU through a local cluster"
# gpu-job.sh gives the job 150 s of its own, inside this run's limit.
run scripts/gpu-job.sh "$kiln"

section "an out-of-range rank count fails clearly"
"$kiln" bench nccl --ranks $((gpus + 1)) --bytes 1M && note_failure 1

if [ -n "$worker_tests" ]; then
  section "kiln-worker unit tests on the GPU (collective::nccl, train::gpu, cuda)"
  worker_tests=$(unpacked "$worker_tests")
  if [ -x "$worker_tests" ]; then
    echo "\$ $worker_tests collective::nccl train::gpu cuda:: --test-threads=1 --nocapture"
    out=$(timeout "$run_timeout_s" "$worker_tests" collective::nccl train::gpu cuda:: \
      --test-threads=1 --nocapture 2>&1)
    rc=$?
    echo "$out"
    echo "exit status $rc"
    note_failure "$rc"
    if [ "$gpus" -gt 0 ] && grep -q 'skipped: no CUDA driver' <<<"$out"; then
      echo "the GPU tests skipped themselves on a machine with $gpus GPU(s)"
      note_failure 3
    fi
  else
    echo "no test binary at $worker_tests"
    note_failure 2
  fi
fi

section "result"
echo "status $status"
exit "$status"
