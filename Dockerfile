# syntax=docker/dockerfile:1
#
# augserve images, built from the repository root:
#
#   docker build -t augserve:0.1.0 .                                    # the server (default target)
#   docker build --target trainer -t augserve-trainer:0.1.0 .          # augserve-train / augserve-sweep
#
# Stages: `server-dependencies` and `trainer-dependencies` install what pyproject.toml lists into
# a virtual environment at /opt/venv (with pip, from wheels: nothing is compiled, so there are no
# compilers even there); `server-builder` and `trainer-builder` install the project itself into
# /opt/augserve; `runtime` is the bare Python image plus an unprivileged user; `trainer` and
# `server` copy one venv and the project onto it, in two layers: a change to the sources
# rebuilds and ships only the small one. The last stage, `server`, is what a plain
# `docker build .` gives.
#
# GPU: the base is an official Python slim image, not a CUDA image. The CUDA 13 DALI wheel
# (`nvidia-dali-cuda130`, through the project's `dali` extra) carries the CUDA user-space
# libraries it needs; the driver (libcuda) is mounted in by the NVIDIA container runtime
# (`docker run --gpus all`, the NVIDIA device plugin on Kubernetes). Without a GPU the same image
# serves with the OpenCV backend: `--backend auto` (the default) chooses and logs why.
# The server image has no torch; the trainer image has no DALI.
#
# Without a registry: any Debian-like image with `python` (>= 3.11), its venv module and
# groupadd/useradd serves as PYTHON_IMAGE; scripts/containers.py builds one from Debian's
# packages and passes it with --build-arg PYTHON_IMAGE=localhost/augserve-base:bookworm.
# podman builds OCI images by default, which drop HEALTHCHECK: build with `--format docker`.

ARG PYTHON_IMAGE=python:3.13-slim-trixie

# ---------------------------------------------------------------------------------------------
# The server's dependencies: a venv at /opt/venv with the `server` and `dali` extras. Only
# pyproject.toml goes in (and an empty README.md, which it names): this stage, and the big layer
# it gives the image, is rebuilt only when pyproject.toml changes. The project itself, without
# packages here, is installed for its dependencies and removed again.
FROM ${PYTHON_IMAGE} AS server-dependencies
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
# The pip cache lives in a BuildKit cache mount: it never lands in a layer. DALI's wheels carry
# extension modules for every Python from 3.10 on and C headers for plugins: only this Python's
# modules stay (about 90 MB less). setuptools leaves the venv (nothing in the server runs it),
# and so does pip (16 MB): it moves to /opt/build-pip for the builder stage below. The .pth
# file puts the project's folder, /opt/augserve, on the venv's path.
RUN --mount=type=cache,target=/root/.cache/pip \
    touch README.md \
    && pip install "./[server,dali]" \
    && pip uninstall --yes --quiet augserve setuptools \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && suffix="$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" \
    && if [ -d "$site/nvidia" ]; then \
         find "$site/nvidia" -name '*.cpython-3*.so' ! -name "*$suffix" -delete \
         && find "$site/nvidia" -mindepth 2 -maxdepth 2 -type d -name include -exec rm -r {} +; \
       fi \
    && echo /opt/augserve > "$site/augserve-project.pth" \
    && mkdir /opt/build-pip && mv "$site"/pip "$site"/pip-*.dist-info /opt/build-pip/ && rm /opt/venv/bin/pip*

# The project alone (pure Python, a few hundred kB) in /opt/augserve, its commands in
# /opt/augserve/bin: a change to the sources rebuilds this small layer only.
FROM server-dependencies AS server-builder
ENV PYTHONPATH=/opt/build-pip
COPY README.md ./
COPY augserve/ augserve/
COPY trainer/ trainer/
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --no-deps --target /opt/augserve .

# ---------------------------------------------------------------------------------------------
# A folder of wheels for the trainer's pip (--find-links), empty here. To build the trainer from
# a torch wheel kept on the machine instead of a download, put a folder in its place:
#   --build-context torch-wheels=/opt/wheels --build-arg TORCH_VERSION=2.13.0+cpu
FROM scratch AS torch-wheels

# The trainer's dependencies: torch and the `train` extra, as for the server.
FROM ${PYTHON_IMAGE} AS trainer-dependencies
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
# torch from PyPI by default (a CUDA build on Linux x86_64); any torch >= 2.4 works. For a
# CPU-only image add PyTorch's CPU wheel index: --build-arg PIP_EXTRA_INDEX_URL=<index URL>, or
# give a folder holding the wheel (the torch-wheels stage above).
ARG TORCH_VERSION=2.13.0
ARG PIP_EXTRA_INDEX_URL
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
# setuptools stays (torch needs it); pip moves out as for the server.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=torch-wheels,target=/wheels \
    touch README.md \
    && pip install --find-links /wheels "torch==${TORCH_VERSION}" "./[train]" \
    && pip uninstall --yes --quiet augserve \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && echo /opt/augserve > "$site/augserve-project.pth" \
    && mkdir /opt/build-pip && mv "$site"/pip "$site"/pip-*.dist-info /opt/build-pip/ && rm /opt/venv/bin/pip*

FROM trainer-dependencies AS trainer-builder
ENV PYTHONPATH=/opt/build-pip
COPY README.md ./
COPY augserve/ augserve/
COPY trainer/ trainer/
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --no-deps --target /opt/augserve .

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric user, so that Kubernetes' runAsNonRoot can verify it and volumes can be
# given to its group (fsGroup 10001).
RUN groupadd --system --gid 10001 augserve \
    && useradd --system --uid 10001 --gid augserve --create-home --home-dir /home/augserve augserve \
    && mkdir -p /var/cache/augserve /workspace/runs \
    && chown -R 10001:10001 /var/cache/augserve /workspace
# AUGSERVE_CACHE holds the demo dataset and dataset manifests: mount a volume there to keep
# them across restarts. CUDA's JIT cache goes beside it, as the root file system may be read-only.
ENV PATH=/opt/augserve/bin:/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AUGSERVE_CACHE=/var/cache/augserve \
    CUDA_CACHE_PATH=/var/cache/augserve/cuda \
    MPLCONFIGDIR=/tmp/matplotlib
# What the NVIDIA runtime mounts into a container it gives GPUs to. NVIDIA_VISIBLE_DEVICES is
# left unset on purpose: `--gpus` or the device plugin sets it, and an image that says `all`
# would see every GPU of a node wherever nvidia is the default runtime.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------------------------
FROM runtime AS trainer
COPY --from=trainer-dependencies /opt/venv /opt/venv
COPY --from=trainer-builder /opt/augserve /opt/augserve
USER 10001:10001
WORKDIR /workspace
# e.g. docker run --rm augserve-trainer:0.1.0 --endpoint HOST:50051 --dataset demo --output runs/a
ENTRYPOINT ["augserve-train"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS server
COPY --from=server-dependencies /opt/venv /opt/venv
COPY --from=server-builder /opt/augserve /opt/augserve
USER 10001:10001
WORKDIR /home/augserve
# The server is configured by environment and by arguments (appended to `augserve serve`):
#   AUGSERVE_HOST       address to bind (0.0.0.0: every interface of the container)
#   AUGSERVE_PORT       gRPC port; EXPOSE, the health check and the deploy files use 50051
#   AUGSERVE_CONFIG     a server YAML file (datasets, limits, ...) -> --config
#   AUGSERVE_BACKEND    auto | dali | dali-cpu | opencv -> --backend (unset: the file's, else auto)
#   AUGSERVE_THREADS    backend worker threads -> --threads (unset: every core)
#   AUGSERVE_LOG_LEVEL  DEBUG | INFO | WARNING | ERROR
#   AUGSERVE_CACHE      demo dataset and manifest cache (read by augserve itself)
# Host and port always come from the environment (they override the config file's): the health
# check reads the same variables. Arguments, e.g. `--demo` or `--dataset NAME=/data/NAME`, follow.
# The server warns that it listens beyond loopback without TLS or tokens: keep its port on a
# private network (compose's network, a Kubernetes NetworkPolicy).
ENV AUGSERVE_HOST=0.0.0.0 \
    AUGSERVE_PORT=50051 \
    AUGSERVE_LOG_LEVEL=INFO
EXPOSE 50051
# gRPC health checking (grpc.health.v1) of the whole server; NOT_SERVING while it drains on
# SIGTERM. The start period covers generating the demo dataset or indexing a large one.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c = grpc.insecure_channel('127.0.0.1:' + os.environ.get('AUGSERVE_PORT', '50051')); r = g.HealthStub(c).Check(h.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
# exec: the server is PID 1 and gets SIGTERM itself, for its graceful shutdown.
ENTRYPOINT ["/bin/sh", "-c", "exec augserve --log-level \"${AUGSERVE_LOG_LEVEL:-INFO}\" serve --host \"${AUGSERVE_HOST:-0.0.0.0}\" --port \"${AUGSERVE_PORT:-50051}\" ${AUGSERVE_CONFIG:+--config \"$AUGSERVE_CONFIG\"} ${AUGSERVE_BACKEND:+--backend \"$AUGSERVE_BACKEND\"} ${AUGSERVE_THREADS:+--threads \"$AUGSERVE_THREADS\"} \"$@\"", "augserve"]
CMD []
