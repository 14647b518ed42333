# syntax=docker/dockerfile:1
# The inference service on NVIDIA GPUs: onnxruntime-gpu (the `gpu` extra) with CUDA 12 and cuDNN 9 from
# their PyPI wheels, so the image needs only the node's driver (NVIDIA container toolkit / device plugin).
# onnxruntime-gpu also runs on CPU; never install it beside `onnxruntime` (both provide the same module).
# No PyTorch, no model, no data, no secrets.
#   docker build -f docker/serve-gpu.Dockerfile -t wbc/serve-gpu:0.1.0 .
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
RUN /opt/wbc/bin/pip install ".[gpu]" "onnxruntime-gpu[cuda,cudnn]" \
 && /opt/wbc/bin/python -c "import service.main, cli.main"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 wbc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin wbc
COPY --from=build /opt/wbc /opt/wbc
ARG NV=/opt/wbc/lib/python3.11/site-packages/nvidia
# ONNX Runtime's CUDA provider loads these with dlopen; the wheels put them under site-packages.
ENV LD_LIBRARY_PATH=${NV}/cuda_runtime/lib:${NV}/cudnn/lib:${NV}/cublas/lib:${NV}/cufft/lib:${NV}/curand/lib:${NV}/cuda_nvrtc/lib \
    PATH=/opt/wbc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    WBC_HOST=0.0.0.0 \
    WBC_PORT=8080 \
    WBC_REGISTRY=/models \
    WBC_DEVICE=cuda
WORKDIR /srv/wbc
USER 10001:10001
EXPOSE 8080
CMD ["wbc", "serve"]
