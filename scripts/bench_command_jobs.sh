#!/usr/bin/env bash
# Command jobs against torchrun (issue 20): the same 2-rank PyTorch DDP script
# (tests/programs/ddp_train.py, gloo on CPUs, a 600-row dataset, 32 rows a rank
# a step, one checkpoint an epoch) run as a kiln command job on a local cluster
# (3 coordinators, 2 workers, TLS, the code and data as artifacts, checkpoints
# pushed) and by `torchrun --nproc-per-node 2` on this machine, in turn, for
# --rounds rounds (default 3). For each run: start to finish (kiln: from
# `kiln train submit` to the job's end, as `--follow` sees it), submit to rank
# 0's first step, and rank 0's steady-state samples/s (after the first epoch).
# Prints the medians and their ratios as a markdown table for
# docs/benchmarks.md.
#
#   scripts/bench_command_jobs.sh [--rounds N] [--epochs N]
source "$(dirname "$0")/env.sh"
source "$KILN_ROOT/scripts/models.sh"
ROUNDS=3
EPOCHS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY="$(kiln_exporters_python)"
if [ -z "$PY" ]; then
  echo "error: no Python with torch (scripts/models.sh kiln_exporters_python could not install it)" >&2
  exit 1
fi
cargo build --workspace --bins >&2
work="$(mktemp -d)"
cleanup() {
  (cd "$work" && "$KILN_BIN" local down >/dev/null 2>&1)
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
mkdir -p code data torchrun
cp "$KILN_ROOT/tests/programs/ddp_train.py" code/train.py
"$PY" - <<'EOF' >data/blobs.csv
import random
random.seed(7)
centres = [[2.0, 0.0, -1.0, 0.5], [-2.0, 1.0, 1.0, -0.5], [0.0, -2.0, 0.0, 2.0]]
names = ["north", "south", "west"]
print("f0,f1,f2,f3,kind")
for i in range(600):
    c = i % 3
    print(",".join(f"{m + random.uniform(-0.8, 0.8):.4f}" for m in centres[c]) + "," + names[c])
EOF
"$KILN_BIN" local up --base-port 17270 >&2
"$KILN_BIN" artifact push data/blobs.csv --name blobs >&2
cat >job.toml <<EOF
name = "bench-ddp"
experiment = "bench"
max_failures = 0

[command]
run = ["python", "train.py", "--epochs", "$EPOCHS"]
code = "./code"

[environment]
python = "$PY"
env = { OMP_NUM_THREADS = "1" }

[data]
artifact = "blobs@1"

[resources]
shards = 2
cpus_per_shard = 1
EOF

now() { date +%s.%N; }
# Arithmetic on decimals (awk: no bc needed).
calc() { awk "BEGIN { print $1 }"; }
# Median of the numbers on standard input.
median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

: >kiln.tsv
: >torchrun.tsv
for round in $(seq "$ROUNDS"); do
  # kiln: submit, follow to the end; the first step and the rate from the job's log.
  start="$(now)"
  out="$("$KILN_BIN" train submit job.toml --json)"
  job="$(echo "$out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')"
  "$KILN_BIN" jobs logs "$job" --follow >"kiln-$round.log"
  end="$(now)"
  state="$("$KILN_BIN" jobs show "$job" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["state"])')"
  [ "$state" = "Succeeded" ] || { echo "kiln job $job ended $state" >&2; cat "kiln-$round.log" >&2; exit 1; }
  first="$(grep -m1 'rank 0\] first step at' "kiln-$round.log" | awk '{print $NF}')"
  rate="$(grep -m1 'rank 0\] samples/s' "kiln-$round.log" | awk '{print $NF}')"
  echo -e "$(calc "$end - $start")\t$(calc "$first - $start")\t$rate" >>kiln.tsv

  # torchrun: the same script and data, its directories local.
  rm -rf torchrun/ckpt torchrun/out && mkdir -p torchrun/ckpt torchrun/out
  start="$(now)"
  KILN_DATA_DIR="$work/data" KILN_CHECKPOINT_DIR="$work/torchrun/ckpt" KILN_OUTPUT_DIR="$work/torchrun/out" \
    OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc-per-node 2 \
    code/train.py --epochs "$EPOCHS" >"torchrun-$round.log" 2>&1 ||
    { cat "torchrun-$round.log" >&2; exit 1; }
  end="$(now)"
  first="$(grep -m1 'first step at' "torchrun-$round.log" | awk '{print $NF}')"
  rate="$(grep -m1 'samples/s' "torchrun-$round.log" | awk '{print $NF}')"
  echo -e "$(calc "$end - $start")\t$(calc "$first - $start")\t$rate" >>torchrun.tsv
  echo "round $round: kiln $(tail -1 kiln.tsv | tr '\t' ' '), torchrun $(tail -1 torchrun.tsv | tr '\t' ' ')" >&2
done

col() { cut -f"$2" "$1" | median; }
k_total="$(col kiln.tsv 1)"; t_total="$(col torchrun.tsv 1)"
k_first="$(col kiln.tsv 2)"; t_first="$(col torchrun.tsv 2)"
k_rate="$(col kiln.tsv 3)"; t_rate="$(col torchrun.tsv 3)"
echo
echo "| 2-rank DDP, $EPOCHS epochs, $ROUNDS rounds (medians) | kiln command job | torchrun --nproc-per-node 2 | kiln / torchrun |"
echo "|---|---|---|---|"
printf "| start to finish (s) | %.2f | %.2f | %+.2f s |\n" "$k_total" "$t_total" "$(calc "$k_total - $t_total")"
printf "| submit to rank 0's first step (s) | %.2f | %.2f | %+.2f s |\n" "$k_first" "$t_first" "$(calc "$k_first - $t_first")"
printf "| steady samples/s (rank 0, after epoch 1) | %.0f | %.0f | %.3f |\n" "$k_rate" "$t_rate" "$(calc "$k_rate / $t_rate")"
