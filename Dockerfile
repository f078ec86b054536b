# kproxy's container image: `make image` (docker build -t kproxy:latest .). Not built in CI.
#
# Why Debian 12 (bookworm): python-iptables drives libiptc and libxtables directly, and it breaks
# on iptables 1.8.11 (match parameters such as `--dport` are refused: ldx/python-iptables#353).
# Debian 12 ships iptables 1.8.9, which works; Debian 13 ships 1.8.11. Re-run the integration
# tests against the new libraries before moving the base image to another release.

# The builder compiles wheels: python-iptables is published as an sdist only and builds a small
# C extension, so it needs gcc and the Python headers (the python image ships the headers).
FROM python:3.11-slim-bookworm AS builder
# Debian package versions are not pinned (DL3008): bookworm's point releases replace them, and a
# pinned version that left the archive would break the build. The release itself is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY kproxy ./kproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# The runtime image: the legacy iptables libraries python-iptables loads (libip4tc2, libip6tc2,
# libxtables12), the iptables package for its extensions (libxt_*.so) and iptables-legacy-save,
# which kproxy reads the tables with; conntrack and iproute2 for debugging on the node; kmod for
# the modprobe python-iptables runs at import.
FROM python:3.11-slim-bookworm
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
    && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
    && update-alternatives --set iptables /usr/sbin/iptables-legacy \
    && update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy
# kproxy writes the legacy tables (libiptc); the alternatives above make the image's plain
# `iptables`, `iptables-save` and `iptables-restore` show those same tables.
COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-cache-dir --root-user-action=ignore --no-index --find-links=/tmp/wheels \
        /tmp/wheels/kproxy-*.whl \
    && rm -rf /tmp/wheels
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# healthz (/healthz, /livez) and metrics, as kube-proxy; informational under hostNetwork.
EXPOSE 10256 10249
ENTRYPOINT ["kproxy"]
CMD ["--help"]
