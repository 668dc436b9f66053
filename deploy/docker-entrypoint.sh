#!/bin/sh
# Entry point of the vae-pipeline image (Dockerfile). With no arguments: a Prefect worker on the process pool
# $PREFECT_WORK_POOL, running train-vae flow runs inside this container (its GPUs). With arguments: run them
# (a Docker or Kubernetes work pool's flow-run command, `vae train ...`, `prefect deploy ...`).
set -e
if [ "$#" -eq 0 ]; then
    exec prefect worker start --pool "${PREFECT_WORK_POOL:-gpu}" --type process
fi
exec "$@"
