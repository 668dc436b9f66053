"""The deployments' pull step: flow runs use the worker's own checkout or image, with no path baked in.

`prefect deploy` stores a deployment's pull steps on the server. Prefect's `set_working_directory` step with
`{{ $PWD }}` stores the deploying machine's path, which a worker elsewhere (another checkout, the Docker image)
does not have. This step decides on the worker, when a flow run starts: the folder `$VAE_PROJECT_DIR` names (the
Docker image sets /app, `make serve` its checkout), else the checkout the installed `flows` package lives in (an
editable install). The folder must hold `prefect.yaml`, since the deployments' entry points and the relative
paths in their parameters (configs/..., data/...) are relative to it. Prefect changes into the folder it returns.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "VAE_PROJECT_DIR"


class ProjectDirError(RuntimeError):
    """No project folder to run the flow from; the message is one line naming the setting."""


def project_directory() -> Path:
    """The project folder this worker runs flows from (see the module docstring)."""
    given = os.environ.get(ENV)
    folder = Path(given).expanduser() if given else Path(__file__).resolve().parents[1]
    if not (folder / "prefect.yaml").is_file():
        where = f"${ENV}={given}" if given else f"{folder} (the installed flows package's checkout; ${ENV} is unset)"
        raise ProjectDirError(f"{where}: holds no prefect.yaml; set ${ENV} on the worker to the checkout or image "
                              "folder holding the project (its configs/ and prefect.yaml)")
    return folder.resolve()


def set_project_directory() -> dict[str, str]:
    """The pull step (`flows.project_dir.set_project_directory` in prefect.yaml): `{"directory": FOLDER}`."""
    return {"directory": str(project_directory())}
