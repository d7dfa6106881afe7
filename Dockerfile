# syntax=docker/dockerfile:1
# sidrec serving image: multi-stage, non-root, locked dependencies, CPU torch by default.
#
#   docker build -t sidrec:0.1.0-cpu .                                      # CPU
#   docker build -t sidrec:0.1.0-cu124 --build-arg TORCH_VARIANT=cu124 .    # CUDA 12.4 wheels (+ Triton)
#   docker run --rm -p 127.0.0.1:8000:8000 -v $PWD/bundles:/bundles:ro \
#       -e SIDREC_BUNDLE_PATH=/bundles/<version> sidrec:0.1.0-cpu
#
# Packages: torch from the variant's index at the pinned version, then exactly
# requirements/serve.lock (hashes checked, no resolution), then sidrec itself without deps.
# The image holds no training extras; `python -m sidrec serve` is its entry point. A bundle is
# mounted read-only; deployments name it by version (deploy/), never through a moving link.
#
# No C compiler at run time (CPU variant): the fused CPU kernels (kernels/cpu_fused.py) are built
# here in the build stage, portable (no -march=native: the image runs on CPUs other than the
# builder's), and found through SIDREC_KERNEL_DIR. Where that build fails the image still works:
# the decoder falls back to torch ops. The GPU variant keeps gcc in its runtime stage: Triton
# compiles a small C launcher per kernel signature with the host compiler on first use, on the
# machine with the GPU, which a build stage without a GPU cannot do ahead of time.
#
# This Dockerfile has not been built on the development or CI machines (no Docker engine runs
# there); tests/test_deploy_manifests.py checks that its COPY sources and install inputs exist.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY requirements/serve.lock requirements/serve.lock
RUN pip install --require-hashes --no-deps -r requirements/serve.lock
COPY pyproject.toml README.md ./
COPY sidrec ./sidrec
COPY model ./model
COPY kernels ./kernels
COPY service ./service
COPY training ./training
RUN pip install --no-deps . \
 && python -c "import sidrec.service.app, sidrec.model.engine" \
 && (python -m sidrec.kernels.cpu_fused --build --out /opt/sidrec/kernels \
     || echo "fused CPU kernels did not build: the image serves with torch ops") \
 && mkdir -p /opt/sidrec/kernels

FROM python:${PYTHON_VERSION}-slim AS runtime
ARG TORCH_VARIANT=cpu
# Triton (GPU variant only) needs a C compiler at run time for its launchers; the CPU image has none.
RUN if [ "${TORCH_VARIANT}" != "cpu" ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi
RUN groupadd --gid 10001 sidrec && useradd --uid 10001 --gid sidrec --no-create-home --shell /usr/sbin/nologin sidrec
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/sidrec/kernels /opt/sidrec/kernels
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    SIDREC_KERNEL_DIR=/opt/sidrec/kernels \
    SIDREC_HOST=0.0.0.0 SIDREC_PORT=8000 SIDREC_BUNDLE_PATH=/bundle
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "sidrec"]
CMD ["serve"]
