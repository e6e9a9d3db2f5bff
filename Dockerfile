# python_task image: `python -m python_task <command>` for OpenMOLE's ContainerTask, Apptainer/Singularity and
# `docker run`. No ENTRYPOINT: OpenMOLE ignores it (it runs `sh /_run_commands.sh`), so everything the commands
# need is on PATH and in ENV.
#
#   docker build -t python-task:0.1.0 .                                   # CPU, Keras on TensorFlow (the default)
#   docker build --target runtime-gpu -t python-task:0.1.0-gpu .          # GPU, Keras on JAX + CUDA 12
#   docker save python-task:0.1.0 -o openmole/python-task.tar              # for ContainerTask(workDirectory / ...)
#   apptainer build python-task.sif docker-archive://openmole/python-task.tar
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD/data:/data:ro" -v "$PWD/runs/p0:/out" python-task:0.1.0 \
#       python -m python_task train --shards /data/shards --splits /data/splits.json --fold 0 --arch simple_cnn --out /out
# (`podman build` works the same; `-u` makes the files in runs/p0 yours, and lets the run write there whoever
# owns the folder.)
#
# Stages: builder (wheel + venv in /opt/venv, all from PyPI wheels) -> builder-gpu (adds JAX with CUDA 12) ->
# runtime-base (python slim, user, mount points; no compiler, no apt package) -> runtime-gpu / runtime-cpu (the venv
# only). The CPU image is the last stage, so a plain build makes it; the GPU image is chosen with --target. (A
# `FROM runtime-${VARIANT}` picked by a build argument is not resolved by every builder: buildah 1.28, podman 4.3's,
# ignores the ARG default there.) The builder and the runtime use the same base image, so the venv's interpreter
# link (/usr/local/bin/python3.11) is valid in the runtime.

# ------------------------------------------------------------------------------------------------ builder
FROM python:3.11.13-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY python_task ./python_task
# Build the project's wheel, then install it with its dependencies (binary wheels only, so no compiler is needed).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip install --no-cache-dir --only-binary=:all: /wheels/python_task-*.whl \
    && python -m python_task --help > /dev/null \
    && chmod -R a+rX /opt/venv

# ------------------------------------------------------------------------------------------------ builder-gpu
FROM builder AS builder-gpu
# JAX with the CUDA 12 runtime from pip wheels; the NVIDIA driver comes from the host (`apptainer exec --nv`,
# `docker run --gpus all`). Needs a driver that supports CUDA 12 (>= 525).
ARG JAX_VERSION=0.9.2
RUN pip install --no-cache-dir --only-binary=:all: "jax[cuda12]==${JAX_VERSION}" \
    && chmod -R a+rX /opt/venv

# ------------------------------------------------------------------------------------------------ runtime-base
FROM python:3.11.13-slim-bookworm AS runtime-base
LABEL org.opencontainers.image.title="python-task" \
      org.opencontainers.image.description="Benign vs malignant bile-duct lesions from whole-slide images: tiles, CNN training, OpenMOLE sweeps" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# A regular user for `docker run`; the writable places are world-writable (sticky) so that any uid works too
# (`docker run -u "$(id -u)"`, Apptainer/Singularity run as the calling user).
RUN useradd --create-home --home-dir /home/app --uid 1000 --shell /bin/sh app \
    && mkdir -p /data /out /work \
    && chmod 1777 /out /work /home/app \
    && chmod 0755 /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KERAS_BACKEND=tensorflow \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/home/app
WORKDIR /work
USER 1000:1000
CMD ["python", "-m", "python_task", "--help"]

# ------------------------------------------------------------------------------------------------ runtime-gpu
FROM runtime-base AS runtime-gpu
COPY --from=builder-gpu /opt/venv /opt/venv
# Keras on JAX for the GPU; do not grab 75 % of the GPU memory up front (a probe may share the card).
ENV KERAS_BACKEND=jax \
    XLA_PYTHON_CLIENT_PREALLOCATE=false

# ------------------------------------------------------------------------------------------------ runtime-cpu
# The last stage: what `docker build .` makes.
FROM runtime-base AS runtime-cpu
COPY --from=builder /opt/venv /opt/venv
