#!/usr/bin/env bash
# The main job: build kiln, start a local cluster (3 coordinators, 2 workers) under
# .kiln/ and show its status. Stop it with: target/.../kiln local down
source "$(dirname "$0")/env.sh"
kiln_install_packages
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
  for (i = 0; i < 200000; i++)
    printf "%.2f,%.2f,%.2f,%.2f,%s\n", 4 + 4 * rand(), 2 + 2.5 * rand(),
      1 + 6 * rand(), 0.1 + 2.4 * rand(), species[1 + int(3 * rand())]
}' > "$demo_data/iris.csv"
"$KILN_BIN" artifact push "$demo_data/iris.csv" --name iris --tag first
head -c 200000 "$demo_data/iris.csv" | tail -n +2 >> "$demo_data/iris.csv"
"$KILN_BIN" artifact push "$demo_data/iris.csv" --name iris
"$KILN_BIN" artifact diff iris@first iris@latest
"$KILN_BIN" artifact pull iris -o "$demo_data/pulled.csv"
cmp "$demo_data/iris.csv" "$demo_data/pulled.csv" && echo "pulled bytes are identical"
"$KILN_BIN" artifact log iris
echo
echo "stop the cluster with: $KILN_BIN local down"
