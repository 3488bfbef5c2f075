#!/usr/bin/env bash
# One kiln training job on a GPU, end to end: a local cluster (1 coordinator, 1
# worker, which finds the GPUs through NVML), a generated dataset pushed to the
# artifact store, a one-shard job with gpus_per_shard = 1 followed to its end,
# its logs (which name the CUDA device the pass ran on) and its record.
#
#   scripts/gpu-job.sh path/to/kiln      (a kiln built with --features kiln-cli/cuda)
#
# scripts/device-check.sh runs it after putting libcublas and libnvrtc where
# cudarc looks. Exit status: 0 when the job succeeded on a GPU.
set -euo pipefail

kiln=$(readlink -f "${1:-./kiln}")
# The job's own deadline, inside device-check.sh's limit for this script.
deadline_s=${GPU_JOB_DEADLINE_S:-150}
work=$(mktemp -d)
cd "$work"
cleanup() {
  "$kiln" local down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# Two classes of four features, separable by their sum, with noise.
python3 - >data.csv <<'PY'
import random
random.seed(7)
print("a,b,c,d,label")
for _ in range(20000):
    x = [random.gauss(0, 1) for _ in range(4)]
    label = "high" if sum(x) + random.gauss(0, 0.5) > 0 else "low"
    print(",".join(f"{v:.5f}" for v in x) + f",{label}")
PY

cat >job.toml <<'TOML'
name = "gpu-check"
experiment = "device"

[data]
artifact = "gpu-data@1"
label = "label"

[model]
kind = "mlp"
hidden = [256, 256]
activation = "gelu"

[optimizer]
kind = "adamw"
lr = 0.003

[train]
epochs = 3
batch_size = 512
seed = 7
checkpoint_every_steps = 50

[resources]
shards = 1
cpus_per_shard = 1
gpus_per_shard = 1
TOML

"$kiln" local up --coordinators 1 --workers 1
"$kiln" status
"$kiln" artifact push data.csv --name gpu-data
# The worker registers its GPUs with its first heartbeat; until then the job is
# refused as asking for more GPUs than any worker has.
submitted=""
for _ in $(seq 30); do
  if submitted=$("$kiln" train submit job.toml --json 2>submit.err); then break; fi
  submitted=""
  sleep 1
done
if [ -z "$submitted" ]; then
  cat submit.err
  exit 1
fi
echo "$submitted"
job=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["job_id"])' "$submitted")
status=0
deadline=$((SECONDS + deadline_s))
state=""
while [ $SECONDS -lt $deadline ]; do
  state=$("$kiln" jobs show "$job" --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])') || state=""
  case $state in
    Succeeded | Failed | Cancelled) break ;;
  esac
  sleep 2
done
"$kiln" jobs show "$job" || true
"$kiln" jobs logs "$job" >logs.txt || true
cat logs.txt
if [ "$state" != Succeeded ]; then
  echo "the job ended ${state:-in no state within ${deadline_s} s}"
  status=1
elif ! grep -q 'forward and backward on CUDA device' logs.txt; then
  echo "the job succeeded, but not on a GPU"
  status=1
fi
echo "gpu job: state $state, status $status"
exit $status
