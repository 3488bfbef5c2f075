#!/usr/bin/env bash
# The compose cluster end to end: builds the image (unless KILN_COMPOSE_IMAGE names one),
# starts 3 coordinators and 3 workers with the demo's drift windows, waits until
# every node is healthy and the admin token exists, checks `kiln status` through
# the `cli` service and the published HTTPS ports from this machine, then runs
# `kiln demo --existing` against the cluster. Everything it made (containers,
# network, volumes) is removed at the end, whatever happened.
#
#   deploy/compose/test.sh [--keep]     # --keep: leave the cluster running
keep=0
[ "${1:-}" = "--keep" ] && keep=1
label="compose test"
export KILN_COMPOSE_COORDINATOR_CONFIG=./demo.toml
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

started=$(date +%s)
compose up -d >&2
wait_healthy 240
healthy=$(($(date +%s) - started))
echo "compose test: 3 coordinators and 3 workers healthy, admin token made, in ${healthy} s"
fetch_credentials

# kiln status through the cli service: a leader, 3 coordinators, 3 live workers.
compose run --rm cli status --json >"$work/status.json"
python3 - "$work/status.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["leader_id"] in (1, 2, 3), s
coordinators = sorted(c["addr"] for c in s["coordinators"])
assert coordinators == ["coordinator-%d:7070" % i for i in (1, 2, 3)], coordinators
https = sorted(c["http_addr"] for c in s["coordinators"])
assert https == ["coordinator-%d:7080" % i for i in (1, 2, 3)], https
alive = [w for w in s["workers"] if w["state"] == "alive"]
assert len(alive) == 3, s["workers"]
print("compose test: kiln status: leader %d, coordinators %s, 3 workers alive" % (s["leader_id"], ", ".join(coordinators)))
EOF

# The published ports speak HTTPS with the cluster's certificates.
# curl checks each certificate against the node's name (--resolve).
for i in 1 2 3; do
  port=$((7079 + i))
  curl -fsS --max-time 5 --cacert "$work/ca.pem" --resolve "coordinator-$i:$port:$pub" \
    "https://coordinator-$i:$port/health" >/dev/null
  port=$((7998 + 2 * i))
  curl -fsS --max-time 5 --cacert "$work/ca.pem" --resolve "worker-$i:$port:$pub" \
    "https://worker-$i:$port/v2/health/live" >/dev/null
done
code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$pub:7080/health")"
[ "$code" = 400 ] || { echo "compose test: plain HTTP to 7080 answered $code, not 400" >&2; exit 1; }
echo "compose test: published ports 7080-7082 and 8000-8004 answer HTTPS (plain HTTP: 400)"

# The CLI on this machine, through the published gRPC ports (--resolve): status,
# and an artifact pushed to the workers and read back byte for byte.
host_kiln status >/dev/null
head -c 3000000 /dev/urandom >"$work/blob.bin"
host_kiln artifact push "$work/blob.bin" --name compose-check >/dev/null
host_kiln artifact pull compose-check@1 -o "$work/pulled.bin" >/dev/null
cmp "$work/blob.bin" "$work/pulled.bin"
echo "compose test: the CLI on this machine (--resolve) pushed and pulled an artifact through the published ports"

# The demo against the cluster, bounded.
timeout 600 docker-compose -f "$here/compose.yaml" run --rm demo
echo "compose test: kiln demo --existing passed; whole run $(($(date +%s) - started)) s"
