#!/usr/bin/env bash
# Builds what scripts/device-check.sh runs on a GPU machine, here (no toolkit
# needed): kiln and the kiln-worker unit-test binary with the cuda feature,
# stripped of debug info and gzipped into .device/ (ignored by git), within the
# device tool's 64 MiB carry (about 53 MB; unstripped they were 82 MB).
# Then it rebuilds the default kiln, which the cuda build replaced in the shared
# target directory. It prints the command to run there.
#
#   scripts/device-bundle.sh
source "$(dirname "$0")/env.sh"
kiln_install_packages

out="$KILN_ROOT/.device"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
rm -rf "$out"
mkdir -p "$out"

cargo build -p kiln-cli --features kiln-cli/cuda
# Debug info (line tables) is most of each binary; symbols stay for backtraces.
pack() { strip --strip-debug -o "$out/$2" "$1" && gzip -f "$out/$2"; }
pack "$KILN_BIN" kiln
tests=$(cargo test -p kiln-worker --features cuda --lib --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])' | tail -1)
[ -n "$tests" ] || { echo "no kiln-worker test binary was built" >&2; exit 1; }
pack "$tests" kiln_worker-tests

# The default binary back where scripts and CI expect it.
cargo build -p kiln-cli

ls -l "$out"
total=$(du -cb "$out"/* | tail -1 | cut -f1)
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
echo "bundle: $total bytes, tracked tree $tree bytes (the device tool carries at most 67108864)"
echo "on the device (carry .device): bash scripts/device-check.sh .device/kiln.gz .device/kiln_worker-tests.gz"
