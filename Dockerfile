# kubetune operator image: `python -m kubetune_operator` (kopf), configured by KUBETUNE_* env
# (see charts/kubetune/templates/deployment.yaml). Build from the repository root:
#   docker build -t ghcr.io/kubetune/operator:0.1.0 .
# Python dependencies come from uv.lock (the `operator` extra) exactly as `make setup` installs
# them; nothing is resolved at build time.

# The base: the published Python image by default. `make images` builds without a registry and
# passes a stand-in assembled from Debian 12's packages (hack/build-images.sh, docs/images.md).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- lock: the operator's pinned requirements (versions and hashes), exported from uv.lock ---
# pyproject.toml also holds the linters' and the tests' settings, which change far more often
# than the dependencies. The virtualenv below is built from this export alone, so its layers
# are reused unless the operator's own locked requirements change (a change to pyproject.toml's
# tool settings, or a lock change that only touches other extras, rebuilds nothing big).
FROM ${PYTHON_IMAGE} AS lock
# uv pinned to the version the Makefile installs (UV_VERSION).
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN uv export --frozen --no-dev --no-emit-project --extra operator \
      --format requirements.txt --output-file requirements.txt

# ---- build: a virtualenv with the locked operator dependencies -------------------------------
FROM ${PYTHON_IMAGE} AS build
RUN pip install --no-cache-dir uv==0.13.8
# UV_NATIVE_TLS: uv trusts the system's CA bundle, like pip, so a build behind a TLS-inspecting
# proxy works once its CA is in the bundle (make images binds the host's bundle over it).
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NATIVE_TLS=1 \
    UV_PYTHON_DOWNLOADS=never \
    VIRTUAL_ENV=/opt/venv
WORKDIR /src
COPY --from=lock /src/requirements.txt ./
# uv's download cache as a build cache mount (BuildKit and buildah): a rebuild downloads nothing.
# make images points it at the host's uv cache, so what `make setup` fetched is not fetched again.
# Third-party packages only (the project's own code is copied below), every hash checked.
RUN --mount=type=cache,id=kubetune-uv,target=/root/.cache/uv,sharing=locked \
    uv venv /opt/venv && uv pip sync --require-hashes requirements.txt

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
