# metergate gateway image: one replica of the fleet (docs/deployment.md).
#
#   docker build -t metergate:0.1.0 .
#   docker build --build-arg EXTRAS=mcp -t metergate:0.1.0-mcp .   # with the MCP gateway
#   docker build --build-arg EXTRAS=mcp,tracing,bedrock,vertex ...  # extras, comma-separated
#   docker run -p 4000:4000 -v $PWD/gateway.yaml:/etc/metergate/gateway.yaml:ro \
#       -e OPENAI_API_KEY -e POSTGRES_PASSWORD ... metergate:0.1.0
#
# The config is read from /etc/metergate/gateway.yaml (mount it; `${VAR}` references in
# it are filled from the container's environment, so secrets come in as env vars). The
# root filesystem can be read-only: the gateway only writes to /tmp (the multi-worker
# metrics directory), so give it a tmpfs or an emptyDir there.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package build needs (see .dockerignore): pyproject, README, src.
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/metergate \
    && /opt/metergate/bin/pip install "/src${EXTRAS:+[$EXTRAS]}" \
    && /opt/metergate/bin/metergate --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="metergate" \
      org.opencontainers.image.description="Self-hosted OpenAI-compatible gateway that routes, meters and guards LLM and MCP traffic." \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/metergate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    METERGATE_CONFIG=/etc/metergate/gateway.yaml
RUN groupadd --system --gid 10001 metergate \
    && useradd --system --uid 10001 --gid metergate --home-dir /var/lib/metergate \
       --create-home --shell /usr/sbin/nologin metergate \
    && mkdir -p /etc/metergate /var/lib/metergate/spool \
    && chown metergate:metergate /var/lib/metergate/spool
COPY --from=build /opt/metergate /opt/metergate
WORKDIR /var/lib/metergate
USER 10001:10001
EXPOSE 4000
# /healthz: the process is alive (readiness, /readyz, also needs the ledger database).
# No curl in the slim image: the interpreter that is there does the request.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:4000/healthz', timeout=2)"]
# SIGTERM: finish requests in flight (up to 30 s), commit every queued ledger row, exit.
STOPSIGNAL SIGTERM
CMD ["metergate", "serve", "--config", "/etc/metergate/gateway.yaml", "--host", "0.0.0.0", "--workers", "2"]
