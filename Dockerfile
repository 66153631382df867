# syntax=docker/dockerfile:1
# One image for every unlearnd process (API, Celery worker, beat, or `unlearnd serve` all-in-one);
# the torch build inside it is chosen at build time:
#   CPU:   docker build -t unlearnd:cpu .
#   CUDA:  docker build --build-arg TORCH_INDEX=cu130 -t unlearnd:cu130 .
# TORCH_INDEX names a PyTorch wheel index: `cpu`, or a CUDA build that the torch release ships.
# torch 2.13.0's Linux wheel on PyPI is its CUDA 13.0 build, so `cu130` is the CUDA default here (the
# host needs an NVIDIA driver new enough for CUDA 13, i.e. 580 or later, and the NVIDIA Container
# Toolkit). The CUDA wheels carry their own CUDA runtime libraries: the base stays python:3.11-slim.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the chosen index, in its own layer (the big one, kept across source edits).
# The project's `torch>=2.3` is then already satisfied and pip leaves it alone; installed the other
# way round, pip would resolve torch from PyPI and put the CUDA build into a CPU image.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
COPY bench ./bench
COPY migrations ./migrations
# Editable install of the project: `unlearnd migrate` finds the Alembic scripts beside the packages
# (service/core/migrate.py: <repo>/migrations), and a built wheel does not carry migrations/.
# The check fails the build if pip replaced torch or the migrations cannot be found.
RUN pip install -e . \
 && python -c "import torch, service.core.migrate as m; \
assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__; \
assert m.MIGRATIONS.is_dir(), m.MIGRATIONS; print('torch', torch.__version__)"

# Non-root. /data (for `unlearnd serve`) and /artifacts (the shared volume of docker-compose.yml)
# are created owned by that user, so a fresh named volume mounted there starts writable by it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/unlearnd --no-log-init unlearnd \
 && mkdir -p /data /artifacts \
 && chown unlearnd:unlearnd /data /artifacts
USER 10001:10001
# A writable working directory (Celery beat keeps its schedule file in the current directory).
WORKDIR /home/unlearnd

EXPOSE 8000
# Default: the embedded all-in-one (API + one worker, SQLite, everything under /data).
# docker-compose.yml runs the production processes from the same image with other commands.
CMD ["unlearnd", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
