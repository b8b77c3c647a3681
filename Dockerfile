# keyconnector container image: a drop-in for Bitwarden's Key Connector image.
#
# Same port (5000), same volume (/etc/bitwarden) and same default paths (key.pfx, kc.db, data.json,
# ca-certificates/), so an existing env file and volume work unchanged; see deploy/README.md.
# Like upstream's image it starts as root only to honour bitwarden.sh's uid.env: the entrypoint gives
# /etc/bitwarden to LOCAL_UID/LOCAL_GID (65534 when 0 or unset) and runs the service as them, never
# as root. Run it as a user (--user, runAsUser) and it starts as that user instead.
#
#   docker build -t keyconnector --build-arg COMMIT="$(git rev-parse HEAD)" .
#   docker run --env-file keyconnector.env -v /srv/bitwarden:/etc/bitwarden -p 5000:5000 keyconnector
#
# Two stages: compilers and pip stay in the builder, the runtime gets a finished virtualenv.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler only for the platforms where a dependency ships no wheel (it never reaches the runtime).
# Debian package versions are not pinned: a bookworm point release replaces them, and the image's
# reproducibility comes from the pinned base tag instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src

# Every provider (databases, PKCS#11, Vault, cloud KMS, OpenTelemetry): one image for every setting.
# The versions come from pyproject.toml's constraints; the project itself is what gets installed.
RUN python -m venv /opt/keyconnector \
    && /opt/keyconnector/bin/pip install ".[all]" \
    && /opt/keyconnector/bin/keyconnector --version


FROM ${PYTHON_IMAGE}

ARG KC_UID=1000
ARG KC_GID=1000
ARG VERSION=0.1.0
# The commit the image is built from (`docker build --build-arg COMMIT="$(git rev-parse HEAD)" .`):
# the image holds no git checkout, so `keyconnector --version` reads it from KEYCONNECTOR_COMMIT.
ARG COMMIT=unknown

LABEL org.opencontainers.image.title="keyconnector" \
      org.opencontainers.image.description="A drop-in, hardened replacement for Bitwarden's Key Connector" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${COMMIT}" \
      org.opencontainers.image.licenses="AGPL-3.0-or-later" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"

# tini: PID 1 that forwards SIGTERM to the server and reaps the worker processes.
# opensc-pkcs11: the library the `opensc` PKCS#11 provider loads from its Debian multiarch path
# (/usr/lib/<arch>-linux-gnu/opensc-pkcs11.so on amd64 and arm64 alike).
# ca-certificates: the system bundle that the entrypoint extends with the mounted CAs.
# setpriv (util-linux, part of every Debian image; checked here so a base change cannot drop it): how
# the entrypoint steps down from root.
# The keyconnector user (KC_UID) is the one the compose file and the chart run the image as.
# Versions unpinned for the reason given in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini opensc-pkcs11 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && setpriv --version \
    && groupadd --gid "${KC_GID}" keyconnector \
    && useradd --uid "${KC_UID}" --gid "${KC_GID}" --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin keyconnector \
    && mkdir -p /etc/bitwarden/ca-certificates \
    && chown -R "${KC_UID}:${KC_GID}" /etc/bitwarden \
    && chmod 0700 /etc/bitwarden

COPY --from=builder /opt/keyconnector /opt/keyconnector
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/keyconnector-entrypoint
COPY --chmod=0755 deploy/docker/healthcheck /usr/local/bin/keyconnector-healthcheck

# ASPNETCORE_URLS as in upstream's image: `serve` listens on every address, port 5000.
# PYTHONDONTWRITEBYTECODE: the root filesystem may be read-only (Kubernetes); bytecode is built in.
ENV PATH=/opt/keyconnector/bin:$PATH \
    KEYCONNECTOR_COMMIT=$COMMIT \
    ASPNETCORE_URLS=http://+:5000 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# No USER: the entrypoint decides (see the top of this file and deploy/docker/entrypoint.sh).
WORKDIR /etc/bitwarden
VOLUME /etc/bitwarden
EXPOSE 5000
STOPSIGNAL SIGTERM

# Ready (or degraded) answers 200; an unready service (no database, no key) fails the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/keyconnector-healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/keyconnector-entrypoint"]
CMD ["serve"]
