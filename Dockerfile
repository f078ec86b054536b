# kproxy's container image: `make image` (docker build -t kproxy:latest .); `make image-test` builds
# it with podman and runs it in a network namespace (integration/packaging/test_image.py, part of
# `make test`).
#
# Why Debian 12 (bookworm): python-iptables drives libiptc and libxtables directly, and it breaks
# on iptables 1.8.11 (match parameters such as `--dport` are refused: ldx/python-iptables#353).
# Debian 12 ships iptables 1.8.9, which works; Debian 13 ships 1.8.11. Re-run the integration
# tests against the new libraries before moving the base image to another release.

# Both stages start from Debian 12 itself and take Python from Debian (python3, 3.11), so the image
# is made of Debian's packages only: `make image-test` builds this base from them where no image
# registry is reachable (see integration/image.py).
#
# The builder compiles wheels: python-iptables is published as an sdist only and builds a small
# C extension, so it needs gcc and the Python headers.
FROM debian:bookworm-slim AS builder
# Debian package versions are not pinned (DL3008): bookworm's point releases replace them, and a
# pinned version that left the archive would break the build. The release itself is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        gcc \
        libc6-dev \
        python3 \
        python3-dev \
        python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY kproxy ./kproxy
# pip reaches the package index as pip does anywhere. Where it needs settings of its own (an
# index mirror, or a CA bundle for a proxy in the way), hand them in as build secrets, which stay
# out of the image: `pip.conf` (mounted as /etc/pip.conf) and `pip-ca.crt` (at
# /run/secrets/pip-ca.crt, for the pip.conf's `cert`). `make image` passes none; integration/image.py
# passes the host pip's own.
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt \
    pip wheel --no-cache-dir --wheel-dir /wheels .

# The runtime image: Debian's python3 (and its venv module, which holds kproxy and its
# dependencies apart from Debian's own Python packages); the legacy iptables libraries
# python-iptables loads (libip4tc2, libip6tc2, libxtables12), the iptables package for its
# extensions (libxt_*.so) and iptables-legacy-save, which kproxy reads the tables with; conntrack,
# iproute2 and nftables (`nft list table ip kube-proxy` in nftables mode) for debugging on the
# node; kmod for the modprobe python-iptables runs at import.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        conntrack \
        iproute2 \
        iptables \
        kmod \
        libip4tc2 \
        libip6tc2 \
        libxtables12 \
        nftables \
        python3 \
        python3-venv \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
    && update-alternatives --set iptables /usr/sbin/iptables-legacy \
    && update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy
# kproxy writes the legacy tables (libiptc); the alternatives above make the image's plain
# `iptables`, `iptables-save` and `iptables-restore` show those same tables.
COPY --from=builder /wheels /tmp/wheels
RUN python3 -m venv /opt/kproxy \
    && /opt/kproxy/bin/pip install --no-cache-dir --no-index --find-links=/tmp/wheels \
        /tmp/wheels/kproxy-*.whl \
    && rm -rf /tmp/wheels
ENV PATH=/opt/kproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# healthz (/healthz, /livez) and metrics, as kube-proxy; informational under hostNetwork.
EXPOSE 10256 10249
ENTRYPOINT ["kproxy"]
CMD ["--help"]
