#!/usr/bin/env bash
# Make a python:3.11-slim-style base image without a registry: debootstrap a Debian bookworm root
# filesystem with Python 3.11 and import it into the local engine.
#
#   docker/make-base.sh [TAG]          default TAG: erc-base:bookworm
#
# Environment: DOCKER (client, default /usr/bin/docker), MIRROR (Debian mirror; default: the first
# deb.debian.org-style URI apt uses on this host, else http://deb.debian.org/debian), WORKDIR
# (where the root filesystem is built; default a temporary directory, removed afterwards).
# Needs root and the debootstrap package. Then: docker build --build-arg BASE=TAG ...
set -euo pipefail

TAG=${1:-erc-base:bookworm}
DOCKER=${DOCKER:-/usr/bin/docker}
export DOCKER_BUILDKIT=1

if [[ -z "${MIRROR:-}" ]]; then
    # the mirror apt already reaches here (deb822 or one-line sources), falling back to Debian's CDN
    MIRROR=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | grep -v security | head -n1 | tr -d ' ' || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

command -v debootstrap >/dev/null || { echo "make-base: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

own_workdir=0
if [[ -z "${WORKDIR:-}" ]]; then
    WORKDIR=$(mktemp -d /var/tmp/erc-base.XXXXXX)
    own_workdir=1
fi
cleanup() { if [[ $own_workdir == 1 ]]; then rm -rf "$WORKDIR"; fi; }
trap cleanup EXIT

ROOTFS="$WORKDIR/rootfs"
# What python:3.11-slim has and erc needs: Python 3.11 with venv/ensurepip (python3.11-venv depends on
# the virtual package python3.11-distutils, which debootstrap does not resolve: python3-distutils
# provides it) and ca-certificates. Nothing else: every compiled wheel erc installs (torch, opencv
# headless, av, soundfile, opensmile) bundles its libraries beyond libc, libstdc++ and zlib.
PACKAGES=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,ca-certificates

echo "make-base: debootstrap bookworm from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOTFS" "$MIRROR"

# What a registry image would not carry: apt lists, caches, logs, the host's resolv.conf.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/* "$ROOTFS"/debootstrap
: > "$ROOTFS/etc/resolv.conf"
printf 'deb %s bookworm main\n' "$MIRROR" > "$ROOTFS/etc/apt/sources.list"

tar --numeric-owner -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3.11"]' \
    - "$TAG"
"$DOCKER" image ls "$TAG"
