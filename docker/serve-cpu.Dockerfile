# syntax=docker/dockerfile:1
# The inference service on CPU: FastAPI + ONNX Runtime (the `cpu` extra). No PyTorch, no training code's
# dependencies, no model, no data, no secrets: the model comes from the registry volume, settings and
# secrets from the environment (k8s/base/inference).
#   docker build -f docker/serve-cpu.Dockerfile -t wbc/serve-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/wbc
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models/ models/
COPY federation/ federation/
COPY service/ service/
COPY cli/ cli/
RUN /opt/wbc/bin/pip install ".[cpu]" \
 && /opt/wbc/bin/python -c "import service.main, cli.main"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 wbc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin wbc
COPY --from=build /opt/wbc /opt/wbc
ENV PATH=/opt/wbc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WBC_HOST=0.0.0.0 \
    WBC_PORT=8080 \
    WBC_REGISTRY=/models \
    WBC_DEVICE=cpu
WORKDIR /srv/wbc
USER 10001:10001
EXPOSE 8080
CMD ["wbc", "serve"]
