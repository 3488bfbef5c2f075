#!/usr/bin/env bash
# The main job: build kiln, start a local cluster (3 coordinators, 2 workers) under
# .kiln/ and show its status. Stop it with: target/.../kiln local down
source "$(dirname "$0")/env.sh"
kiln_install_packages curl python3
cargo build -p kiln-cli
"$KILN_BIN" local down --dir .kiln >/dev/null 2>&1 || true
"$KILN_BIN" local up --dir .kiln
"$KILN_BIN" status
echo

# A dataset: pushed, 3% appended, pushed again (only the new chunks travel),
# pulled back and compared.
demo_data="$(mktemp -d)"
trap 'rm -rf "$demo_data"' EXIT
awk 'BEGIN {
  srand(7); split("setosa versicolor virginica", species, " ")
  print "sepal_length,sepal_width,petal_length,petal_width,species"
  for (i = 0; i < 200000; i++) {
    petal = 1 + 6 * rand()
    kind = petal < 3 ? 1 : (petal < 5 ? 2 : 3)
    printf "%.2f,%.2f,%.2f,%.2f,%s\n", 4 + 4 * rand(), 2 + 2.5 * rand(),
      petal, 0.1 + 2.4 * rand(), species[kind]
  }
}' > "$demo_data/iris.csv"
"$KILN_BIN" artifact push "$demo_data/iris.csv" --name iris --tag first
head -c 200000 "$demo_data/iris.csv" | tail -n +2 >> "$demo_data/iris.csv"
"$KILN_BIN" artifact push "$demo_data/iris.csv" --name iris
"$KILN_BIN" artifact diff iris@first iris@latest
"$KILN_BIN" artifact pull iris -o "$demo_data/pulled.csv"
cmp "$demo_data/iris.csv" "$demo_data/pulled.csv" && echo "pulled bytes are identical"
"$KILN_BIN" artifact log iris
echo

# Train on the first version across both workers (one shard each, gradients
# averaged by the ring all-reduce), then show the registered model.
cat > "$demo_data/iris.toml" <<'SPEC'
name = "iris-mlp"
experiment = "iris"

[data]
artifact = "iris@1"
label = "species"

[model]
kind = "mlp"
hidden = [16]
activation = "relu"

[optimizer]
kind = "adamw"
lr = 0.01

[train]
epochs = 2
batch_size = 512
seed = 7
checkpoint_every_steps = 200

[resources]
shards = 2
cpus_per_shard = 1
SPEC
"$KILN_BIN" train submit "$demo_data/iris.toml" --follow
"$KILN_BIN" models show iris-mlp
echo

# Serve it: one replica on each worker, then a KServe v2 call through the first
# worker (its router sends it to either replica).
"$KILN_BIN" models alias iris-mlp 1 prod
"$KILN_BIN" deploy iris --model iris-mlp@prod --replicas 2 --wait
"$KILN_BIN" deployments show iris
worker_http="$("$KILN_BIN" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["workers"][0]["inference_http_addr"])')"
for _ in $(seq 1 25); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$worker_http/v2/models/iris/ready")" = 200 ] && break
  sleep 0.2
done
curl -s -H "Authorization: Bearer $(cat .kiln/admin.token)" \
  -d '{"inputs":[{"name":"input","shape":[2,4],"datatype":"FP32","data":[[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]}]}' \
  "http://$worker_http/v2/models/iris/infer"
echo
echo
echo "stop the cluster with: $KILN_BIN local down"
