#!/usr/bin/env bash
# Real models through kiln against onnxruntime in-process (issue 19, Measured):
# torchvision's ResNet-18 at batch 1 and the transformers BERT classifier at
# sequence 64 (scripts/models.sh exports them once), served by a local cluster
# (1 coordinator, 1 worker, TLS) on ONNX Runtime, one replica with the machine's
# CPUs, called with KServe v2 binary requests over HTTPS by wrk (one thread) at
# concurrency 1 and 16; then onnxruntime in Python on the same file with the same
# threads (scripts/bench_onnxruntime.py): its batch-1 p50 and its best batched
# throughput. Prints a markdown table for docs/benchmarks.md.
#
#   scripts/bench_models.sh [--seconds N]
source "$(dirname "$0")/env.sh"
source "$(dirname "$0")/wrk.sh"
source "$(dirname "$0")/models.sh"
SECONDS_EACH=10
while [ "$#" -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_EACH="$2"; shift 2 ;;
    *) echo "bench_models.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
kiln_install_packages wrk
cargo build --workspace --bins >&2
models="$(kiln_exported_models)"
[ -n "$models" ] || { echo "bench_models.sh: the models could not be exported" >&2; exit 1; }
py="$(kiln_exporters_python)"
lib="$(kiln_onnxruntime_lib)"
[ -n "$lib" ] || { echo "bench_models.sh: no ONNX Runtime library" >&2; exit 1; }
threads="$(nproc)"

work="$(mktemp -d)"
cleanup() {
  (cd "$work" && "$KILN_BIN" local down >/dev/null 2>&1)
  rm -rf "$work"
}
trap cleanup EXIT

# KServe v2 binary bodies: the JSON header, then the tensors' little-endian bytes.
"$py" scripts/kserve_bodies.py "$work"
for model in resnet bert; do
  kiln_wrk_body_lua "$work" "$model"
done

(cd "$work" && KILN_LOG=warn KILN_ONNXRUNTIME_LIB="$lib" "$KILN_BIN" local up --coordinators 1 --workers 1 >/dev/null)
kiln() { (cd "$work" && KILN_ONNXRUNTIME_LIB="$lib" "$KILN_BIN" "$@"); }
addr="$(kiln status --json | "$py" -c 'import json,sys; print(json.load(sys.stdin)["workers"][0]["inference_http_addr"])')"

measure() { # model concurrency
  kiln_wrk_measure "$work/$1.lua" "https://$addr/v2/models/$1/infer" "$2" "${SECONDS_EACH}s"
}

# Deploys MODEL@1 alone on ENGINE and measures it; prints "p50_c1 rps_c16 p99_c16".
serve_and_measure() { # model engine
  kiln deploy "$1" --model "$1@1" --replicas 1 --cpus "$threads" --public --engine "$2" --wait >&2
  for _ in $(seq 1 50); do
    [ "$(curl -sk -o /dev/null -w '%{http_code}' "https://$addr/v2/models/$1/ready")" = 200 ] && break
    sleep 0.2
  done
  measure "$1" 1 >/dev/null # warm-up
  local c1_rps c1_p50 c1_p99 c1_bad c16_rps c16_p50 c16_p99 c16_bad
  read -r c1_rps c1_p50 c1_p99 c1_bad <<<"$(measure "$1" 1)"
  read -r c16_rps c16_p50 c16_p99 c16_bad <<<"$(measure "$1" 16)"
  if [ "$c1_bad" != "0" ] || [ "$c16_bad" != "0" ]; then
    echo "$1 on $2: non-2xx answers: $c1_bad at c=1, $c16_bad at c=16" >&2
  fi
  kiln deployments rm "$1" >&2
  echo "$c1_p50 $c16_rps $c16_p99"
}

table=""
engines=""
for pair in "resnet:resnet18" "bert:bert_seq64"; do
  model="${pair%%:*}" file="${pair#*:}"
  kiln models register --onnx "$models/$file.onnx" --name "$model" >&2
  read -r c1_p50 c16_rps c16_p99 <<<"$(serve_and_measure "$model" onnxruntime)"
  read -r t_p50 t_rps t_p99 <<<"$(serve_and_measure "$model" tract)"
  ort="$("$py" scripts/bench_onnxruntime.py "$models/$file.onnx" "$file" --seconds "$((SECONDS_EACH / 2 + 1))")"
  read -r ort_p50 ort_best <<<"$("$py" -c '
import json, sys
r = json.loads(sys.argv[1])
print(r["latency_batch1"]["threads_" + sys.argv[2]]["p50_ms"], r["throughput_threads_2"]["best_rows_per_s"])' "$ort" "$threads")"
  goal="$(awk -v o="$ort_p50" 'BEGIN { printf "%.2f", o * 1.1 + 1 }')"
  ratio="$(awk -v a="$c16_rps" -v b="$ort_best" 'BEGIN { printf "%.2f", a / b }')"
  table+="| $file | $c1_p50 | $ort_p50 | $goal | $c16_rps ($c16_p99) | $ort_best | **$ratio** |"$'\n'
  speedup="$(awk -v a="$c16_rps" -v b="$t_rps" 'BEGIN { printf "%.1f", a / b }')"
  engines+="| $file | $c1_p50 | $t_p50 | $c16_rps | $t_rps | **${speedup}x** |"$'\n'
done
echo "| model | kiln p50 ms, c=1 | onnxruntime p50 ms, batch 1, $threads threads | p50 goal (ort + 1 ms + 10%) | kiln req/s, c=16 (p99 ms) | onnxruntime best rows/s | kiln / onnxruntime |"
echo "|---|---:|---:|---:|---:|---:|---:|"
printf '%s' "$table"
echo
echo "| model | p50 ms, c=1, onnxruntime | p50 ms, c=1, tract | req/s, c=16, onnxruntime | req/s, c=16, tract | onnxruntime / tract |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s' "$engines"
