# syntax=docker/dockerfile:1
# meterproxy: a metering, prepaid-credit, Stripe-billing reverse proxy sidecar.
#   docker build -t meterproxy .
#   docker run -e METERPROXY_ADMIN_TOKEN=... -e UPSTREAM_URL=http://api:9000 \
#              -v meterproxy-data:/data -p 8080:8080 meterproxy

# ---- build stage: a virtualenv with meterproxy and its dependencies ----
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir /src

# ---- runtime stage: slim, non-root, nothing but the venv, rules and config ----
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    METERPROXY_CONFIG=/etc/meterproxy/meterproxy.yaml \
    METERPROXY_DB=/data/meterproxy.db \
    METERPROXY_ADMIN_PORT=9090
RUN groupadd --system --gid 10001 meterproxy \
 && useradd --system --uid 10001 --gid meterproxy --home-dir /data --no-create-home meterproxy \
 && mkdir -p /data /etc/meterproxy \
 && chown meterproxy:meterproxy /data
COPY --from=build /opt/venv /opt/venv
COPY rules /etc/meterproxy/rules
COPY deploy/meterproxy.yaml /etc/meterproxy/meterproxy.yaml
VOLUME ["/data"]
USER 10001:10001
WORKDIR /data
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['METERPROXY_ADMIN_PORT'], timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["meterproxy"]
CMD ["serve"]
