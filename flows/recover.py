"""Recovery of a flow run that its worker left behind: `Running` (or `Cancelling`) with nothing running it.

    python -m flows.recover FLOW_RUN_ID      # marks it Crashed, which releases its concurrency slot
    prefect flow-run retry FLOW_RUN_ID       # then scheduled again; the retry resumes from its checkpoint

A worker stopped under a run (`docker compose restart`, an image upgrade) leaves the run `Running`; `prefect
flow-run cancel` then stays `Cancelling` for good, because only the worker that started a run handles its
cancellation, and `prefect flow-run retry` takes runs in a terminal state only. The state is forced (no worker
will ever report on the run), so only runs that are not in a terminal state are touched.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

LEFT_BEHIND = ("PENDING", "RUNNING", "CANCELLING")


async def mark_crashed(id_or_name: str) -> str:
    """Force the run (an id, or a name such as `crafty-otter`) into Crashed when it is left behind; returns what
    was done, in words."""
    from prefect.client.orchestration import get_client  # lazy: the client starts Prefect's settings
    from prefect.states import Crashed

    async with get_client() as client:
        run = await _find(client, id_or_name)
        run_id = run.id
        state = run.state.type.value if run.state else None
        if state not in LEFT_BEHIND:
            return f"flow run {run_id} is {state}: not left behind, nothing changed (prefect flow-run retry it)"
        await client.set_flow_run_state(run_id, Crashed(message="its worker is gone: marked by flows.recover"),
                                        force=True)
        return f"flow run {run_id} was {state}, now CRASHED: retry it with `prefect flow-run retry {run_id}`"


async def _find(client, id_or_name: str):
    """The flow run with this id, else the one with this name; one line when there is none (or several)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.exceptions import ObjectNotFound

    try:
        return await client.read_flow_run(uuid.UUID(id_or_name))
    except (ValueError, ObjectNotFound):
        pass
    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[id_or_name])))
    if len(runs) != 1:
        raise SystemExit(f"recover: {'no flow run' if not runs else f'{len(runs)} flow runs'} with the id or name "
                         f"{id_or_name!r}" + (" (use its id)" if runs else ""))
    return runs[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.recover", description=__doc__.splitlines()[0])
    parser.add_argument("flow_run", help="the flow run's id or name")
    args = parser.parse_args(argv)
    print(asyncio.run(mark_crashed(args.flow_run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
