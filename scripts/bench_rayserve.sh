#!/usr/bin/env bash
# kiln against Ray Serve (issue 19, Measured): the serving benchmark's MLP
# 32-256-256-10 (scripts/serving_model.py), torchvision's ResNet-18 at batch 1 and
# the transformers BERT classifier at sequence 64 (scripts/models.sh exports them
# once), each called with the same KServe v2 binary request by wrk (one thread,
# scripts/wrk.sh) at concurrency 1, 16 and 64, after a warm-up at 64.
#
#   kiln:      a local cluster (1 coordinator, 1 worker, TLS) on ONNX Runtime, one
#              replica with the machine's CPUs, over HTTPS, as scripts/bench_models.sh
#              measures it (--plain-http: the cluster made --insecure, over HTTP).
#   Ray Serve: scripts/ray_serve_app.py, onnxruntime in one replica with the same
#              CPUs behind Ray Serve's HTTP proxy, `@serve.batch` of up to 64 rows
#              and a 0.5 ms wait (kiln's batcher defaults), over plain HTTP.
#
# One system runs at a time: kiln's cluster measures every model and goes down,
# then Ray starts once per model and stops (its GCS, raylet and workers too) before
# the next. One answer from each side is checked against the other's. Prints a
# markdown table for docs/benchmarks.md.
#
#   scripts/bench_rayserve.sh [--seconds N] [--plain-http]
source "$(dirname "$0")/env.sh"
source "$(dirname "$0")/wrk.sh"
source "$(dirname "$0")/models.sh"
SECONDS_EACH=10
PLAIN_HTTP=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_EACH="$2"; shift 2 ;;
    --plain-http) PLAIN_HTTP=1; shift ;;
    *) echo "bench_rayserve.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
RAY_PINS="ray[serve]==2.60.0 onnxruntime==1.32.0 numpy==2.4.6"
# Longest Ray may take to start and deploy one model on a busy 2-core machine.
RAY_START_TIMEOUT_S=300
RAY_PORT="${RAY_PORT:-18100}"
CONCURRENCIES="1 16 64"

kiln_install_packages wrk
cargo build --workspace --bins >&2
models="$(kiln_exported_models)"
[ -n "$models" ] || { echo "bench_rayserve.sh: the models could not be exported" >&2; exit 1; }
py="$(kiln_exporters_python)"
[ -n "$py" ] || { echo "bench_rayserve.sh: no exporters venv" >&2; exit 1; }
lib="$(kiln_onnxruntime_lib)"
[ -n "$lib" ] || { echo "bench_rayserve.sh: no ONNX Runtime library" >&2; exit 1; }
ray_py="$(kiln_pinned_venv rayserve "$RAY_PINS")"
[ -n "$ray_py" ] || { echo "bench_rayserve.sh: Ray Serve's venv ($RAY_PINS) could not be installed" >&2; exit 1; }
cpus="$(nproc)"

work="$(mktemp -d)"
ray_tmp="$work/ray"
ray_pid=""
kiln_up=0

# Prints PID and its descendants, one a line.
process_tree() { # pid
  ps -eo pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END { for (p in parent) { q = p; while (q != root && q in parent && q > 1) q = parent[q]; if (q == root) print p } }'
}

# Stops the Ray application and every process of its Ray instance: the app asks
# Serve and Ray to shut down; whatever of its process tree (GCS, raylet, agents
# and the workers the raylet started: Serve's controller, proxy and replica) is
# left after that is killed.
stop_ray() {
  [ -n "$ray_pid" ] || return 0
  local tree
  tree="$(process_tree "$ray_pid")"
  kill -TERM "$ray_pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$ray_pid" 2>/dev/null || break
    sleep 0.2
  done
  # shellcheck disable=SC2086 # one pid per word
  kill -KILL $tree 2>/dev/null || true
  wait "$ray_pid" 2>/dev/null || true
  ray_pid=""
}
stop_kiln() {
  [ "$kiln_up" = 1 ] || return 0
  (cd "$work" && "$KILN_BIN" local down >/dev/null 2>&1) || true
  kiln_up=0
}
cleanup() {
  stop_ray
  stop_kiln
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The MLP of the serving benchmark, and KServe v2 binary bodies: the JSON header,
# then the tensors' little-endian bytes (the same bodies as scripts/bench_models.sh).
"$py" scripts/serving_model.py "$work/mlp.onnx"
"$py" scripts/kserve_bodies.py "$work"
# model name in kiln and Ray : its file : the name it has in the table
MODELS="mlp:$work/mlp.onnx:mlp resnet:$models/resnet18.onnx:resnet18 bert:$models/bert_seq64.onnx:bert_seq64"
for model in mlp resnet bert; do
  kiln_wrk_body_lua "$work" "$model"
done

# One answer to the benchmark's request, its headers in SIDE-MODEL.head and its
# body in SIDE-MODEL.body; the HTTP status on stdout.
answer() { # side model url
  curl -sk -o "$work/$1-$2.body" -D "$work/$1-$2.head" -w '%{http_code}' -X POST \
    -H 'Content-Type: application/octet-stream' \
    -H "Inference-Header-Content-Length: $(cat "$work/$2.len")" \
    --data-binary @"$work/$2.bin" "$3" || true
}

# wrk's own 2 s timeout would drop the slowest answers at concurrency 64 (a queue
# of 64 ResNet-18 runs on 2 cores) from its percentiles: kiln_wrk_measure runs this.
wrk() { command wrk --timeout 60s "$@"; }

# Warms the model up, then prints one "rps p99 non2xx" line per concurrency.
measure_all() { # model url
  kiln_wrk_measure "$work/$1.lua" "$2" 64 "${SECONDS_EACH}s" >/dev/null
  local c rps p50 p99 bad
  for c in $CONCURRENCIES; do
    read -r rps p50 p99 bad <<<"$(kiln_wrk_measure "$work/$1.lua" "$2" "$c" "${SECONDS_EACH}s")"
    echo "$rps $p99 $bad"
  done
}

# kiln: every model on one cluster, one deployment at a time.
scheme=https
up_flags=()
if [ "$PLAIN_HTTP" = 1 ]; then
  scheme=http
  up_flags=(--insecure)
fi
(cd "$work" && KILN_LOG=warn KILN_ONNXRUNTIME_LIB="$lib" "$KILN_BIN" local up "${up_flags[@]}" --coordinators 1 --workers 1 >/dev/null)
kiln_up=1
kiln() { (cd "$work" && KILN_ONNXRUNTIME_LIB="$lib" "$KILN_BIN" "$@"); }
addr="$(kiln status --json | "$py" -c 'import json,sys; print(json.load(sys.stdin)["workers"][0]["inference_http_addr"])')"
for entry in $MODELS; do
  IFS=: read -r model file _ <<<"$entry"
  kiln models register --onnx "$file" --name "$model" >&2
  kiln deploy "$model" --model "$model@1" --replicas 1 --cpus "$cpus" --public --engine onnxruntime --wait >&2
  # The worker's router learns the replica from its next heartbeat.
  for _ in $(seq 1 50); do
    [ "$(curl -sk -o /dev/null -w '%{http_code}' "$scheme://$addr/v2/models/$model/ready")" = 200 ] && break
    sleep 0.2
  done
  url="$scheme://$addr/v2/models/$model/infer"
  status="$(answer kiln "$model" "$url")"
  [ "$status" = 200 ] || { echo "$model on kiln: the check request answered $status" >&2; exit 1; }
  measure_all "$model" "$url" >"$work/kiln-$model.results"
  kiln deployments rm "$model" >&2
done
stop_kiln

# Ray Serve: one Ray instance per model, stopped before the next starts.
export RAY_USAGE_STATS_ENABLED=0
for entry in $MODELS; do
  IFS=: read -r model file _ <<<"$entry"
  mkdir -p "$ray_tmp"
  setsid "$ray_py" scripts/ray_serve_app.py "$file" --name "$model" --port "$RAY_PORT" \
    --cpus "$cpus" --temp-dir "$ray_tmp" >"$work/ray-$model.out" 2>"$work/ray-$model.err" &
  ray_pid=$!
  url="http://127.0.0.1:$RAY_PORT/v2/models/$model/infer"
  status=""
  for _ in $(seq 1 $((RAY_START_TIMEOUT_S * 2))); do
    kill -0 "$ray_pid" 2>/dev/null || break
    if grep -q '^ready$' "$work/ray-$model.out"; then
      status="$(answer ray "$model" "$url")"
      [ "$status" = 200 ] && break
    fi
    sleep 0.5
  done
  if [ "$status" != 200 ]; then
    echo "bench_rayserve.sh: Ray Serve did not serve $model (last status '${status}'); its log:" >&2
    tail -n 30 "$work/ray-$model.err" >&2
    exit 1
  fi
  measure_all "$model" "$url" >"$work/ray-$model.results"
  stop_ray
  rm -rf "$ray_tmp"
done

# The two answers to the same request must agree (same model, same onnxruntime).
for entry in $MODELS; do
  IFS=: read -r model _ _ <<<"$entry"
  "$ray_py" - "$work" "$model" <<'PYEOF' || { echo "$model: kiln's and Ray Serve's answers differ" >&2; exit 1; }
import json, sys
import numpy as np
work, model = sys.argv[1:]
DT = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4"}
def outputs(side):
    head = open(f"{work}/{side}-{model}.head").read().lower().splitlines()
    n = int(next(l.split(":", 1)[1] for l in head if l.startswith("inference-header-content-length:")))
    body = open(f"{work}/{side}-{model}.body", "rb").read()
    at, result = n, {}
    for o in json.loads(body[:n])["outputs"]:
        size = o["parameters"]["binary_data_size"]
        result[o["name"]] = np.frombuffer(body, DT[o["datatype"]], size // np.dtype(DT[o["datatype"]]).itemsize, at).reshape(o["shape"])
        at += size
    return result
kiln, ray = outputs("kiln"), outputs("ray")
assert kiln.keys() == ray.keys(), (kiln.keys(), ray.keys())
for name in kiln:
    assert np.allclose(kiln[name], ray[name], rtol=1e-3, atol=1e-4), name
PYEOF
done

transport="HTTPS (TLS)"
[ "$PLAIN_HTTP" = 1 ] && transport="plain HTTP"
echo "kiln over $transport, Ray Serve $(sed 's/.*ray\[serve\]==\([^ ]*\).*/\1/' <<<"$RAY_PINS") over plain HTTP; both on onnxruntime 1.32.0 with $cpus CPUs, batches of up to 64 rows after a 0.5 ms wait; wrk, 1 thread, ${SECONDS_EACH} s per point."
echo
echo "| model | concurrency | kiln req/s | kiln p99 ms | Ray Serve req/s | Ray Serve p99 ms | kiln / Ray req/s | Ray p99 / kiln p99 |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
# A figure that counts errors as answers is no figure: wrk counts non-2xx
# answers in its requests/s.
bad=0
for entry in $MODELS; do
  IFS=: read -r model _ label <<<"$entry"
  exec 3<"$work/kiln-$model.results" 4<"$work/ray-$model.results"
  for c in $CONCURRENCIES; do
    read -r k_rps k_p99 k_bad <&3
    read -r r_rps r_p99 r_bad <&4
    ratios="$(awk -v kr="$k_rps" -v rr="$r_rps" -v kp="$k_p99" -v rp="$r_p99" 'BEGIN {
      printf "%s %s", (rr > 0 ? sprintf("%.2f", kr / rr) : "n/a"), (kp > 0 ? sprintf("%.2f", rp / kp) : "n/a") }')"
    read -r rps_ratio p99_ratio <<<"$ratios"
    echo "| $label | $c | $k_rps | $k_p99 | $r_rps | $r_p99 | **$rps_ratio** | **$p99_ratio** |"
    if [ "$k_bad" != "0" ] || [ "$r_bad" != "0" ]; then
      echo "$label, concurrency $c: non-2xx answers: kiln $k_bad, Ray Serve $r_bad" >&2
      bad=1
    fi
  done
  exec 3<&- 4<&-
done
[ "$bad" = 0 ] || { echo "bench_rayserve.sh: some answers were errors; the table above is not a measurement" >&2; exit 1; }
