# syntax=docker/dockerfile:1.7
# A GPU worker: torch's CUDA wheels bring their own CUDA runtime, cuBLAS and cuDNN, so a slim
# Python base is enough; the host's NVIDIA runtime supplies only the driver.
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t actmap-worker:0.1.0-cu128 .
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#     -t actmap-worker:0.1.0-cpu .

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/actmap
# The biggest layer first and alone: torch changes far less often than anything else.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/actmap/bin/pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir api workers && touch api/__init__.py workers/__init__.py \
    && /opt/actmap/bin/pip install "torch==${TORCH_VERSION}" ".[worker]" \
    && /opt/actmap/bin/pip uninstall -y actmap
COPY api ./api
COPY workers ./workers
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/actmap/bin/pip install --no-deps .

FROM ${PYTHON_IMAGE}
# compute for CUDA, utility for nvidia-smi (the launcher's GPU discovery). GKE mounts the
# driver under /usr/local/nvidia without putting it on the loader path; harmless elsewhere.
# NVIDIA_VISIBLE_DEVICES stays unset: a Docker host then exposes no GPU by default.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64 \
    PATH=/opt/actmap/bin:/usr/local/nvidia/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    ACTMAP_HEALTH_DIR=/scratch/health \
    HOME=/scratch TMPDIR=/scratch
RUN groupadd --system --gid 10001 actmap \
    && useradd --system --uid 10001 --gid actmap --no-create-home --shell /usr/sbin/nologin actmap \
    && install -d -o 10001 -g 10001 /scratch /scratch/health
COPY --from=build /opt/actmap /opt/actmap
USER 10001:10001
WORKDIR /scratch
# Liveness without `celery inspect ping`: the heartbeat file the worker's timer touches.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, time; sys.exit(time.time() - os.stat('/scratch/health/heartbeat').st_mtime > 20)"]
# Exec form: SIGTERM reaches Celery's main process, which shuts down softly; no init that
# signals the whole process group (that would kill the pool child mid-batch).
ENTRYPOINT ["celery", "-A", "workers.execution.worker_main", "worker"]
CMD ["--pool", "prefork", "--concurrency", "1", "--prefetch-multiplier", "1", \
     "--hostname", "worker@%h", "--queues", "screen,extract", \
     "--without-gossip", "--without-mingle", "--task-events", "--loglevel", "INFO"]
