#!/usr/bin/env bash
# The main job: build kiln and run `kiln demo` on a fresh local cluster under
# .kiln/ (3 coordinators, 2 workers): a generated dataset pushed, a 2-shard
# training job, the model deployed with drift monitoring and a retrain policy,
# calm then shifted traffic with labels, the drift alert, retraining, the canary
# judged and promoted, and a summary with the dashboard URL and its token.
# The cluster keeps running; stop it with: $KILN_BIN local down
source "$(dirname "$0")/env.sh"
kiln_install_packages
cargo build -p kiln-cli
exec "$KILN_BIN" demo "$@"
