# syntax=docker/dockerfile:1.7
# Netfence: one image for netfence-controller (default, non-root) and
# netfence-agent (target "agent": iptables nft + legacy backends and ipset).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build the wheel ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python -m build --wheel --outdir /dist

# --- runtime base: the package and its dependencies in a virtualenv ----------
FROM ${PYTHON_IMAGE} AS base
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="netfence" \
      org.opencontainers.image.description="Kubernetes NetworkPolicy enforcement with ipset + iptables and per-policy status" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/netfence/netfence" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV VIRTUAL_ENV=/opt/netfence \
    PATH=/opt/netfence/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /dist/*.whl /tmp/
RUN python -m venv /opt/netfence \
 && /opt/netfence/bin/pip install --no-cache-dir /tmp/*.whl \
 && rm -f /tmp/*.whl

# --- agent: needs netfilter tools; runs as root with NET_ADMIN/NET_RAW -------
FROM base AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset iproute2 \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["netfence-agent"]

# --- controller (default target): non-root -----------------------------------
FROM base AS controller
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin netfence
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["netfence-controller"]
