#!/usr/bin/env bash
# Checks kiln's systemd units the way systemd would load them, without systemd
# running (it works in a container):
#
#   deploy/systemd/verify.sh [UNIT_DIR]      (default: this script's directory)
#
# 1. `systemd-analyze verify` on each unit, inside a throwaway root laid out as
#    docs/operations.md installs it. verify exits 0 even when it ignores a
#    misspelt key or an unparsable value, so any line it prints about a kiln unit
#    is a failure here.
# 2. `systemd-analyze security --offline` on each unit: fails when the unit's
#    overall exposure rises above KILN_UNIT_MAX_EXPOSURE (default 2.5; the units
#    score 1.4 and 1.7 on systemd 252), so hardening cannot slip away unnoticed.
set -euo pipefail

unit_dir="$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")}" && pwd)"
units=(kiln-coordinator.service kiln-worker.service)
max_exposure="${KILN_UNIT_MAX_EXPOSURE:-2.5}"
# systemd prints exposure as 0.0-10.0 but takes --threshold in tenths (25 = 2.5).
threshold="$(awk -v x="$max_exposure" 'BEGIN { printf "%d", x * 10 + 0.5 }')"

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "verify.sh: systemd-analyze not found (Debian: apt-get install systemd)" >&2
  exit 1
fi

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT

# The throwaway root holds:
# - the units where an install puts them;
# - an executable at the path ExecStart names: verify checks that it can be
#   executed and nothing more, so a placeholder stands in for the real binary;
# - the system's own units (network-online.target, multi-user.target ...), which
#   verify loads as our units' dependencies.
system_units=""
for d in /usr/lib/systemd/system /lib/systemd/system; do
  if [ -d "$d" ]; then system_units="$d"; break; fi
done
[ -n "$system_units" ] || { echo "verify.sh: no system unit directory found" >&2; exit 1; }
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp -a "$system_units" "$root/usr/lib/systemd/system"
printf '#!/bin/sh\nexit 0\n' >"$root/usr/local/bin/kiln"
chmod 0755 "$root/usr/local/bin/kiln"
for unit in "${units[@]}"; do
  cp "$unit_dir/$unit" "$root/etc/systemd/system/$unit"
done

failed=0
status=0
out="$(systemd-analyze verify --root="$root" "${units[@]}" 2>&1)" || status=$?
if [ -n "$out" ]; then
  echo "$out"
fi
if [ "$status" -ne 0 ]; then
  echo "verify.sh: systemd-analyze verify exited with $status" >&2
  failed=1
fi
# Lines about other units (a distribution's own) are shown but are not ours to fix.
if grep -q 'kiln-' <<<"$out"; then
  echo "verify.sh: systemd-analyze verify warned about the kiln units (above)" >&2
  failed=1
fi

# --offline came with systemd 250; older ones can only review running units.
version="$(systemd-analyze --version | awk 'NR == 1 {print $2}')"
if [ "${version%%.*}" -ge 250 ]; then
  for unit in "${units[@]}"; do
    status=0
    out="$(systemd-analyze security --offline=yes --root="$root" \
      --threshold="$threshold" "$unit" 2>&1)" || status=$?
    grep 'Overall exposure level' <<<"$out" || true
    if [ "$status" -ne 0 ]; then
      echo "$out" | grep -v '^✓' >&2
      echo "verify.sh: $unit: exposure above $max_exposure (or the review failed)" >&2
      failed=1
    fi
  done
else
  echo "verify.sh: systemd $version has no offline security review; skipped that part" >&2
fi

if [ "$failed" -ne 0 ]; then
  exit 1
fi
echo "verify.sh: ${units[*]} verified"
