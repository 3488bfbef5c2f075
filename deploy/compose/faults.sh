#!/usr/bin/env bash
# The fault suite across containers: the compose cluster (3 coordinators, 3
# workers) under a writing client, a training job and inference traffic, while
# one fault after another strikes:
#
#   leader partitioned   docker network disconnect of the leader, 15 s, reconnect
#   leader killed        docker kill of the leader, 10 s, docker start
#   worker killed        docker kill of a worker that runs a shard; started again
#                        once the gang runs without it
#   worker paused        docker pause of a worker, 10 s, docker unpause
#   full restart         docker-compose restart of every node
#
# Recovery is the time from the fault until the cluster does its job again: a
# write is acknowledged (coordinator faults and the full restart), the training
# gang runs again from its checkpoint (killed worker), or the paused worker
# answers again (from the unpause). After each fault, once the cluster is healthy
# again, it checks that no acknowledged write is lost (all read back in one
# linearizable `kv get`), each artifact's newest version pulls whole and
# verified, and no shard ran twice (shard_check.py, from the workers' own logs
# and Docker's events: no attempt and rank started on two workers, and no shard
# of an attempt started before every shard of the attempts before it had
# stopped); it counts the inference requests answered from the fault on. At
# the end it checks the writes and shards again, every version of every artifact
# (the dataset, models, checkpoints) and the dataset byte for byte, that the job
# succeeded, and that at least 99% of all inference requests were answered (a
# client that is refused by one worker tries the next, as a load balancer
# would). It prints a table of faults, recovery times and those outcomes, and
# exits non-zero when a check fails.
#
#   deploy/compose/faults.sh [--keep]
keep=0
[ "${1:-}" = "--keep" ] && keep=1
label="fault suite"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

compose up -d >&2
# Docker keeps only its last few hundred events (the health checks alone make
# more), so the containers' deaths and pauses are recorded as they happen.
docker events --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
  --filter type=container --filter event=die --filter event=pause --filter event=unpause \
  --format '{{.Actor.Attributes.name}} {{.Action}} {{.TimeNano}}' >"$work/events" &
events_pid=$!
wait_healthy 240
fetch_credentials
network="${COMPOSE_PROJECT_NAME}_kiln"
container() { compose ps -q "$1"; }
now_ms() { date +%s%3N; }

# --- the workload ----------------------------------------------------------
python3 - "$work/data.csv" <<'EOF'
import random, sys
random.seed(3)
with open(sys.argv[1], "w") as f:
    f.write("a,b,c,d,label\n")
    for _ in range(20000):
        x = [random.gauss(0, 1) for _ in range(4)]
        f.write("%.4f,%.4f,%.4f,%.4f,%s\n" % (*x, "hi" if x[0] + x[1] > 0 else "lo"))
EOF
host_kiln artifact push "$work/data.csv" --name faults-data >/dev/null
spec() {
  cat <<EOF
name = "faults-model"
experiment = "faults"
# Five faults in a row may each cost the gang a restart.
max_failures = 10

[data]
artifact = "faults-data@1"
label = "label"

[model]
kind = "mlp"
hidden = [64, 64]
activation = "relu"

[optimizer]
kind = "adamw"
lr = 0.005

[train]
epochs = $1
batch_size = 64
seed = 7
checkpoint_every_steps = 1000

[resources]
shards = 2
cpus_per_shard = 1
EOF
}
spec 2 >"$work/quick.toml"
host_kiln train submit "$work/quick.toml" --follow >/dev/null
# Two replicas and two shards of one CPU each on 3 workers of 2 CPUs or more: when a
# worker dies, the 4 CPUs left hold them all, so the gang moves at once.
host_kiln deploy faults --model faults-model@1 --replicas 2 --public --wait >/dev/null
echo "$label: dataset pushed, faults-model@1 trained, deployed on 2 replicas"

# The writer: one key after another; a key is acknowledged when `kv put` exits 0.
stop="$work/stop"
writer() {
  local i=0
  while [ ! -e "$stop" ]; do
    i=$((i + 1))
    if host_kiln kv put "fault-$i" "value-$i" >/dev/null 2>&1; then
      echo "$(now_ms) $i" >>"$work/acked"
    fi
  done
}
# One inference request to worker $1 (1-3), through its published port.
body='{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[0.5,-0.2,1.0,0.1]}]}'
infer() {
  local port=$((7998 + 2 * $1))
  curl -fsS -o /dev/null --max-time 2 --cacert "$work/ca.pem" \
    --resolve "worker-$1:$port:$pub" -X POST -d "$body" \
    "https://worker-$1:$port/v2/models/faults/infer" 2>/dev/null
}
# Inference: each request goes to the workers in turn; a refused or failed one
# is sent to the next worker, up to all three.
traffic() {
  local n=0 k answered
  while [ ! -e "$stop" ]; do
    n=$((n + 1))
    answered=no
    for k in 0 1 2; do
      if infer $(((n + k) % 3 + 1)); then
        answered=yes
        break
      fi
    done
    echo "$(now_ms) $answered" >>"$work/answers"
    # A client that no worker answered waits a little before the next request.
    [ "$answered" = yes ] || sleep 0.2
  done
}
touch "$work/acked" "$work/answers"
writer &
writer_pid=$!
traffic &
traffic_pid=$!
spec 200 >"$work/long.toml"
job="$(host_kiln train submit "$work/long.toml" | awk '$1 == "job" && $3 == "submitted" {print $2}')"
[ -n "$job" ] || { echo "$label: no job id from train submit" >&2; exit 1; }
sleep 5

# --- the faults ------------------------------------------------------------
leader_name() {
  host_kiln status --json | python3 -c 'import json,sys; print("coordinator-%d" % json.load(sys.stdin)["leader_id"])'
}
# Runs "$@" until it succeeds, at most $2 seconds; prints the milliseconds
# since $1 (epoch ms), or fails naming what it waited for.
recovered() {
  local since=$1 limit=$2 deadline=$(($(date +%s) + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "not within $limit s: $*" >&2; return 1; }
    sleep 0.2
  done
  echo $(($(now_ms) - since))
}
write_probe() { host_kiln kv put fault-probe "$(now_ms)"; }
# The job's record, as `kiln jobs show --json` prints it.
job_json() { host_kiln jobs show "$job" --json; }
# Whether the job's gang runs again, every shard Running, on a later attempt
# than $1, or the job has ended.
gang_runs() {
  job_json | python3 -c '
import json, sys
j = json.load(sys.stdin)
done = j["state"] in ("Succeeded", "Failed", "Cancelled")
back = j["state"] == "Running" and j["attempt"] > int(sys.argv[1]) and j["shards"] and all(
    s["state"] == "Running" for s in j["shards"])
sys.exit(0 if done or back else 1)' "$1"
}
job_ended() {
  case "$(job_field state)" in Succeeded | Failed | Cancelled) ;; *) return 1 ;; esac
}
shard_worker() {
  job_json | python3 -c '
import json, sys
j = json.load(sys.stdin)
ids = [s["worker_id"] for s in j["shards"] if s["worker_id"]]
print(ids[0] if ids else "")'
}
job_field() {  # the job record's top-level field $1
  job_json | python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}
worker_named() {  # the compose service of worker id $1
  host_kiln status --json | python3 -c '
import json, sys
for w in json.load(sys.stdin)["workers"]:
    if w["id"] == sys.argv[1]:
        print(w["addr"].split(":")[0])' "$1"
}
# --- the checks, run after each fault and at the end --------------------------
failed=0
# Prints how many of the writes acknowledged so far are lost: all read back in
# one linearizable `kv get`.
writes_lost() {
  local lost
  cp "$work/acked" "$work/acked-now"
  [ -s "$work/acked-now" ] || { echo "none acknowledged"; return; }
  mapfile -t keys < <(awk '{print "fault-" $2}' "$work/acked-now")
  awk '{print "value-" $2}' "$work/acked-now" >"$work/expected"
  if host_kiln kv get "${keys[@]}" >"$work/got" 2>"$work/got.err"; then
    lost=$(paste -d ' ' "$work/expected" "$work/got" | awk '$1 != $2' | wc -l)
  else
    cat "$work/got.err" >&2
    lost=$(sed -n 's/.*not found: //p' "$work/got.err" | tr ',' '\n' | grep -c . || true)
    [ "$lost" -gt 0 ] || lost="unknown (the read failed)"
  fi
  echo "$lost"
}
# Pulls artifact versions whole ($1: "newest", each artifact's newest version,
# or "all", every version of every artifact); the transfer checks each chunk's
# hash and each file's digest, and the bytes must add up to the version's size.
# Prints "unreadable/pulled".
artifacts_unreadable() {
  local versions=0 unreadable=0 name entry v size got_bytes out
  for name in $(host_kiln artifact ls --json | python3 -c 'import json,sys; print(" ".join(a["name"] for a in json.load(sys.stdin)))'); do
    for entry in $(host_kiln artifact log "$name" --json | python3 -c '
import json, sys
versions = json.load(sys.stdin)  # newest first
if sys.argv[1] == "newest":
    versions = versions[:1]
print(" ".join("%d:%d" % (v["version"], v["size"]) for v in versions))' "$1"); do
      v=${entry%%:*} size=${entry#*:}
      versions=$((versions + 1))
      out="$work/pulled-$name-$v"
      if ! got_bytes=$(host_kiln artifact pull "$name@$v" -o "$out" --json 2>"$work/pull.err" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])'); then
        echo "$name@$v is not readable: $(tail -1 "$work/pull.err")" >&2
        unreadable=$((unreadable + 1))
      elif [ "$got_bytes" != "$size" ]; then
        echo "$name@$v: pulled $got_bytes bytes of $size" >&2
        unreadable=$((unreadable + 1))
      fi
      rm -rf "$out"
    done
  done
  echo "$unreadable/$versions"
}
# No shard ran twice so far: the workers' own logs (they survive a kill and a
# restart; Docker stamps each line) and the Docker events recorded since the
# start, through shard_check.py ($1: --running while the job may still run).
# Prints its summary line; fails when it does.
shards_checked() {
  local w rc=0
  for w in worker-1 worker-2 worker-3; do
    docker logs -t "$(container "$w")" 2>&1 | sed "s/^/$w /"
  done >"$work/worker-logs"
  python3 "$here/shard_check.py" "$job" "$work/worker-logs" "$work/events" "$@" >"$work/shard-check" || rc=1
  sed '$d' "$work/shard-check" >&2
  tail -1 "$work/shard-check"
  return "$rc"
}

table="$work/table"
row() { printf '%-20s %-42s %9s %8s %9s %8s %10s\n' "$@" >>"$table"; }
row "fault" "what" "recovery" "writes" "artifacts" "shards" "answered"
row "" "" "" "lost" "unread" "" ""
mark() { from=$(wc -l <"$work/answers"); }
# One row: the fault, what was done, the recovery time, then the checks now:
# acknowledged writes lost, newest artifact versions unreadable, whether any
# shard ran twice, and the inference requests answered since `mark`.
record() {
  local answers ok lost unread shards=ok
  tail -n +"$((from + 1))" "$work/answers" >"$work/window"
  answers=$(wc -l <"$work/window")
  ok=$(grep -c ' yes$' "$work/window" || true)
  lost=$(writes_lost)
  unread=$(artifacts_unreadable newest)
  shards_checked --running >/dev/null || shards=TWICE
  [ "$lost" = 0 ] && [ "${unread%%/*}" = 0 ] && [ "$shards" = ok ] || failed=1
  row "$1" "$2" "$3" "$lost" "$unread" "$shards" "$ok/$answers"
}

victim="$(leader_name)"
mark
t0=$(now_ms)
docker network disconnect "$network" "$(container "$victim")"
took=$(recovered "$t0" 120 write_probe)
sleep 15
docker network connect --alias "$victim" "$network" "$(container "$victim")"
wait_healthy 120
record "leader partitioned" "$victim cut off 15 s; new leader" "${took} ms"

victim="$(leader_name)"
mark
t0=$(now_ms)
docker kill "$(container "$victim")" >/dev/null
took=$(recovered "$t0" 120 write_probe)
sleep 10
docker start "$(container "$victim")" >/dev/null
wait_healthy 120
record "leader killed" "$victim killed, restarted after 10 s" "${took} ms"

victim_id="$(shard_worker)"
victim="$(worker_named "$victim_id")"
[ -n "$victim" ] || { echo "$label: no worker runs a shard of job $job" >&2; exit 1; }
attempt="$(job_field attempt)"
mark
t0=$(now_ms)
docker kill "$(container "$victim")" >/dev/null
took=$(recovered "$t0" 180 gang_runs "$attempt")
docker start "$(container "$victim")" >/dev/null
wait_healthy 120
record "worker killed" "$victim (ran a shard) killed; gang back" "${took} ms"

victim=worker-2
mark
docker pause "$(container "$victim")" >/dev/null
sleep 10
docker unpause "$(container "$victim")" >/dev/null
t1=$(now_ms)
took=$(recovered "$t1" 120 infer "${victim#worker-}")
wait_healthy 120
record "worker paused" "$victim paused 10 s; answers again" "${took} ms"

mark
t0=$(now_ms)
compose restart -t 30 $nodes >/dev/null 2>&1
took=$(recovered "$t0" 120 write_probe)
wait_healthy 180
record "full restart" "all 6 nodes restarted" "${took} ms"

# --- at the end --------------------------------------------------------------
touch "$stop"
wait "$writer_pid" "$traffic_pid" || true
acked=$(wc -l <"$work/acked")
[ "$acked" -gt 0 ] || { echo "no write was acknowledged" >&2; failed=1; }
lost=$(writes_lost)
[ "$lost" = 0 ] || failed=1
artifacts=$(artifacts_unreadable all)
unreadable=${artifacts%%/*} versions=${artifacts#*/}
# The dataset, the model and its checkpoints at least.
[ "$versions" -ge 3 ] || { echo "only $versions artifact version(s) listed" >&2; failed=1; }
[ "$unreadable" -eq 0 ] || failed=1
host_kiln artifact pull faults-data@1 -o "$work/pulled.csv" >/dev/null
dataset=identical
cmp -s "$work/data.csv" "$work/pulled.csv" || { dataset=DIFFERENT; failed=1; }
recovered "$(now_ms)" 600 job_ended >/dev/null || failed=1
state="$(job_field state)"
[ "$state" = Succeeded ] || { echo "job $job ended $state" >&2; failed=1; }
shards="$(shards_checked)" || failed=1
kill "$events_pid" 2>/dev/null || true
attempts="$(echo "$shards" | awk '{print $5}')"
[ "${attempts:-0}" -ge 2 ] || { echo "the job ran ${attempts:-0} attempt(s): the worker fault did not restart its gang" >&2; failed=1; }
requests=$(wc -l <"$work/answers")
answered=$(grep -c ' yes$' "$work/answers" || true)
ratio=$(python3 -c "print('%.2f' % (100.0 * $answered / max($requests, 1)))")
python3 -c "import sys; sys.exit(0 if $answered >= 0.99 * $requests else 1)" || failed=1

echo
cat "$table"
echo
echo "writes acknowledged: $acked, lost: $lost"
echo "artifacts: $versions versions pulled whole, $unreadable unreadable; faults-data@1 $dataset"
echo "training job $job: $state; $shards"
echo "inference: $answered of $requests requests answered ($ratio%)"
[ "$failed" -eq 0 ] || { echo "$label: FAILED" >&2; exit 1; }
echo "$label: passed"
