# syntax=docker/dockerfile:1
# sidrec serving image: multi-stage, non-root, CPU torch by default.
#
#   docker build -t sidrec .                                  # CPU
#   docker build -t sidrec:cu124 --build-arg TORCH_VARIANT=cu124 .   # CUDA 12.4 wheels (+ Triton)
#   docker run --rm -p 127.0.0.1:8000:8000 -v $PWD/bundles/demo:/bundle:ro sidrec
#
# The image holds the serving code only (model/, kernels/, service/): a bundle is mounted at
# /bundle (SIDREC_BUNDLE_PATH). CUDA wheels carry their own CUDA runtime; the host needs the
# NVIDIA driver and container toolkit (`docker run --gpus all ... -e SIDREC_DEVICE=cuda`).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY kernels ./kernels
COPY service ./service
RUN pip install ".[serve]" \
 && if [ "${TORCH_VARIANT}" != "cpu" ]; then pip install "triton>=3.0"; fi \
 && python -c "import service.app, model.engine"

FROM python:${PYTHON_VERSION}-slim AS runtime
# A C compiler: the engine builds its fused CPU kernels on first use (kernels/cpu_fused.py;
# without one it falls back to torch ops), and Triton compiles its launchers with it on a GPU.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 sidrec && useradd --uid 10001 --gid sidrec --no-create-home --shell /usr/sbin/nologin sidrec
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    SIDREC_HOST=0.0.0.0 SIDREC_PORT=8000 SIDREC_BUNDLE_PATH=/bundle
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "service"]
CMD ["serve"]
