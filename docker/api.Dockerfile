# syntax=docker/dockerfile:1.7
# The HTTP API: no torch (api/ never imports it), so the image stays a few hundred MB.
# Build from the repository root: docker build -f docker/api.Dockerfile -t actmap-api:0.1.0 .

FROM python:3.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/actmap
WORKDIR /src
# Dependencies first, from pyproject.toml alone: a source change does not re-download them.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir api workers && touch api/__init__.py workers/__init__.py \
    && /opt/actmap/bin/pip install . \
    && /opt/actmap/bin/pip uninstall -y actmap
COPY api ./api
COPY workers ./workers
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/actmap/bin/pip install --no-deps .

FROM python:3.12-slim-bookworm
ENV PATH=/opt/actmap/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 actmap \
    && useradd --system --uid 10001 --gid actmap --no-create-home --shell /usr/sbin/nologin actmap
COPY --from=build /opt/actmap /opt/actmap
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Slim images have no curl: the interpreter asks the liveness endpoint itself.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["actmap", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
