#!/usr/bin/env bash
# Serving benchmark (issue 6): one-row and 64-row KServe v2 JSON requests to an MLP
# 32-256-256-10 through kiln (a local cluster of 1 coordinator and 1 worker, one
# replica with 2 inference threads) and through FastAPI + uvicorn + onnxruntime
# (scripts/serve_onnxruntime.py, `async def` handler) on the same model file, with
# wrk (one thread) at concurrency 1, 16 and 64, 10 s each; then the engines
# in-process. Prints markdown tables for docs/benchmarks.md.
#
# Needs wrk (installed here from Debian) and the peer's venv (fastapi, uvicorn,
# onnxruntime, onnx, numpy; installed once under the target directory, or PYTHON).
# kiln serves on ONNX Runtime where the wheel's library installs, else on tract.
source "$(dirname "$0")/env.sh"
source "$(dirname "$0")/wrk.sh"
kiln_install_packages wrk
PY="${PYTHON:-$(kiln_pinned_venv serving-peer "fastapi==0.165.0 uvicorn==0.55.0 onnxruntime==1.32.0 onnx==1.23.2 numpy==2.4.6")}"
[ -n "$PY" ] || { echo "bench_serving.sh: the peer's venv could not be installed" >&2; exit 1; }
KILN_ONNXRUNTIME_LIB="$(kiln_onnxruntime_lib)"
export KILN_ONNXRUNTIME_LIB
DURATION="${DURATION:-10s}"
cargo build --workspace --bins >&2
work="$(mktemp -d)"
peer_pid=""
cleanup() {
  [ -n "$peer_pid" ] && kill "$peer_pid" 2>/dev/null
  (cd "$work" && "$KILN_BIN" local down >/dev/null 2>&1)
  rm -rf "$work"
}
trap cleanup EXIT

"$PY" scripts/serving_model.py "$work/mlp.onnx"
"$PY" - "$work" <<'PYEOF'
import json, random, sys
random.seed(1)
for rows in (1, 64):
    data = [[round(random.uniform(-2, 2), 4) for _ in range(32)] for _ in range(rows)]
    body = {"inputs": [{"name": "input", "shape": [rows, 32], "datatype": "FP32", "data": data}]}
    with open(f"{sys.argv[1]}/body{rows}.json", "w") as f:
        json.dump(body, f)
PYEOF
for rows in 1 64; do
  cat > "$work/post$rows.lua" <<LUA
wrk.method = "POST"
local f = io.open("$work/body$rows.json", "r")
wrk.body = f:read("*a")
f:close()
LUA
done

# Plain HTTP like the peer, so both sides pay the same per-request cost: a cluster
# with TLS serves HTTPS (docs/architecture.md, Security).
(cd "$work" && KILN_LOG=warn "$KILN_BIN" local up --insecure --coordinators 1 --workers 1 >/dev/null)
kiln() { (cd "$work" && "$KILN_BIN" "$@"); }
kiln models register --onnx "$work/mlp.onnx" --name mlp >&2
kiln deploy mlp --model mlp@1 --replicas 1 --cpus 2 --public --wait >&2
kiln_addr="$(kiln status --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["workers"][0]["inference_http_addr"])')"
# The worker's router learns the replica from its next heartbeat.
for _ in $(seq 1 50); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$kiln_addr/v2/models/mlp/ready")" = 200 ] && break
  sleep 0.2
done
peer_port=18000
"$PY" scripts/serve_onnxruntime.py "$work/mlp.onnx" "$peer_port" &
peer_pid=$!
for _ in $(seq 1 50); do
  curl -s -o /dev/null -X POST --data @"$work/body1.json" "http://127.0.0.1:$peer_port/v2/models/mlp/infer" && break
  sleep 0.2
done

measure() { # url rows concurrency
  kiln_wrk_measure "$work/post$2.lua" "$1" "$3" "$DURATION"
}

echo "| rows | concurrency | kiln req/s | kiln p50 ms | kiln p99 ms | onnxruntime req/s | onnxruntime p50 ms | onnxruntime p99 ms | kiln / peer req/s |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for rows in 1 64; do
  for c in 1 16 64; do
    read -r k_rps k_p50 k_p99 k_bad <<<"$(measure "http://$kiln_addr/v2/models/mlp/infer" "$rows" "$c")"
    read -r p_rps p_p50 p_p99 p_bad <<<"$(measure "http://127.0.0.1:$peer_port/v2/models/mlp/infer" "$rows" "$c")"
    ratio="$(awk -v a="$k_rps" -v b="$p_rps" 'BEGIN { printf "%.2f", a / b }')"
    echo "| $rows | $c | $k_rps | $k_p50 | $k_p99 | $p_rps | $p_p50 | $p_p99 | **$ratio** |"
    if [ "$k_bad" != "0" ] || [ "$p_bad" != "0" ]; then
      echo "rows $rows, concurrency $c: non-2xx answers: kiln $k_bad, onnxruntime $p_bad" >&2
    fi
  done
done
kill "$peer_pid" 2>/dev/null; peer_pid=""
(cd "$work" && "$KILN_BIN" local down >/dev/null 2>&1)

echo
echo "In-process engines (rows/s), same model:"
"$KILN_BIN" bench serving-engine --onnx "$work/mlp.onnx"
"$PY" - "$work/mlp.onnx" <<'PYEOF'
import sys, time
import numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for rows in (1, 64):
    x = np.random.default_rng(0).standard_normal((rows, 32)).astype(np.float32)
    for _ in range(200):
        s.run(None, {"input": x})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3:
        s.run(None, {"input": x}); n += 1
    print(f"onnxruntime batch {rows}: {n * rows / (time.perf_counter() - t0):,.0f} rows/s")
PYEOF
