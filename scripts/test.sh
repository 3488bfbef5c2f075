#!/usr/bin/env bash
# Every test: unit, property, storage conformance and the cluster tests that start
# real kiln processes on loopback ports.
source "$(dirname "$0")/env.sh"
kiln_install_packages chromium
cargo build -p kiln-cli
cargo test --workspace -- --test-threads=2
