#!/usr/bin/env bash
# Build Tailor's three images from nothing and smoke-run each one's entry points from its own
# root filesystem, as the chart runs them: UID 1000, the root filesystem read-only, /tmp and
# HOME writable. Not part of `make test` (it downloads torch twice); run as root:
#
#   tests/images/run.sh            # empty buildah storage first, then `images/build.sh all`
#   KEEP=1 tests/images/run.sh     # smoke-run what buildah storage holds (builds what is missing)
#   ONLY=operator tests/images/run.sh     # one image: operator, workloads or workloads-cuda
#
# TORCH_INDEX_URL and the other settings of images/build.sh pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
export BUILDAH_ISOLATION=chroot STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
VERSION=${VERSION:-$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')}
ONLY=${ONLY:-all}

if [ -z "${KEEP:-}" ]; then
  echo "== emptying buildah storage"
  buildah rm --all >/dev/null 2>&1 || true
  buildah rmi --all --force >/dev/null 2>&1 || true
fi
start=$SECONDS
if [ -z "${KEEP:-}" ]; then
  images/build.sh "$ONLY"
else
  declare -A REF=([operator]=tailor-operator:$VERSION [workloads]=tailor-workloads:$VERSION
                  [workloads-cuda]=tailor-workloads:$VERSION-cuda)
  for which in operator workloads workloads-cuda; do
    if { [ "$ONLY" = all ] || [ "$ONLY" = "$which" ]; } &&
       ! buildah inspect --type image "localhost/${REF[$which]}" >/dev/null 2>&1; then
      images/build.sh "$which"
    fi
  done
fi
echo "== built in $((SECONDS - start)) s"

# smoke IMAGE COMMAND...: run COMMAND in IMAGE's root filesystem, mounted read-only, as UID
# 1000, with tmpfs on /tmp and HOME (the chart's emptyDirs), in a mount namespace of its own.
smoke() {
  local image=$1; shift
  local ctr mnt
  ctr=$(buildah from "$image")
  mnt=$(buildah mount "$ctr")
  echo "-- $image: $*"
  unshare --mount --fork bash -euc '
    root=$(mktemp -d)
    mount --bind "$1" "$root" && mount -o remount,bind,ro "$root"
    mount -t tmpfs -o size=1g tmpfs "$root/tmp"
    mount -t tmpfs -o size=1g,uid=1000,gid=1000 tmpfs "$root/home/tailor"
    mount --rbind /dev "$root/dev" && mount -t proc proc "$root/proc"
    shift
    exec chroot --userspec=1000:1000 "$root" /usr/bin/env -i PATH=/opt/tailor/bin:/usr/bin:/bin \
      HOME=/home/tailor HF_HOME=/home/tailor/.cache/huggingface HF_HUB_OFFLINE=1 "$@"
  ' smoke "$mnt" "$@"
  buildah rm "$ctr" >/dev/null
}

CHECK_USER='import os, pathlib
assert os.getuid() == 1000 and os.getgid() == 1000, (os.getuid(), os.getgid())
try:
    pathlib.Path("/opt/tailor/written").write_text("x")
except OSError as exc:
    print("read-only root filesystem:", exc.strerror)
else:
    raise SystemExit("the root filesystem is writable")'

if [ "$ONLY" = all ] || [ "$ONLY" = operator ]; then
  op=localhost/tailor-operator:$VERSION
  smoke "$op" tailor --help
  smoke "$op" tailor operator run --help
  smoke "$op" python -c "$CHECK_USER"
  smoke "$op" python -c 'import importlib.util, kopf, tailor.controllers.context, tailor.runtime.kubernetes
assert importlib.util.find_spec("torch") is None, "torch in the operator image"
print("kopf", kopf.__version__ if hasattr(kopf, "__version__") else "", "imports; no torch")'
fi

PROGRAMS="training.trainer knowledge.index serving.app evaluation.prompt_tests raft.data raft.evaluate evaluation.measure"
for variant in workloads workloads-cuda; do
  if [ "$ONLY" != all ] && [ "$ONLY" != "$variant" ]; then continue; fi
  tag=$VERSION; [ "$variant" = workloads-cuda ] && tag=$VERSION-cuda
  image=localhost/tailor-workloads:$tag
  smoke "$image" python -c "$CHECK_USER"
  # what the workload extra ships (trl is a benchmark baseline, not in the images)
  smoke "$image" python -c 'import torch, transformers, peft, accelerate, sentence_transformers, xgrammar, qdrant_edge
from tailor.workloads.io.sources import builtin_path
for name in ("smollm2-135m-instruct", "minilm-l6-v2"):
    print(name, builtin_path(name))
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  for program in $PROGRAMS; do
    smoke "$image" python -m "tailor.workloads.$program" --help >/dev/null
    echo "   tailor.workloads.$program --help: ok"
  done
done
# `make images PUSH=...` against a real registry (Debian's docker-registry, the CNCF
# distribution server, on loopback without TLS): the operator image goes in and its manifest
# comes back by tag.
if command -v docker-registry >/dev/null && { [ "$ONLY" = all ] || [ "$ONLY" = operator ]; }; then
  reg=$(mktemp -d)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf 'version: 0.1\nstorage: {filesystem: {rootdirectory: %s/data}}\nhttp: {addr: 127.0.0.1:%s}\n' \
    "$reg" "$port" > "$reg/config.yml"
  docker-registry serve "$reg/config.yml" > "$reg/log" 2>&1 &
  registry=$!
  trap 'kill $registry 2>/dev/null || true' EXIT
  sleep 2
  buildah push --tls-verify=false "localhost/tailor-operator:$VERSION" \
    "docker://127.0.0.1:$port/team/tailor-operator:$VERSION" >/dev/null
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$port/v2/team/tailor-operator/manifests/$VERSION" | grep -q '"layers"'
  echo "-- pushed to a registry and read back: 127.0.0.1:$port/team/tailor-operator:$VERSION"
fi

cat dist/images/images.tsv
echo "== all images built and smoke-run in $((SECONDS - start)) s"
