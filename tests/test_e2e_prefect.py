"""End to end with a real Prefect server and worker, as operations run it (`make serve` drives the same code):

server on 127.0.0.1 (on a PostgreSQL database the test starts, as production runs it)
-> process work pool -> `prefect deploy` from prefect.yaml
-> worker -> `prefect deployment run train-vae/demo --watch` (tiny overrides), checked through the API: the run
completed, its artifacts exist, the registry holds the version and champion.json names it. Then new images in
the source: only new shards are written and promotion follows the metrics. The schedule and concurrency limit
of train-vae/celeba-64 are read back. Every process started here is stopped by PID in the fixture's teardown.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from common.net import free_port
from conftest import TINY
from flows import serve
from postgres import binaries, postgres_database, query
from vae_runtime import registry as reg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def database():
    """A real PostgreSQL database for the server, as production runs it; None (SQLite) where there is none."""
    if binaries() is None:
        yield None
        return
    with postgres_database() as (url, port):
        yield {"url": url, "port": port}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, database):
    home = tmp_path_factory.mktemp("prefect-home")
    started = time.time()
    stack = serve.Stack(home, free_port(), "e2e-local",
                        extra_env={"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"},
                        database_url=database["url"] if database else None)
    try:
        serve.start(stack)  # `prefect server start --background`, pool, `prefect deploy` per name, worker
        assert stack.server_pid() and serve._alive(stack.server_pid(), None)
        stack.startup_s = time.time() - started
        yield stack
    finally:
        pids = {name: proc.pid for name, proc in stack.procs.items()}
        if stack.server_pid():
            pids["server"] = stack.server_pid()  # Prefect's background server records its own PID
        serve.stop(stack)
        for name, pid in pids.items():  # nothing this test started survives it
            assert not serve._alive(pid, None), f"{name} (pid {pid}) still running"
        assert stack.server_pid() is None and not stack.pid_file.exists()


@pytest.fixture(scope="module")
def client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        with get_client(sync_client=True) as client:
            yield client


def run_deployment(stack, name: str, params: dict, timeout: int = 300) -> tuple[str, subprocess.CompletedProcess]:
    """`prefect deployment run NAME --watch`, returning the flow run id (and the CLI's output)."""
    done = subprocess.run([*serve.prefect_cli(), "deployment", "run", name, "--params", json.dumps(params),
                           "--watch", "--watch-interval", "1", "--watch-timeout", str(timeout)],
                          cwd=serve.REPO, env=stack.env(), capture_output=True, text=True, timeout=timeout + 60)
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout)
    assert found, f"no flow run id in the output of prefect deployment run:\n{done.stdout}\n{done.stderr}"
    return found.group(1), done


def artifacts_of(client, flow_run_id: str) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def champion_events(stack, at_least: int = 1) -> list[dict]:
    """The `vae.champion.promoted` events the server holds, oldest first (read back through its API)."""
    import httpx

    from flows.train_vae import CHAMPION_EVENT

    for _ in range(40):  # events reach the database shortly after they are emitted
        page = httpx.post(f"{stack.api_url}/events/filter", json={"filter": {"event": {"name": [CHAMPION_EVENT]}},
                                                                  "limit": 50}, timeout=30).json()
        events = sorted(page["events"], key=lambda e: e["occurred"])
        if len(events) >= at_least:
            return events
        time.sleep(0.5)
    return events


def shard_files(shards: Path) -> dict[str, tuple[str, int]]:
    """Every shard file on disk: relative path -> (sha256, mtime_ns)."""
    return {str(p.relative_to(shards)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(shards.glob("*/*.tar"))}


def add_images(source: Path, n: int, seed: int, tmp: Path) -> int:
    """Append `n` new synthetic faces (keys after the existing ones) to a CelebA-layout source."""
    from pipeline.synth import synthesize

    synthesize(tmp, n, seed=seed)
    offset = len(list((source / "img_align_celeba").glob("*.jpg")))
    renamed = {f"{i + 1:06d}": f"{offset + i + 1:06d}" for i in range(n)}
    for old, new in renamed.items():
        shutil.copyfile(tmp / "img_align_celeba" / f"{old}.jpg", source / "img_align_celeba" / f"{new}.jpg")

    def rename(line: str) -> str:
        name, rest = line.split(maxsplit=1)
        return f"{renamed[Path(name).stem]}.jpg {rest}"

    for fname in ("list_eval_partition.txt", "identity_CelebA.txt"):
        extra = [rename(line) for line in (tmp / fname).read_text().splitlines() if line.strip()]
        (source / fname).write_text((source / fname).read_text() + "\n".join(extra) + "\n")
    attrs = (source / "list_attr_celeba.txt").read_text().splitlines()
    extra = [rename(line) for line in (tmp / "list_attr_celeba.txt").read_text().splitlines()[2:] if line.strip()]
    (source / "list_attr_celeba.txt").write_text("\n".join([str(offset + n), attrs[1], *attrs[2:], *extra]) + "\n")
    return offset + n


def test_demo_deployment_runs_promotes_and_reshards_incrementally(stack, client, tmp_path):
    out = tmp_path / "demo"
    params = {"source": str(out / "data"), "synthesize_n": 120, "shards": str(out / "shards"),
              "registry": str(out / "registry"), "runs": str(out / "runs"),
              "overrides": [*TINY, "train.steps=10", "train.checkpoint_every=10"]}
    timings = {"startup_s": round(stack.startup_s, 1)}

    # First run: synthesizes the source (absent), shards, trains, promotes (no champion yet).
    started = time.time()
    first_id, done = run_deployment(stack, "train-vae/demo", params)
    timings["first_run_s"] = round(time.time() - started, 1)
    first = client.read_flow_run(first_id)
    assert first.state.is_completed(), f"{first.state}\n{done.stdout[-3000:]}"
    versions = sorted(p.name for p in (out / "registry" / "train-vae" / "versions").iterdir())
    assert len(versions) == 1
    champion = reg.read_champion(out / "registry")
    assert champion["version"] == versions[0]
    first_metrics = json.loads((out / "registry" / "train-vae" / "versions" / versions[0] / "metrics.json")
                               .read_text())
    assert champion["nll_bpd"] == first_metrics["nll_bpd"]

    artifacts = artifacts_of(client, first_id)
    assert {"train-vae-metrics", "train-vae-summary"} <= set(artifacts)
    table = artifacts["train-vae-metrics"].data
    rows = {row["metric"]: row["value"] for row in (json.loads(table) if isinstance(table, str) else table)}
    assert rows["nll_bpd"] == pytest.approx(first_metrics["nll_bpd"]) and rows["k"] == 8
    summary = artifacts["train-vae-summary"].data
    assert f"# train-vae {versions[0]}" in summary and "**promoted**: no champion yet" in summary
    pictures = re.findall(r"!\[([\w.-]+)\]\(data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)\)", summary)
    assert [name for name, _, _ in pictures] == ["samples", "reconstructions", "samples-t1"]
    magic = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
    assert all(base64.b64decode(data).startswith(magic[kind]) for _, kind, data in pictures)
    assert "KID" in summary and "floor" in summary  # the sample figures beside bits/dim
    announced = champion_events(stack)
    assert [e["payload"]["version"] for e in announced] == [versions[0]]
    assert announced[0]["payload"]["nll_bpd"] == pytest.approx(first_metrics["nll_bpd"])
    assert announced[0]["payload"]["previous"] is None

    # New images in the source: only new shards, the old ones untouched byte for byte.
    manifest_before = json.loads((out / "shards" / "manifest.json").read_text())
    files_before = shard_files(out / "shards")
    total = add_images(out / "data", 40, seed=11, tmp=tmp_path / "more")
    assert total == 160

    started = time.time()
    second_id, done = run_deployment(stack, "train-vae/demo", {**params, "overrides": [
        *TINY, "train.steps=3", "train.checkpoint_every=3"]})
    timings["second_run_s"] = round(time.time() - started, 1)
    second = client.read_flow_run(second_id)
    assert second.state.is_completed(), f"{second.state}\n{done.stdout[-3000:]}"

    manifest_after = json.loads((out / "shards" / "manifest.json").read_text())
    files_after = shard_files(out / "shards")
    assert {k: v for k, v in files_after.items() if k in files_before} == files_before
    new_files = set(files_after) - set(files_before)
    assert new_files, "no new shard for the new images"
    for split in ("train", "valid", "test"):
        old = manifest_before["splits"][split]["shards"]
        assert manifest_after["splits"][split]["shards"][:len(old)] == old
    counted = sum(manifest_after["splits"][s]["count"] for s in ("train", "valid", "test"))
    assert counted == 160 - len(manifest_after["skipped"])
    assert counted - sum(manifest_before["splits"][s]["count"] for s in ("train", "valid", "test")) == 40

    # Promotion followed the metrics: the new version is kept either way, champion only when better.
    versions = sorted(p.name for p in (out / "registry" / "train-vae" / "versions").iterdir())
    assert len(versions) == 2
    second_metrics = json.loads((out / "registry" / "train-vae" / "versions" / versions[1] / "metrics.json")
                                .read_text())
    better = second_metrics["nll_bpd"] < first_metrics["nll_bpd"]
    assert reg.read_champion(out / "registry")["version"] == (versions[1] if better else versions[0])
    summary = artifacts_of(client, second_id)["train-vae-summary"].data
    assert ("**promoted**" if better else "**not promoted**") in summary
    assert f"champion {versions[0]}" in summary
    timings["promoted_second"] = better
    promoted = [versions[0], *([versions[1]] if better else [])]
    assert [e["payload"]["version"] for e in champion_events(stack, len(promoted))] == promoted
    print("e2e timings", json.dumps(timings))


def test_bad_parameters_fail_the_run_with_one_line(stack, client, tmp_path):
    run_id, done = run_deployment(stack, "train-vae/demo", {"source": str(tmp_path / "absent"), "synthesize_n": 0,
                                                            "shards": str(tmp_path / "shards"),
                                                            "registry": str(tmp_path / "registry")})
    state = client.read_flow_run(run_id).state
    assert state.is_failed() and done.returncode != 0
    assert "train-vae parameter 'source'" in state.message and "does not exist" in state.message
    assert not (tmp_path / "shards").exists()


def test_deployments_read_back_schedule_concurrency_and_pull_step(stack, client):
    celeba = client.read_deployment_by_name("train-vae/celeba-64")
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in celeba.schedules] == [
        ("0 3 * * 1", "Europe/Berlin", True)]
    assert celeba.global_concurrency_limit.limit == 1
    assert celeba.concurrency_options.collision_strategy == "ENQUEUE"
    assert celeba.entrypoint == "flows/train_vae.py:train_vae" and celeba.work_pool_name == stack.pool
    assert celeba.parameters["config"] == "configs/celeba64.yaml"
    # No path of this machine is stored: the worker's pull step finds its own project folder when a run starts.
    assert celeba.pull_steps == [{"flows.project_dir.set_project_directory": {}}]
    assert str(serve.REPO) not in json.dumps([d.model_dump(mode="json") for d in client.read_deployments()])

    demo = client.read_deployment_by_name("train-vae/demo")
    assert demo.schedules == [] and demo.global_concurrency_limit.limit == 1
    assert demo.parameters["synthesize_n"] > 0 and demo.parameters["config"] == "configs/demo.yaml"

    listed = subprocess.run([*serve.prefect_cli(), "deployment", "schedule", "ls", "train-vae/celeba-64"],
                            env=stack.env(), cwd=serve.REPO, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "0 3 * * 1" in listed.stdout, listed.stdout + listed.stderr


def test_the_server_keeps_its_state_in_postgresql(stack, database, client):
    if database is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql when it can), so the "
                    "end-to-end runs used SQLite")
    assert stack.env()["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == database["url"]
    deployments = int(query(database["port"], "select count(*) from deployment"))
    assert deployments == len(client.read_deployments()) >= 2  # what the API serves is what PostgreSQL holds


def test_the_flow_parameters_have_descriptions_in_the_run_form(client):
    schema = client.read_deployment_by_name("train-vae/celeba-64").parameter_openapi_schema["properties"]
    assert "CelebA folder" in schema["source"]["description"]
    assert all(schema[name].get("description") for name in schema), [n for n in schema if not schema[n].get(
        "description")]


def test_the_summary_pictures_show_in_the_prefect_ui(stack, client, tmp_path):
    """Headless Chromium opens the summary artifact's page of the real server's UI: the embedded pictures
    decode (naturalWidth > 0). VAE_UI_SCREENSHOT=PATH keeps a screenshot of the page there."""
    import os
    import shutil as sh

    pytest.importorskip("selenium", reason="selenium is not installed (the dev extra brings it)")
    if not (sh.which("chromium") and sh.which("chromedriver")):
        pytest.skip("Chromium or its driver is not installed (make test installs Debian's chromium and "
                    "chromium-driver when it can)")
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    summaries = ArtifactFilter(key=ArtifactFilterKey(any_=["train-vae-summary"]))
    found = client.read_artifacts(artifact_filter=summaries)
    if not found:
        pytest.skip("no summary artifact: run the module's deployment test first")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(sh.which("chromedriver")))
    try:
        driver.get(f"http://127.0.0.1:{stack.port}/artifacts/artifact/{found[-1].id}")
        script = ("return Array.from(document.images).filter(i => i.src.startsWith('data:image/'))"
                  ".map(i => [i.alt, i.complete, i.naturalWidth])")
        WebDriverWait(driver, 90).until(lambda d: len(d.execute_script(script)) >= 3 and all(
            complete and width > 0 for _, complete, width in d.execute_script(script)))
        pictures = driver.execute_script(script)
        driver.save_screenshot(str(tmp_path / "artifact.png"))
        if os.environ.get("VAE_UI_SCREENSHOT"):
            sh.copyfile(tmp_path / "artifact.png", os.environ["VAE_UI_SCREENSHOT"])
    finally:
        driver.quit()
    assert sorted(alt for alt, _, _ in pictures) == ["reconstructions", "samples", "samples-t1"]
    assert all(width > 0 for _, _, width in pictures)
    assert (tmp_path / "artifact.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
