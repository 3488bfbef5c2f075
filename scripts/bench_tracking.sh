#!/usr/bin/env bash
# Tracking benchmark (issue 18): the real `mlflow` client logging 1,000 metrics one
# call at a time, 100 batches of 1,000 metrics, and one 1 GiB artifact
# (scripts/bench_mlflow.py), against `mlflow server --backend-store-uri
# sqlite:///FILE --serve-artifacts` and against a local kiln cluster (3
# coordinators replicating every write, 2 workers, TLS and a token), first with
# kiln's default per-token write limit (200/s), then with it lifted; on this
# machine, in this run. Prints a markdown table for docs/benchmarks.md.
#
#   scripts/bench_tracking.sh [--metrics N] [--batches N] [--artifact-mb N]
source "$(dirname "$0")/env.sh"
ARGS=("$@")
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
echo "mlflow server ..." >&2
# The figures are the script's last line (the client may print above it).
peer="$(MLFLOW_TRACKING_URI="http://127.0.0.1:$port" "$PY" scripts/bench_mlflow.py "${ARGS[@]}" | tail -1)"
echo "$peer" >&2

kiln() { (cd "$work" && "$KILN_BIN" "$@"); }
kiln_run() {
  kiln local down >/dev/null 2>&1 || true
  rm -rf "$work/.kiln"
  printf '%b' "$1" >"$work/coordinator.toml"
  (cd "$work" && KILN_LOG=warn "$KILN_BIN" local up --coordinators 3 --workers 2 \
    --config "$work/coordinator.toml" >/dev/null)
  local http ca token
  http="$(kiln status --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["coordinators"][0]["http_addr"])')"
  ca="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["ca"])' "$work/.kiln/cluster.json")"
  token="$(cat "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["token_file"])' "$work/.kiln/cluster.json")")"
  MLFLOW_TRACKING_URI="https://$http" MLFLOW_TRACKING_TOKEN="$token" \
    MLFLOW_TRACKING_SERVER_CERT_PATH="$ca" "$PY" scripts/bench_mlflow.py "${ARGS[@]}"
}
echo "kiln, default limits ..." >&2
kiln_default="$(kiln_run '[limits]\n' | tail -1)"
echo "$kiln_default" >&2
echo "kiln, limits lifted ..." >&2
kiln_open="$(kiln_run '[limits]\ntoken_writes_per_sec = 0\n' | tail -1)"
echo "$kiln_open" >&2

"$PY" - "$peer" "$kiln_default" "$kiln_open" <<'PYEOF'
import json, sys
peer, default, lifted = (json.loads(a) for a in sys.argv[1:4])
rows = [("log_metric calls/s", "log_metric_per_s"),
        ("metrics/s in log_batch (1,000 a call)", "log_batch_metrics_per_s"),
        ("log_artifact MB/s (1 GiB file)", "log_artifact_mb_per_s")]
print("| figure | mlflow server (sqlite) | kiln, default limits | ratio | kiln, limits lifted | ratio |")
print("|---|---|---|---|---|---|")
for title, key in rows:
    if key not in peer:
        continue
    p, d, o = peer[key], default[key], lifted[key]
    print(f"| {title} | {p:,.1f} | {d:,.1f} | {d / p:.2f}x | {o:,.1f} | {o / p:.2f}x |")
PYEOF
