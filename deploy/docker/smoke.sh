#!/usr/bin/env bash
# Checks that the kiln image runs every role, on a Docker network of its own:
#
#   deploy/docker/smoke.sh [--tag IMAGE]        (default kiln:dev, from build.sh)
#
#   1. `kiln --version` and the CLI's `kiln certs` (as the image's non-root user,
#      writing into a named volume);
#   2. a coordinator (--insecure) and a worker that registers with it; /health and
#      /v2/health/ready probed over HTTP with curl from another container;
#   3. a coordinator with mutual TLS (the certificates from step 1): its gRPC port
#      presents a certificate that curl verifies with --cacert ca.pem;
#   4. the CLI from a third container: `kiln status` lists the worker, `kiln kv put`;
#   5. `docker restart` of the first coordinator: it comes back on its volume with
#      the value written (`kiln kv get`), and `docker stop` ends it in a few seconds
#      (SIGTERM reaches kiln through tini) rather than at Docker's 10 s SIGKILL.
#
# Everything it makes (containers, the network, volumes) is removed on exit.
set -euo pipefail

tag="kiln:dev"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "smoke.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# Unique names, so two runs (or a leftover) never collide.
run="kiln-smoke-$$"
net="$run"
certs="$run-certs"
containers=("$run-coord" "$run-worker" "$run-tls")
volumes=("$certs" "$run-coord-data" "$run-worker-data" "$run-tls-data")

cleanup() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    # The logs say why a node did not come up.
    for c in "${containers[@]}"; do
      docker logs --tail 20 "$c" 2>&1 | sed "s/^/[$c] /" >&2 || true
    done
  fi
  docker rm -f "${containers[@]}" >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
  docker volume rm "${volumes[@]}" >/dev/null 2>&1 || true
  exit "$status"
}
trap cleanup EXIT

# curl inside a throwaway container of the same image on the test network.
probe() {
  docker run --rm --network "$net" -v "$certs:/certs:ro" --entrypoint curl "$tag" "$@"
}

# The CLI in a throwaway container, pointed at the insecure coordinator.
cli() {
  docker run --rm --network "$net" "$tag" --coordinator "$run-coord:7070" "$@"
}

# Waits (at most 60 s) until URL answers 200; prints the body.
wait_http() {
  local url="$1" deadline=$((SECONDS + 60))
  until probe -fsS --max-time 2 "$url" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "smoke.sh: $url did not answer 200 within 60 s" >&2
      return 1
    fi
    sleep 1
  done
  echo
}

echo "== 1. version and certificates"
docker run --rm "$tag" --version
# A fresh named volume mounted on /var/lib/kiln is filled from the image, so it
# belongs to the kiln user (10001); the certificates are made there by the image.
docker volume create "$certs" >/dev/null
docker run --rm -v "$certs:/var/lib/kiln" "$tag" certs init --dir /var/lib/kiln
docker run --rm -v "$certs:/var/lib/kiln" "$tag" certs issue --dir /var/lib/kiln \
  --node tls1 --san "$run-tls"

echo "== 2. coordinator and worker (--insecure), probed over HTTP"
docker network create "$net" >/dev/null
docker run -d --name "$run-coord" --network "$net" -v "$run-coord-data:/var/lib/kiln" "$tag" \
  coordinator --insecure --id 1 --data-dir /var/lib/kiln/coordinator --bootstrap \
  --listen 0.0.0.0:7070 --advertise "$run-coord:7070" --http 0.0.0.0:7080 >/dev/null
wait_http "http://$run-coord:7080/health"
docker run -d --name "$run-worker" --network "$net" -v "$run-worker-data:/var/lib/kiln" "$tag" \
  worker --insecure --data-dir /var/lib/kiln/worker --coordinators "$run-coord:7070" \
  --listen 0.0.0.0:7071 --advertise-host "$run-worker" --http 0.0.0.0:8000 \
  --inference-grpc 0.0.0.0:8001 >/dev/null
wait_http "http://$run-worker:8000/v2/health/ready"

echo "== 3. coordinator with mutual TLS"
docker run -d --name "$run-tls" --network "$net" -v "$run-tls-data:/var/lib/kiln" \
  -v "$certs:/etc/kiln/certs:ro" "$tag" \
  coordinator --id 1 --data-dir /var/lib/kiln/coordinator --bootstrap \
  --listen 0.0.0.0:7070 --advertise "$run-tls:7070" --http 0.0.0.0:7080 \
  --tls-ca /etc/kiln/certs/ca.pem --tls-cert /etc/kiln/certs/tls1.pem \
  --tls-key /etc/kiln/certs/tls1-key.pem >/dev/null
# The HTTP port is plain today and becomes HTTPS with TLS (then probe it with
# https:// and --cacert); the gRPC port is TLS already. curl fails (exit 60) unless
# the certificate chains to the cluster CA and names the host; any HTTP status
# from the gRPC server will do.
deadline=$((SECONDS + 60))
until code="$(probe -sS --max-time 2 -o /dev/null -w '%{http_code}' \
  --cacert /certs/ca.pem "https://$run-tls:7070/" 2>/dev/null)"; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    probe -sS --max-time 2 -o /dev/null --cacert /certs/ca.pem "https://$run-tls:7070/" || true
    echo "smoke.sh: no verified TLS handshake with $run-tls:7070 within 60 s" >&2
    exit 1
  fi
  sleep 1
done
echo "TLS handshake with $run-tls:7070 verified against ca.pem (HTTP $code)"

echo "== 4. the CLI"
cli status
# Captured first: `grep -q` stops reading at its match, and with pipefail the
# writer's broken pipe would fail the check.
status_json="$(cli status --json)"
grep -Eq "\"inference_http_addr\": *\"$run-worker:8000\"" <<<"$status_json" ||
  { echo "smoke.sh: kiln status does not list the worker" >&2; exit 1; }
cli kv put smoke "$run"

echo "== 5. restart on the same volume, then stop"
docker restart "$run-coord" >/dev/null
wait_http "http://$run-coord:7080/health"
value="$(cli kv get smoke)"
if [ "$value" != "$run" ]; then
  echo "smoke.sh: after the restart kv smoke is '$value', not '$run'" >&2
  exit 1
fi
echo "kv smoke survived the restart: $value"
started=$SECONDS
docker stop "$run-coord" >/dev/null
stop_s=$((SECONDS - started))
exit_code="$(docker inspect --format '{{.State.ExitCode}}' "$run-coord")"
echo "docker stop took ${stop_s} s; exit code $exit_code"
if [ "$stop_s" -ge 10 ]; then
  echo "smoke.sh: the coordinator ignored SIGTERM (Docker killed it after 10 s)" >&2
  exit 1
fi
echo "smoke.sh: $tag passed"
