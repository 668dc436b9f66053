"""The `watch-source` flow: retrain when the source gains images, not only on the weekly schedule.

A light scheduled deployment (`prefect.yaml`: watch-celeba) lists the source (names and sizes, no image is read)
and compares its keys with the shards' manifest (what is sharded and what was skipped). When images were added
it starts the training deployment (`train-vae/celeba-64` by default), which shards exactly those and trains.
It never triggers itself or piles runs up: while a run of that deployment is scheduled, pending or running, it
waits for that run (the run shards the new images, so the next look finds none); a source with nothing new
triggers nothing.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName,
                                            FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment

from pipeline.manifest import SPLITS, read_manifest
from pipeline.sources import open_source

ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


def new_images(source: str, shards: str) -> int:
    """How many images the source holds that the shards neither hold nor skipped (all of them before any
    shards exist)."""
    listing = open_source(source).listing()
    present = {entry.key for split in SPLITS for entry in listing.entries[split]}
    manifest = read_manifest(shards)
    if manifest is None:
        return len(present)
    done = {key for split in SPLITS for record in manifest["splits"][split]["shards"] for key in record["keys"]}
    skipped = {record["key"] for record in manifest["skipped"]}
    return len(present - done - skipped)


def active_runs(deployment: str) -> list[str]:
    """Flow runs of `deployment` ("flow/deployment") that are scheduled, pending or running: their ids."""
    flow_name, deployment_name = deployment.split("/", 1)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE))))
    return [str(run.id) for run in runs]


@flow(name="watch-source", log_prints=False)
def watch_source(source: str, shards: str, deployment: str = "train-vae/celeba-64",
                 parameters: dict | None = None) -> dict:
    """Start `deployment` (with `parameters`, else its own) when `source` holds images its shards lack.

    Args:
        source: The source the training deployment shards (a folder, the official zip, or an fsspec URL).
        shards: Its shard folder.
        deployment: The deployment to start, "flow/deployment".
        parameters: Parameters for that run; None: the deployment's own.
    """
    logger = get_run_logger()
    count = new_images(source, shards)
    if count == 0:
        logger.info("%s: no new images since the shards in %s", source, shards)
        return {"new_images": 0, "triggered": None}
    waiting = active_runs(deployment)
    if waiting:
        logger.info("%s: %d new images; %s is already on its way (flow run %s): it shards them", source, count,
                    deployment, waiting[0])
        return {"new_images": count, "triggered": None, "waiting_for": waiting[0]}
    run = run_deployment(deployment, parameters=parameters, timeout=0)  # start it; do not wait for training
    logger.info("%s: %d new images: started %s (flow run %s)", source, count, deployment, run.id)
    return {"new_images": count, "triggered": str(run.id)}
