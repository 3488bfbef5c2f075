#!/usr/bin/env bash
# The compose cluster end to end: builds the image (unless KILN_IMAGE names one),
# starts 3 coordinators and 3 workers with the demo's drift windows, waits until
# every node is healthy and the admin token exists, checks `kiln status` through
# the `cli` service and the published HTTPS ports from this machine, then runs
# `kiln demo --existing` against the cluster. Everything it made (containers,
# network, volumes) is removed at the end, whatever happened.
#
#   deploy/compose/test.sh [--keep]     # --keep: leave the cluster running
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
keep=0
[ "${1:-}" = "--keep" ] && keep=1

if [ -z "${KILN_IMAGE:-}" ]; then
  "$root/deploy/docker/build.sh" --tag kiln:compose-test >&2
  export KILN_IMAGE=kiln:compose-test
fi
export COMPOSE_PROJECT_NAME="kiln-test-$$"
export KILN_COORDINATOR_CONFIG=./demo.toml
compose() { docker-compose -f "$here/compose.yaml" "$@"; }
work="$(mktemp -d)"
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "--- the nodes' last log lines" >&2
    compose logs --no-color --tail 30 >&2 || true
  fi
  if [ "$keep" -eq 0 ]; then
    compose --profile cli --profile demo down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

started=$(date +%s)
compose up -d >&2

# Bounded wait: every node healthy and the admin-token job done (exit 0).
nodes="coordinator-1 coordinator-2 coordinator-3 worker-1 worker-2 worker-3"
deadline=$((started + 240))
while :; do
  unhealthy=""
  for node in $nodes; do
    id="$(compose ps -q "$node")"
    state="$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null || echo missing)"
    [ "$state" = healthy ] || unhealthy="$unhealthy $node:$state"
  done
  token_id="$(compose ps -q admin-token)"
  token_state="$(docker inspect -f '{{.State.Status}}/{{.State.ExitCode}}' "$token_id" 2>/dev/null || echo missing)"
  [ -z "$unhealthy" ] && [ "$token_state" = exited/0 ] && break
  if [ "$(date +%s)" -gt "$deadline" ]; then
    echo "compose test: not healthy after 240 s:$unhealthy admin-token:$token_state" >&2
    exit 1
  fi
  sleep 2
done
healthy=$(($(date +%s) - started))
echo "compose test: 3 coordinators and 3 workers healthy, admin token made, in ${healthy} s"

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
docker cp "$(compose ps -q coordinator-1)":/etc/kiln/certs/ca.pem "$work/ca.pem" >/dev/null
for port in 7080 7081 7082; do
  curl -fsS --max-time 5 --cacert "$work/ca.pem" "https://127.0.0.1:$port/health" >/dev/null
done
for port in 8000 8002 8004; do
  curl -fsS --max-time 5 --cacert "$work/ca.pem" "https://127.0.0.1:$port/v2/health/live" >/dev/null
done
code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:7080/health")"
[ "$code" = 400 ] || { echo "compose test: plain HTTP to 7080 answered $code, not 400" >&2; exit 1; }
echo "compose test: published ports 7080-7082 and 8000-8004 answer HTTPS (plain HTTP: 400)"

# The demo against the cluster, bounded.
timeout 600 docker-compose -f "$here/compose.yaml" run --rm demo
echo "compose test: kiln demo --existing passed; whole run $(($(date +%s) - started)) s"
