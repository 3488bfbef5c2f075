# Shared by deploy/compose/test.sh and the fault suite: a compose project of its
# own, started and waited on within a bound, the CLI of this machine pointed at it
# through the published ports, and removal of everything at exit. Sourced, not run;
# the sourcing script sets `keep` (1: leave the cluster running) and `label`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# KILN_BIN: the binary this machine's CLI runs (scripts/env.sh's target dir).
KILN_BIN="${KILN_BIN:-$(source "$root/scripts/env.sh" && echo "$KILN_BIN")}"

if [ -z "${KILN_COMPOSE_IMAGE:-}" ]; then
  "$root/deploy/docker/build.sh" --tag kiln:compose-test >&2
  export KILN_COMPOSE_IMAGE=kiln:compose-test
fi
export COMPOSE_PROJECT_NAME="kiln-test-$$"
# Published on 127.0.0.2 by default: the same ports on 127.0.0.1 may belong to a
# `kiln local up` cluster (scripts/demo.sh leaves one running).
export KILN_COMPOSE_PUBLISH="${KILN_COMPOSE_PUBLISH:-127.0.0.2}"
pub="$KILN_COMPOSE_PUBLISH"
nodes="coordinator-1 coordinator-2 coordinator-3 worker-1 worker-2 worker-3"
compose() { docker-compose -f "$here/compose.yaml" "$@"; }
work="$(mktemp -d)"
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "--- the nodes' last log lines" >&2
    compose logs --no-color --tail 30 >&2 || true
    # Everything the script gathered, and every node's whole log, for a look later.
    local kept="${TMPDIR:-/tmp}/$COMPOSE_PROJECT_NAME-failed"
    cp -a "$work" "$kept" 2>/dev/null || true
    compose logs --no-color -t >"$kept/nodes.log" 2>&1 || true
    echo "$label: its files and the nodes' logs are kept in $kept" >&2
  fi
  if [ "${keep:-0}" -eq 0 ]; then
    compose --profile cli --profile demo down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

# Prints the nodes that are not healthy (with their state); nothing when all are.
unhealthy_nodes() {
  local node id state out=""
  for node in $nodes; do
    id="$(compose ps -q "$node")"
    state="$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null || echo missing)"
    [ "$state" = healthy ] || out="$out $node:$state"
  done
  echo "$out"
}

# Waits until every node is healthy and the admin-token job has ended well,
# at most $1 seconds.
wait_healthy() {
  local deadline=$(($(date +%s) + $1)) bad token_state
  while :; do
    bad="$(unhealthy_nodes)"
    token_state="$(docker inspect -f '{{.State.Status}}/{{.State.ExitCode}}' \
      "$(compose ps -q admin-token)" 2>/dev/null || echo missing)"
    [ -z "$bad" ] && [ "$token_state" = exited/0 ] && return 0
    if [ "$(date +%s)" -gt "$deadline" ]; then
      echo "$label: not healthy after $1 s:$bad admin-token:$token_state" >&2
      return 1
    fi
    sleep 1
  done
}

# Copies the CA and the admin token out of the cluster, for this machine's CLI.
fetch_credentials() {
  docker cp "$(compose ps -q coordinator-1)":/etc/kiln/certs/ca.pem "$work/ca.pem" >/dev/null
  docker cp "$(compose ps -q -a admin-token)":/etc/kiln/secrets/admin.token \
    "$work/admin.token" >/dev/null
}

# The CLI on this machine, reaching the nodes by name through the published
# ports (--resolve), as the admin.
resolve="coordinator-1:7070=$pub:7070,coordinator-2:7070=$pub:7071,coordinator-3:7070=$pub:7072"
resolve="$resolve,worker-1:7071=$pub:7090,worker-2:7071=$pub:7091,worker-3:7071=$pub:7092"
host_kiln() {
  "$KILN_BIN" --coordinator coordinator-1:7070,coordinator-2:7070,coordinator-3:7070 \
    --resolve "$resolve" --ca "$work/ca.pem" --token-file "$work/admin.token" "$@"
}
