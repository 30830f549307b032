#!/usr/bin/env bash
# Builds the local `debian:bookworm-slim` image with debootstrap when it is absent.
# Test machines reach no container registry, only the Debian and PyPI mirrors, so the
# base image that every Dockerfile here starts FROM is made from the host's apt mirror.
# Real users pull the real image; this exists for the tests only.
set -euo pipefail

IMAGE="${BASE_IMAGE:-debian:bookworm-slim}"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE present"
    exit 0
fi

mirror_from_host() {
    # The first `URIs:` of the host's deb822 sources (or the first `deb` line of the
    # classic format): never a hard-coded host.
    local uri=""
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
        uri="$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)"
    fi
    if [ -z "$uri" ]; then
        echo "bootstrap-base-image: no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list" >&2
        exit 1
    fi
    echo "$uri"
}

MIRROR="$(mirror_from_host)"
ROOTFS="$(mktemp -d /tmp/ssh-proxy-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

echo "bootstrapping $IMAGE from $MIRROR"
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >/tmp/ssh-proxy-debootstrap.log 2>&1 || {
    tail -30 /tmp/ssh-proxy-debootstrap.log >&2
    exit 1
}

# The build machine may reach the mirrors through a TLS-intercepting egress: its CAs must
# be inside the image for apt (https) and pip to work during `docker build`.
mkdir -p "$ROOTFS/usr/local/share/ca-certificates" "$ROOTFS/etc/ssl/certs"
cp /usr/local/share/ca-certificates/* "$ROOTFS/usr/local/share/ca-certificates/" 2>/dev/null || true
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
# Same mirror inside the image as on the host.
cp /etc/apt/sources.list.d/debian.sources "$ROOTFS/etc/apt/sources.list.d/debian.sources" 2>/dev/null \
    && rm -f "$ROOTFS/etc/apt/sources.list" || true
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*

tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["bash"]' \
    - "$IMAGE" >/dev/null
echo "base image $IMAGE imported"
