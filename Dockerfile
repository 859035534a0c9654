# syntax=docker/dockerfile:1.7
# Netfence images, from the repository root:
#   docker build --target controller -t ghcr.io/netfence/netfence-controller:0.1.0 .
#   docker build --target agent      -t ghcr.io/netfence/netfence-agent:0.1.0 .
# controller: non-root, no network tools. agent: root with (in the chart)
# only NET_ADMIN + NET_RAW, iptables with both the nft and the legacy backend,
# and ipset. Entry points are the package's console scripts.
# tests/unit/test_dockerfile.py lints this file (hadolint) and checks its
# stages; tests/integration/test_image.py builds the wheel and installs it with
# image/install-wheel.sh exactly as the runtime stage does.

# Pinned to a patch release; pin the digest too with
# --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build the wheel ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python -m build --wheel --outdir /dist

# --- runtime base: the wheel and its dependencies in a virtualenv -------------
FROM ${PYTHON_IMAGE} AS base
# Keep equal to pyproject.toml's version (tests/unit/test_dockerfile.py checks it).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="netfence" \
      org.opencontainers.image.description="Kubernetes NetworkPolicy enforcement with ipset + iptables and per-policy status" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/netfence/netfence" \
      org.opencontainers.image.url="https://github.com/netfence/netfence" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV VIRTUAL_ENV=/opt/netfence \
    PATH=/opt/netfence/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY image/install-wheel.sh /usr/local/lib/netfence/install-wheel.sh
COPY --from=build /dist/ /tmp/dist/
RUN sh /usr/local/lib/netfence/install-wheel.sh /opt/netfence /tmp/dist \
 && rm -rf /tmp/dist

# --- agent: netfilter tools; runs as root with NET_ADMIN/NET_RAW --------------
FROM base AS agent
# Debian's iptables package carries both backends (iptables-nft-* and
# iptables-legacy-*); the entry point picks the one the node uses.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset \
 && rm -rf /var/lib/apt/lists/*
COPY image/install-iptables-backends.sh /usr/local/lib/netfence/install-iptables-backends.sh
COPY image/agent-entrypoint.sh /usr/local/bin/netfence-agent-entrypoint
RUN sh /usr/local/lib/netfence/install-iptables-backends.sh /usr/local/lib/netfence /usr/sbin \
 && chmod 0755 /usr/local/bin/netfence-agent-entrypoint
# Picks the iptables backend, then execs the netfence-agent console script.
ENTRYPOINT ["/usr/local/bin/netfence-agent-entrypoint"]

# --- controller (default target): non-root ------------------------------------
FROM base AS controller
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin netfence
USER 10001:10001
# Kopf health endpoint (/healthz)
EXPOSE 8080
ENTRYPOINT ["netfence-controller"]
