#!/usr/bin/env bash
# Tracking benchmark (issue 18): the real `mlflow` client logging 1,000 metrics one
# call at a time, 100 batches of 1,000 metrics, and one 1 GiB artifact
# (scripts/bench_mlflow.py), against `mlflow server --backend-store-uri
# sqlite:///FILE --serve-artifacts` and against a local kiln cluster (3
# coordinators replicating every write, 2 workers, TLS and a token), first with
# kiln's default per-token write limit (200/s), then with it lifted; on this
# machine, in this run. Prints a markdown table for docs/benchmarks.md.
#
# The 1 GiB upload is then repeated, the two sides in turn, for --rounds rounds in
# all (default 5), and the median ratio reported.
#
#   scripts/bench_tracking.sh [--metrics N] [--batches N] [--artifact-mb N] [--rounds N]
source "$(dirname "$0")/env.sh"
ROUNDS=5
ARTIFACT_MB=1024
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --artifact-mb) ARTIFACT_MB="$2"; ARGS+=("$1" "$2"); shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
PY="${PYTHON:-$(kiln_mlflow_python)}"
if [ -z "$PY" ]; then
  echo "error: no Python with mlflow (scripts/env.sh kiln_mlflow_python could not install it)" >&2
  exit 1
fi
cargo build -p kiln-cli >&2
work="$(mktemp -d)"
peer_pid=""
cleanup() {
  [ -n "$peer_pid" ] && kill "$peer_pid" 2>/dev/null
  (cd "$work" && "$KILN_BIN" local down >/dev/null 2>&1)
  rm -rf "$work"
}
trap cleanup EXIT

port=15000
"$(dirname "$PY")/mlflow" server --backend-store-uri "sqlite:///$work/mlflow.db" \
  --serve-artifacts --artifacts-destination "$work/mlartifacts" \
  --host 127.0.0.1 --port "$port" >"$work/mlflow.log" 2>&1 &
peer_pid=$!
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.5
done

kiln() { (cd "$work" && "$KILN_BIN" "$@"); }
# Starts a local cluster with the coordinator config $1 and points the mlflow
# variables of kiln_bench at it.
kiln_up() {
  kiln local down >/dev/null 2>&1 || true
  rm -rf "$work/.kiln"
  printf '%b' "$1" >"$work/coordinator.toml"
  (cd "$work" && KILN_LOG=warn "$KILN_BIN" local up --coordinators 3 --workers 2 \
    --config "$work/coordinator.toml" >/dev/null)
  local http
  http="$(kiln status --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["coordinators"][0]["http_addr"])')"
  kiln_uri="https://$http"
  kiln_ca="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["ca"])' "$work/.kiln/cluster.json")"
  kiln_token="$(cat "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["token_file"])' "$work/.kiln/cluster.json")")"
}
kiln_bench() {
  MLFLOW_TRACKING_URI="$kiln_uri" MLFLOW_TRACKING_TOKEN="$kiln_token" \
    MLFLOW_TRACKING_SERVER_CERT_PATH="$kiln_ca" "$PY" scripts/bench_mlflow.py "$@" | tail -1
}
peer_bench() {
  MLFLOW_TRACKING_URI="http://127.0.0.1:$port" "$PY" scripts/bench_mlflow.py "$@" | tail -1
}

echo "mlflow server ..." >&2
peer="$(peer_bench "${ARGS[@]}")"
echo "$peer" >&2
echo "kiln, default limits ..." >&2
kiln_up '[limits]\n'
kiln_default="$(kiln_bench "${ARGS[@]}")"
echo "$kiln_default" >&2
echo "kiln, limits lifted ..." >&2
kiln_up '[limits]\ntoken_writes_per_sec = 0\n'
kiln_open="$(kiln_bench "${ARGS[@]}")"
echo "$kiln_open" >&2
# The artifact upload varies most from run to run on a shared 2-core machine: more
# rounds, the two sides in turn, each file synced before it is timed.
uploads=()
for round in $(seq 2 "$ROUNDS"); do
  p="$(peer_bench --metrics 0 --batches 0 --artifact-mb "$ARTIFACT_MB")"
  k="$(kiln_bench --metrics 0 --batches 0 --artifact-mb "$ARTIFACT_MB")"
  echo "artifact round $round: mlflow $p kiln $k" >&2
  uploads+=("$p" "$k")
done

"$PY" - "$peer" "$kiln_default" "$kiln_open" "${uploads[@]}" <<'PYEOF'
import json, statistics, sys
peer, default, lifted = (json.loads(a) for a in sys.argv[1:4])
rounds = [json.loads(a) for a in sys.argv[4:]]
rows = [("log_metric calls/s", "log_metric_per_s"),
        ("metrics/s in log_batch (1,000 a call)", "log_batch_metrics_per_s")]
print("| figure | mlflow server (sqlite) | kiln, default limits | ratio | kiln, limits lifted | ratio |")
print("|---|---|---|---|---|---|")
for title, key in rows:
    if key not in peer:
        continue
    p, d, o = peer[key], default[key], lifted[key]
    print(f"| {title} | {p:,.1f} | {d:,.1f} | {d / p:.2f}x | {o:,.1f} | {o / p:.2f}x |")
key = "log_artifact_mb_per_s"
if key in peer:
    p, d, o = peer[key], default[key], lifted[key]
    print(f"| log_artifact MB/s, round 1 | {p:,.1f} | {d:,.1f} | {d / p:.2f}x | {o:,.1f} | {o / p:.2f}x |")
    peers = [p] + [r[key] for r in rounds[0::2]]
    kilns = [o] + [r[key] for r in rounds[1::2]]
    ratios = [k / q for q, k in zip(peers, kilns)]
    print()
    print(f"log_artifact over {len(peers)} rounds, in turn (kiln with limits lifted; the write limit does not apply to bytes):")
    print()
    print("| round | mlflow server MB/s | kiln MB/s | ratio |")
    print("|---|---|---|---|")
    for i, (q, k) in enumerate(zip(peers, kilns), 1):
        print(f"| {i} | {q:,.1f} | {k:,.1f} | {k / q:.2f}x |")
    print(f"| median | {statistics.median(peers):,.1f} | {statistics.median(kilns):,.1f} | **{statistics.median(ratios):.2f}x** |")
PYEOF
