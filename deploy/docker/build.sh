#!/usr/bin/env bash
# Builds the kiln image (one image, every role) from a kiln binary built on this
# machine, without needing a container registry:
#
#   deploy/docker/build.sh [--binary PATH] [--tag IMAGE] [--base IMAGE]
#                          [--suite SUITE] [--mirror URL] [--rebuild-base]
#                          [--onnxruntime-lib PATH | --no-onnxruntime]
#
#   $KILN_BIN ──strip──────────────────────────► context/kiln ─┐
#   onnxruntime wheel's libonnxruntime.so.* ───► context/onnxruntime/ ─┤
#   apt-get download tini ─────────────────────► context/tini ─┤
#   Dockerfile ────────────────────────────────► context/      ├─ docker build ─► kiln:dev
#   debootstrap minbase (only apt mirror needed)               │
#     └─ keep what kiln and curl load (ldd), the CA bundle,    │
#        passwd/group ─ docker import ─► kiln-base:SUITE ──────┘ (BASE, cached)
#
# The base is the Debian release of this machine (its glibc is the one the binary
# was linked against), made once and reused while it holds every library the binary
# needs. With --base IMAGE (e.g. debian:bookworm-slim where a registry is
# reachable) no base is made; that image then has no curl or CA bundle.
#
# At the end the script runs `kiln --version` in the image and prints its size.
set -euo pipefail

KILN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The default binary is the one scripts/env.sh's target directory holds.
default_binary() {
  (source "$KILN_ROOT/scripts/env.sh" && echo "$KILN_BIN")
}

binary=""
tag="kiln:dev"
base=""
suite=""
mirror=""
rebuild_base=0
onnxruntime_lib=""
with_onnxruntime=1
while [ "$#" -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --suite) suite="$2"; shift 2 ;;
    --mirror) mirror="$2"; shift 2 ;;
    --rebuild-base) rebuild_base=1; shift ;;
    --onnxruntime-lib) onnxruntime_lib="$2"; shift 2 ;;
    --no-onnxruntime) with_onnxruntime=0; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$binary" ] || binary="$(default_binary)"
[ -x "$binary" ] || { echo "build.sh: no kiln binary at $binary (build it, or pass --binary)" >&2; exit 1; }

# debootstrap, chroot and removing the root-owned tree need root.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

work="$(mktemp -d)"
cleanup() { as_root rm -rf "$work"; }
trap cleanup EXIT

# The base must be the release the binary was linked on (or newer): same glibc.
if [ -z "$suite" ]; then
  # shellcheck source=/dev/null
  suite="$(. /etc/os-release && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}" || true)"
  [ -n "$suite" ] || { echo "build.sh: this is not Debian; pass --suite (the Debian release whose glibc the binary needs)" >&2; exit 1; }
fi
# The mirror this machine's apt uses (its first non-security Debian URI), so the
# base comes from wherever apt already works here.
if [ -z "$mirror" ]; then
  mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1 == "URIs:" {print $2}' | grep -v security | head -n1 || true)"
  [ -n "$mirror" ] || mirror="$(cat /etc/apt/sources.list 2>/dev/null | awk '$1 == "deb" && $2 !~ /security/ {print $2}' | head -n1 || true)"
  [ -n "$mirror" ] || mirror="http://deb.debian.org/debian"
fi

# The build context: the stripped binary (the dev profile is optimised; symbols
# only add size), tini, the Dockerfile and an empty data directory.
context="$work/context"
mkdir -p "$context/data"
cp "$KILN_ROOT/deploy/docker/Dockerfile" "$context/"
strip --strip-all -o "$context/kiln" "$binary"
# ONNX Runtime's library (PyPI's wheel, scripts/env.sh's kiln_onnxruntime_lib), where
# workers find it without a flag (/usr/local/lib/kiln/onnxruntime); without it the
# image's workers serve through tract.
mkdir -p "$context/onnxruntime"
if [ "$with_onnxruntime" -eq 1 ]; then
  [ -n "$onnxruntime_lib" ] || onnxruntime_lib="$(source "$KILN_ROOT/scripts/env.sh" && kiln_onnxruntime_lib)"
  [ -f "$onnxruntime_lib" ] || { echo "build.sh: no ONNX Runtime library at '$onnxruntime_lib' (pass --onnxruntime-lib PATH, or --no-onnxruntime to serve through tract)" >&2; exit 1; }
  cp "$onnxruntime_lib" "$context/onnxruntime/"
fi
version="$("$context/kiln" --version | awk 'NR == 1 {print $2}')"

# tini-static from Debian's package: static, so it runs on any base.
mkdir -p "$work/tini"
fetch_tini() { (cd "$work/tini" && apt-get download -qq -o APT::Sandbox::User=root tini >/dev/null); }
fetch_tini || { as_root apt-get update -qq && fetch_tini; }
dpkg-deb -x "$work"/tini/tini_*.deb "$work/tini/x"
cp "$work/tini/x/usr/bin/tini-static" "$context/tini"

# Shared libraries (sonames) an ELF file loads, as ldd prints them.
sonames() {
  awk '$2 == "=>" { print $1 } $1 ~ /^\// && /\(0x/ { n = split($1, p, "/"); print p[n] }' | sort -u
}
# Every ELF file the image runs: kiln and, when present, ONNX Runtime's library.
elves=("$context/kiln" "$context"/onnxruntime/libonnxruntime.so*)
[ -e "${elves[1]}" ] || elves=("$context/kiln")
needed="$(ldd "${elves[@]}" | sonames | grep -v '^linux-vdso' | paste -sd, -)"

make_base() {
  local tree="$work/debian" root="$work/rootfs"
  echo "build.sh: making $base_tag from Debian $suite ($mirror) with debootstrap" >&2
  if ! as_root debootstrap --variant=minbase --include=ca-certificates,curl \
      "$suite" "$tree" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    exit 1
  fi
  # Which files kiln and curl load, resolved inside the Debian tree (not on the
  # host), so the base holds Debian's own copies.
  local elf inside=()
  for elf in "${elves[@]}"; do
    as_root cp "$elf" "$tree/tmp/"
    inside+=("/tmp/$(basename "$elf")")
  done
  local ldd_out
  ldd_out="$(as_root chroot "$tree" ldd "${inside[@]}" /usr/bin/curl)"
  if grep -q 'not found' <<<"$ldd_out"; then
    echo "build.sh: libraries missing in the Debian tree:" >&2
    grep 'not found' <<<"$ldd_out" >&2
    exit 1
  fi
  # Same merged-/usr layout as Debian (lib -> usr/lib ...), so loader paths hold.
  mkdir -p "$root"/{etc/ssl/certs,usr/bin,usr/local/bin,usr/lib,var/lib,tmp,root}
  local d
  for d in bin sbin lib lib64; do
    if [ -L "$tree/$d" ]; then
      ln -s "$(readlink "$tree/$d")" "$root/$d"
      mkdir -p "$root/usr/$d"
    fi
  done
  local path
  while read -r path; do
    mkdir -p "$root$(dirname "$path")"
    cp -L "$tree$path" "$root$path"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && /\(0x/ { print $1 }' <<<"$ldd_out" | sort -u)
  cp "$tree/usr/bin/curl" "$root/usr/bin/curl"
  cp -L "$tree/etc/ssl/certs/ca-certificates.crt" "$root/etc/ssl/certs/"
  cp -L "$tree/etc/os-release" "$root/etc/os-release"
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  # The kiln user is 10001 so that it matches the Dockerfile's numeric USER.
  printf '%s\n' 'root:x:0:0:root:/root:/usr/sbin/nologin' \
    'kiln:x:10001:10001:kiln:/var/lib/kiln:/usr/sbin/nologin' \
    'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'kiln:x:10001:' 'nogroup:x:65534:' >"$root/etc/group"
  printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$root/etc/nsswitch.conf"
  local libs
  libs="$(sonames <<<"$ldd_out" | grep -v '^linux-vdso' | paste -sd, -)"
  local old
  old="$(docker image inspect --format '{{.Id}}' "$base_tag" 2>/dev/null || true)"
  tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
    --change "LABEL kiln.base.suite=$suite kiln.base.libs=$libs" \
    - "$base_tag" >/dev/null
  # The replaced base is removed when no image still builds on it.
  [ -z "$old" ] || docker image rm "$old" >/dev/null 2>&1 || true
}

# Reuses the local base when it holds every library the binary needs.
base_covers_binary() {
  local have lib
  have="$(docker image inspect --format '{{index .Config.Labels "kiln.base.libs"}}' "$base_tag" 2>/dev/null)" || return 1
  for lib in ${needed//,/ }; do
    [[ ",$have," == *",$lib,"* ]] || { echo "build.sh: $base_tag lacks $lib" >&2; return 1; }
  done
}

if [ -z "$base" ]; then
  base_tag="kiln-base:$suite"
  if [ "$rebuild_base" -eq 1 ] || ! base_covers_binary; then
    make_base
  else
    echo "build.sh: reusing $base_tag (--rebuild-base makes it again)" >&2
  fi
  base="$base_tag"
fi

old_image="$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
docker build --force-rm --build-arg BASE="$base" --build-arg KILN_VERSION="$version" \
  -t "$tag" "$context" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
new_image="$(docker image inspect --format '{{.Id}}' "$tag")"
if [ -n "$old_image" ] && [ "$old_image" != "$new_image" ]; then
  docker image rm "$old_image" >/dev/null 2>&1 || true
fi

# The image must run the binary: a missing library shows up here, not in production.
docker run --rm "$tag" --version
size="$(docker image inspect --format '{{.Size}}' "$tag")"
echo "built $tag (kiln $version on $base): $size bytes ($((size / 1024 / 1024)) MiB)"
