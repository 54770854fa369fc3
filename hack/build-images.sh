#!/usr/bin/env bash
# make images: build the operator (Dockerfile) and trainer (trainer_image/Dockerfile) images with
# buildah, without a Docker engine or a registry (see docs/images.md).
#
# - The Dockerfiles' base is the build argument PYTHON_IMAGE (default: the published
#   python:3.11.14-slim-bookworm). No registry is reachable here, so unless KUBETUNE_BASE_IMAGE
#   names an image already in the store, a stand-in is assembled from Debian 12's own packages
#   with mmdebstrap (python3.11, pip, venv, passwd), tagged by a hash of its recipe, built once.
# - Layers are cached by content (buildah --layers: a COPY's key is the digest of what it copies),
#   so an unchanged tree rebuilds nothing.
# - The Dockerfiles' uv cache mount is the host's uv cache (UV_CACHE_DIR, default ~/.cache/uv),
#   so `uv sync --frozen` copies the wheels that `make setup` already downloaded.
# - `--isolation chroot` (no OCI runtime, no user namespace) and overlay storage by default;
#   KUBETUNE_STORAGE_DRIVER=vfs works too but copies every layer in full (docs/images.md).
#
# Environment: KUBETUNE_IMAGE_STORE (default ~/.cache/kubetune/images/buildah-<version>-<driver>),
# KUBETUNE_STORAGE_DRIVER (overlay), KUBETUNE_BASE_IMAGE, KUBETUNE_IMAGE_VERSION (the chart's
# appVersion), KUBETUNE_IMAGES ("operator trainer"), UV_CACHE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

DRIVER=${KUBETUNE_STORAGE_DRIVER:-overlay}
BUILDAH_VERSION=$(buildah version | awk '/^Version:/ {print $2}')
STORE=${KUBETUNE_IMAGE_STORE:-$HOME/.cache/kubetune/images/buildah-$BUILDAH_VERSION-$DRIVER}
VERSION=${KUBETUNE_IMAGE_VERSION:-$(awk -F'"' '/^appVersion:/ {print $2}' charts/kubetune/Chart.yaml)}
UV_CACHE=${UV_CACHE_DIR:-$HOME/.cache/uv}
WHICH=${KUBETUNE_IMAGES:-operator trainer}
mkdir -p "$STORE" "$UV_CACHE"
buildah_() { buildah --root "$STORE/root" --runroot "$STORE/runroot" --storage-driver "$DRIVER" "$@"; }
say() { echo "kubetune images: $*"; }

# ---- the local base: Debian 12's python3.11 laid out like python:3.11-slim -------------------
# `python`/`pip` on PATH, pip allowed to install (no EXTERNALLY-MANAGED marker, as in the
# python image, whose Python is not Debian's), LANG=C.UTF-8, no docs, man pages or locales.
BASE_PACKAGES="python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd"
BASE_RECIPE="bookworm minbase $BASE_PACKAGES nodocs-v1 $(mmdebstrap --version 2>/dev/null || true)"
BASE_TAG=localhost/kubetune/python:3.11-bookworm-$(sha256sum <<<"$BASE_RECIPE" | cut -c1-12)

local_base() {
  if buildah_ inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
    say "base $BASE_TAG: cached"
    return
  fi
  local tmp start
  start=$SECONDS
  tmp=$(mktemp -d "$STORE/base.XXXXXX")
  say "base $BASE_TAG: mmdebstrap bookworm ($BASE_PACKAGES)"
  mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$tmp/rootfs.tar" http://deb.debian.org/debian
  local ctr
  ctr=$(buildah_ from scratch)
  buildah_ add --quiet "$ctr" "$tmp/rootfs.tar" /
  buildah_ config --env LANG=C.UTF-8 --cmd python3 \
    --label org.opencontainers.image.description="kubetune local base: Debian 12 python3.11 (mmdebstrap)" "$ctr"
  buildah_ commit --quiet --rm "$ctr" "$BASE_TAG" >/dev/null
  rm -rf "$tmp"
  say "base $BASE_TAG: built in $((SECONDS - start)) s"
}

build_image() {  # name dockerfile
  local name=$1 dockerfile=$2 start
  start=$SECONDS
  say "$name: buildah build -f $dockerfile (base $BASE)"
  buildah_ build --layers --isolation chroot --pull=never \
    --build-arg PYTHON_IMAGE="$BASE" \
    "${TRUST[@]}" \
    -f "$dockerfile" -t "ghcr.io/kubetune/$name:$VERSION" . >/dev/null
  local size
  size=$(buildah_ images --format '{{.Size}}' "ghcr.io/kubetune/$name:$VERSION")
  say "$name: ghcr.io/kubetune/$name:$VERSION ($size) in $((SECONDS - start)) s"
}

# The host's CA bundle (this sandbox's egress proxy signs TLS with its own CA) for the build's
# RUN steps only: pip (Debian's uses the system bundle) and uv (told to by a uv.toml) trust what
# the host trusts. Bind mounts are not part of any layer: the images keep their own bundle.
# The bundle exists in every stage of both images, so the bind mount leaves no mount point behind.
TRUST=()
CA_BUNDLE=${KUBETUNE_BUILD_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
if [ -f "$CA_BUNDLE" ]; then
  TRUST=(--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi
# The Dockerfiles' uv cache mount (id=kubetune-uv) is <TMPDIR>/buildah-cache/kubetune-uv for
# buildah: a link there to the host's uv cache makes the build reuse what `make setup` fetched.
export TMPDIR=$STORE/tmp
mkdir -p "$TMPDIR/buildah-cache"
ln -sfn "$UV_CACHE" "$TMPDIR/buildah-cache/kubetune-uv"

# A failed build leaves its working container (and its overlay mount) behind: none is kept.
buildah_ rm --all >/dev/null

if [ -n "${KUBETUNE_BASE_IMAGE:-}" ]; then
  BASE=$KUBETUNE_BASE_IMAGE
else
  local_base
  BASE=$BASE_TAG
fi
for name in $WHICH; do
  case $name in
    operator) build_image operator Dockerfile ;;
    trainer) build_image trainer trainer_image/Dockerfile ;;
    *) echo "kubetune images: unknown image $name" >&2; exit 2 ;;
  esac
done
# The node agent's OCI mode and tests/images find the images through this link.
ln -sfn "$STORE" "$HOME/.cache/kubetune/images/current"
say "store $STORE ($DRIVER): $(du -sh "$STORE" 2>/dev/null | cut -f1); linked from ~/.cache/kubetune/images/current"
