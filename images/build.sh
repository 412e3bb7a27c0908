#!/usr/bin/env bash
# Build Tailor's images without a container daemon and without Docker Hub (`make images`).
#
#   images/build.sh [operator|workloads|workloads-cuda|all]     (default: all)
#
# 1. A base root filesystem from Debian's archive (mmdebstrap, minbase with python3 and its
#    venv module; docs, man pages and locales left out), imported into buildah's storage
#    once as localhost/tailor-base:$SUITE.
# 2. Each Dockerfile in images/ built on it (`buildah bud`, chroot isolation, no daemon),
#    the Python dependencies from PyPI as the Dockerfiles say.
# 3. Each image written as an OCI archive to $OUT (dist/images) with its size and digest in
#    $OUT/images.tsv; with PUSH=registry.example.com/team, pushed there too.
#
# Settings (environment): VERSION (the project's), SUITE (trixie), MIRROR
# (http://deb.debian.org/debian), TORCH_INDEX_URL (PyTorch's CPU index; set it to
# https://pypi.org/simple where only PyPI is reachable), PUSH (and PUSH_TLS_VERIFY=false for a
# registry without TLS), OUT, STORAGE_DRIVER (vfs:
# works as root anywhere; overlay where the kernel allows it).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${VERSION:-$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')}
SUITE=${SUITE:-trixie}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
OUT=${OUT:-dist/images}
PUSH=${PUSH:-}
PUSH_TLS_VERIFY=${PUSH_TLS_VERIFY:-true}  # false: a registry without TLS (a local test one)
export BUILDAH_ISOLATION=chroot STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
BASE=localhost/tailor-base:$SUITE

# name, Dockerfile and tag of each image: the chart's image names (charts/tailor/values.yaml)
declare -A FILE=([operator]=operator [workloads]=workloads [workloads-cuda]=workloads-cuda)
declare -A NAME=([operator]=tailor-operator [workloads]=tailor-workloads [workloads-cuda]=tailor-workloads)
declare -A TAG=([operator]=$VERSION [workloads]=$VERSION [workloads-cuda]=$VERSION-cuda)

for tool in mmdebstrap buildah; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install mmdebstrap buildah" >&2; exit 2; }
done

base() {
  if buildah inspect --type image "$BASE" >/dev/null 2>&1; then return; fi
  local tmp; tmp=$(mktemp -d)
  echo "== base: Debian $SUITE from $MIRROR"
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$SUITE" "$tmp/rootfs.tar" "$MIRROR"
  local ctr; ctr=$(buildah from scratch)
  buildah add "$ctr" "$tmp/rootfs.tar" /
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit --rm "$ctr" "$BASE"
  rm -rf "$tmp"
}

# Downloads during a build trust what this host trusts (a proxy with a CA of its own):
# the host's CA bundle and a pip.conf naming it are mounted into each RUN step only, never
# written into a layer.
BUILD_CA_BUNDLE=${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
trust=()
if [ -f "$BUILD_CA_BUNDLE" ]; then
  PIP_CONF=$(mktemp)
  trap 'rm -f "$PIP_CONF"' EXIT
  printf '[global]\ncert = /run/tailor-build/ca.crt\n' > "$PIP_CONF"
  trust=(--volume "$BUILD_CA_BUNDLE:/run/tailor-build/ca.crt:ro" --volume "$PIP_CONF:/etc/pip.conf:ro")
fi

unpacked_bytes() {  # the image's root filesystem, unpacked
  local ctr mnt bytes
  ctr=$(buildah from "$1")
  mnt=$(buildah mount "$ctr")
  bytes=$(du -sb "$mnt" | cut -f1)
  buildah rm "$ctr" >/dev/null
  echo "$bytes"
}

build() {
  local which=$1 image="localhost/${NAME[$1]}:${TAG[$1]}"
  echo "== $image (images/${FILE[$which]}.Dockerfile)"
  local start=$SECONDS
  buildah bud --file "images/${FILE[$which]}.Dockerfile" --build-arg "BASE=$BASE" \
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" "${trust[@]}" --tag "$image" .
  mkdir -p "$OUT"
  local archive="$OUT/${NAME[$which]}-${TAG[$which]}.oci.tar"
  rm -f "$archive"
  buildah push "$image" "oci-archive:$archive:${NAME[$which]}:${TAG[$which]}"
  # size: the image unpacked (what a node's disk holds); digest: the archive's manifest
  local size digest
  size=$(unpacked_bytes "$image")
  digest=$(tar -xOf "$archive" index.json | python3 -c 'import json, sys; print(json.load(sys.stdin)["manifests"][0]["digest"])')
  local row table="$OUT/images.tsv"
  row=$(printf '%s\t%s\t%s\t%s\t%s' "${NAME[$which]}:${TAG[$which]}" "$size" \
    "$(du -b "$archive" | cut -f1)" "$digest" "$((SECONDS - start))")
  { grep -v "^${NAME[$which]}:${TAG[$which]}	" "$table" || true; echo "$row"; } > "$table.new"
  mv "$table.new" "$table"  # one row per image, the newest build's
  if [ -n "$PUSH" ]; then
    buildah push --tls-verify="$PUSH_TLS_VERIFY" "$image" "docker://$PUSH/${NAME[$which]}:${TAG[$which]}"
  fi
}

base
mkdir -p "$OUT"
[ -s "$OUT/images.tsv" ] || printf 'image\tsize_bytes\tarchive_bytes\tdigest\tbuild_seconds\n' > "$OUT/images.tsv"
case "${1:-all}" in
  all) for which in operator workloads workloads-cuda; do build "$which"; done ;;
  operator|workloads|workloads-cuda) build "$1" ;;
  *) echo "usage: images/build.sh [operator|workloads|workloads-cuda|all]" >&2; exit 2 ;;
esac
buildah rmi --prune >/dev/null 2>&1 || true  # the build stages
column -t -s $'\t' "$OUT/images.tsv"
