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
echo "stop the cluster with: $KILN_BIN local down"
