# syntax=docker/dockerfile:1
# One image for every component: `outbox relay` by default, and `outbox migrate`, `outbox dashboard`,
# `outbox demo --external` by command. A relay-only image without Streamlit/pandas/pyarrow (about
# 200 MB smaller): docker build --build-arg EXTRAS=codecs .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=codecs,dashboard
# A venv is the unit that moves to the runtime stage: no compilers, caches or pip metadata follow it.
RUN python -m venv /opt/outbox
WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox outbox
COPY relay relay
COPY inbox inbox
COPY dashboard dashboard
COPY sql sql
COPY examples examples
RUN /opt/outbox/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/outbox/bin/pip install --no-cache-dir ".[${EXTRAS}]"

FROM python:${PYTHON_VERSION}-slim
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/outbox --create-home --shell /usr/sbin/nologin outbox
COPY --from=build /opt/outbox /opt/outbox
# A container's own network namespace is the boundary, and probes and scrapes come from outside it,
# so here the servers listen on every interface (the settings' defaults stay loopback-only).
ENV PATH=/opt/outbox/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OUTBOX_METRICS_HOST=0.0.0.0 \
    OUTBOX_METRICS_PORT=9464 \
    OUTBOX_DASHBOARD_HOST=0.0.0.0 \
    OUTBOX_DASHBOARD_PORT=8501 \
    OUTBOX_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/outbox
EXPOSE 9464 8501
# Liveness of the relay (a standby is healthy too; readiness is /readyz). Python instead of curl:
# the slim image has no curl, and installing it only for this would grow the attack surface.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OUTBOX_METRICS_PORT', '9464') + '/healthz', timeout=2)"]
CMD ["outbox", "relay"]
