# kubetune operator image: `python -m kubetune_operator` (kopf), configured by KUBETUNE_* env
# (see charts/kubetune/templates/deployment.yaml). Build from the repository root:
#   docker build -t ghcr.io/kubetune/operator:0.1.0 .
# Python dependencies come from uv.lock (the `operator` extra) exactly as `make setup` installs
# them; nothing is resolved at build time.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a virtualenv with the locked operator dependencies -------------------------------
FROM ${PYTHON_IMAGE} AS build
# uv pinned to the version the Makefile installs (UV_VERSION).
RUN pip install --no-cache-dir uv==0.13.8
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
COPY pyproject.toml uv.lock ./
# Third-party packages only (the project's own code is copied below), straight from the lock.
RUN uv sync --frozen --no-dev --no-install-project --extra operator

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune: Kubernetes operator for QLoRA/LoRA fine-tuning jobs" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed non-root UID/GID (matches the chart's securityContext.runAsUser).
RUN groupadd --system --gid 65532 kubetune \
    && useradd --system --no-log-init --uid 65532 --gid 65532 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin kubetune
COPY --from=build /opt/venv /opt/venv
# The API contract (pydantic models) and the operator package; not the trainer.
COPY api/kubetune_api /app/api/kubetune_api
COPY operator/kubetune_operator /app/operator/kubetune_operator
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app/api:/app/operator \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Byte-compile the project's own code now: at run time the root filesystem is read-only.
RUN python -m compileall -q /app
WORKDIR /app
USER 65532:65532
# Prometheus /metrics and the /healthz liveness endpoint.
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "kubetune_operator"]
