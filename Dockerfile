# syntax=docker/dockerfile:1
# The GPU image of vae-pipeline: the project with the `gpu` extra (onnxruntime-gpu), run as a non-root user, a
# Prefect worker as its entry point. torch 2.14.1 is a CUDA 13.0 build (torch.version.cuda == "13.0"), so the
# base is the CUDA 13.0 runtime with cuDNN 9, which onnxruntime-gpu needs too. Build from the repository root:
#   docker build -t vae-pipeline:latest .
# Run: `docker run --gpus all -e PREFECT_API_URL=http://SERVER:4200/api vae-pipeline` starts a worker on the
# pool $PREFECT_WORK_POOL (default gpu); any other command runs as given (`vae train ...`, or the flow-run command
# of a Docker or Kubernetes work pool). deploy/docker-compose.yml runs it beside a server and PostgreSQL.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    VAE_PROJECT_DIR=/app \
    PREFECT_HOME=/app/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    ORT_DISABLE_TELEMETRY=1 \
    PREFECT_WORK_POOL=gpu

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the CUDA 13.0 index, in its own layer: the code below changes far more often.
RUN pip install --index-url ${TORCH_INDEX} ${TORCH_SPEC}

WORKDIR /app
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY runtime runtime
COPY common common
COPY vae vae
COPY pipeline pipeline
COPY flows flows
# gpu: onnxruntime-gpu; s3 and http: the registries, shards and sources the deploy configs point at (s3://);
# tensorboard: train.tensorboard's tracker. Every version pinned by constraints.txt (the tested ones).
RUN pip install -c constraints.txt ./runtime ".[gpu,s3,http,tensorboard]"
COPY configs configs
COPY prefect.yaml ./
COPY deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

# Data, runs and the registry are volumes in deployment; the folders exist here so named volumes are owned by
# the runtime user.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin vae \
    && mkdir -p /app/data /app/runs /app/registry /app/.prefect \
    && chown -R vae:vae /app
USER vae

ENTRYPOINT ["tini", "--", "docker-entrypoint.sh"]
