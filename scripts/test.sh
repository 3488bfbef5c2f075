#!/usr/bin/env bash
# Every test: unit, property, storage conformance and the cluster tests that start
# real kiln processes on loopback ports, then `kiln demo` end to end (on its own
# cluster in a temporary directory, stopped afterwards). Chromium (Debian's
# package) renders the dashboard pages in the dashboard test.
source "$(dirname "$0")/env.sh"
kiln_install_packages chromium
cargo build -p kiln-cli
cargo test --workspace -- --test-threads=2

demo_dir="$(mktemp -d)"
trap '"$KILN_BIN" local down --dir "$demo_dir/cluster" >/dev/null 2>&1 || true; rm -rf "$demo_dir"' EXIT
"$KILN_BIN" demo --dir "$demo_dir/cluster" --base-port 17070
