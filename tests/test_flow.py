"""The train-vae flow end to end on a tiny synthetic set with Prefect's test harness: promotion, a retried
training step that resumes from its checkpoint, bad parameters; and the registry's champion/challenger rule."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from vae_runtime import registry as reg
from vae.serving import versions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_train_vae_flow_promotes_a_version(prefect_harness, synth_source, tmp_path):
    from conftest import TINY
    from flows.train_vae import train_vae
    from vae_runtime import Decoder

    registry = tmp_path / "registry"
    result = train_vae(source=str(synth_source), shards=str(tmp_path / "shards"), config="configs/demo.yaml",
                       registry=str(registry), runs=str(tmp_path / "runs"),
                       overrides=[*TINY, "train.steps=10", "train.checkpoint_every=10"], precisions=["float16"])
    champion = reg.read_champion(registry)
    assert result["promoted"] and champion["version"] == result["version"]
    folder = registry / "train-vae" / "versions" / result["version"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "decoder.fp16.onnx", "decoder.onnx",
                                                         "encoder.onnx", "metrics.json", "model.json", "samples.png",
                                                         "version.json"]
    readme = (folder / "README.md").read_text()  # the synthetic set's card: no CelebA terms
    assert "synthetic faces" in readme and "non-commercial research purposes only" not in readme
    assert champion["path"] == f"train-vae/versions/{result['version']}"
    assert Decoder(registry).champion_version == result["version"]  # verified against the version record
    assert json.loads((folder / "model.json").read_text())["validation"]["fp16_decoder"]["validated"]
    assert Decoder(folder / "decoder.fp16.onnx").sample(2, seed=0).shape == (2, 3, 16, 16)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert champion["nll_bpd"] == metrics["nll_bpd"] and metrics["split"] == "test"
    assert champion["evidence"]["split_fingerprint"] == metrics["split_fingerprint"]
    assert champion["evidence"]["sample_primary"]["measure"] == metrics["samples"]["measure"]  # pictures measured
    card = json.loads((folder / "model.json").read_text())
    assert card["metrics"] == metrics and card["weights_sha256"] == metrics["weights_sha256"]
    assert Decoder(folder / "decoder.onnx").sample(2, seed=0).shape == (2, 3, 16, 16)
    assert json.loads((folder / "model.json").read_text())["version"] == result["version"]


def test_flow_rejects_bad_configuration_before_any_work(prefect_harness, synth_source, tmp_path):
    from vae_runtime.errors import ConfigError
    from flows.train_vae import train_vae

    with pytest.raises(ConfigError, match="train.nope"):
        train_vae(source=str(synth_source), shards=str(tmp_path / "shards"), config="configs/demo.yaml",
                  registry=str(tmp_path / "registry"), overrides=["train.nope=1"])
    assert not (tmp_path / "shards").exists()


class _RecordingLogger:
    """Stands in for the run logger in flows.train_vae: keeps every line and still logs it to Prefect."""

    def __init__(self, get_logger):
        self.get_logger, self.lines = get_logger, []

    def info(self, msg, *args):
        self.lines.append(msg % args if args else msg)
        self.get_logger().info(msg, *args)


def test_retried_training_resumes_from_its_checkpoint(prefect_harness, synth_source, tmp_path, monkeypatch):
    """The first attempt of `vae train` is SIGKILLed once a checkpoint exists; Prefect retries the task and the
    retry resumes from that checkpoint instead of starting over."""
    from conftest import TINY
    from flows import train_vae as tv
    from vae.core.run import latest_checkpoint

    real_stream, attempts, killed_at = tv._stream, [], []

    def killed_after_first_checkpoint(cmd):
        attempts.append(cmd)
        if len(attempts) > 1:
            return real_stream(cmd)
        run_dir = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while latest_checkpoint(run_dir) is None and proc.poll() is None:
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        killed_at.append(latest_checkpoint(run_dir))
        return proc.returncode

    logger = _RecordingLogger(tv.get_run_logger)
    monkeypatch.setattr(tv, "_stream", killed_after_first_checkpoint)
    monkeypatch.setattr(tv, "get_run_logger", lambda: logger)
    monkeypatch.setattr(tv, "train_model", tv.train_model.with_options(retry_delay_seconds=0))
    registry = tmp_path / "registry"
    result = tv.train_vae(source=str(synth_source), shards=str(tmp_path / "shards"), config="configs/demo.yaml",
                          registry=str(registry), runs=str(tmp_path / "runs"),
                          overrides=[*TINY, "train.steps=30", "train.checkpoint_every=10"])

    assert len(attempts) == 2 and attempts[0] == attempts[1]  # the same command, the same run folder
    assert killed_at[0] is not None, "the first attempt wrote no checkpoint before it was killed"
    resumed_step = int(killed_at[0].stem.split("-")[1])
    assert resumed_step >= 10
    assert any(f"from {killed_at[0].name} (step {resumed_step})" in line for line in logger.lines), logger.lines
    run_dir = tmp_path / "runs" / result["version"]
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps.count(5) == 1 and steps[-1] == 30  # not restarted from step 0
    assert latest_checkpoint(run_dir).name == "step-00000030.pt"
    assert result["promoted"] and reg.read_champion(registry)["version"] == result["version"]
    assert "decoder.fp16.onnx" not in {p.name for p in Path(result["path"]).iterdir()}  # fp16 defaults to off


@pytest.mark.parametrize("params, message", [
    ({"source": "/no/such/folder"}, "parameter 'source': /no/such/folder does not exist"),
    ({"num_processes": 0}, "parameter 'num_processes': must be >= 1, got 0"),
    ({"k": 0}, "parameter 'k': must be in [1, 100000] or null, got 0"),
    ({"k": 10**9}, "parameter 'k': must be in [1, 100000] or null, got 1000000000"),
    ({"synthesize_n": -5}, "parameter 'synthesize_n': must be >= 0, got -5"),
    ({"shards": " "}, "parameter 'shards': must not be empty"),
    ({"precisions": ["bf16"]}, "parameter 'precisions': precision 'bf16': not offered"),  # before training
    # registries that cannot take a promotion: refused before any work, not after training and registering
    ({"registry": "gs://bucket/registry"}, "parameter 'registry': registry gs://bucket/registry: promotion needs"),
    ({"registry": "https://example.com/registry"}, "parameter 'registry': registry https://example.com/registry"),
    ({"registry": "/dev/null/registry"}, "parameter 'registry': /dev/null/registry cannot be written here"),
    ({"registry": "file:///dev/null/registry"}, "file:///dev/null/registry cannot be written here"),
    # promotion's picture check and FID's weights: refused before any work, not after training
    ({"sample_tolerance": -1.0}, "parameter 'sample_tolerance': must be a finite number >= 0"),
    ({"sample_tolerance": float("nan")}, "parameter 'sample_tolerance': must be a finite number >= 0"),
    ({"sample_tolerance": float("inf")}, "parameter 'sample_tolerance': must be a finite number >= 0"),
    ({"inception_weights": "/no/such/pt_inception.pth"},
     "parameter 'inception_weights': Inception weights '/no/such/pt_inception.pth': no such file"),
    ({"inception_weights": "/"}, "parameter 'inception_weights': Inception weights '/': is a directory"),
    ({"inception_weights": " "}, "parameter 'inception_weights': must not be empty"),
    # how long a retried step waits for its folder's lock
    ({"lock_wait_s": -1.0}, "parameter 'lock_wait_s': must be a finite number of seconds >= 0"),
    ({"lock_wait_s": float("inf")}, "parameter 'lock_wait_s': must be a finite number of seconds >= 0"),
])
def test_bad_flow_parameters_fail_with_one_line(synth_source, tmp_path, params, message):
    from vae_runtime.errors import BadInput
    from flows.train_vae import check_parameters

    values = {"source": str(synth_source), "shards": str(tmp_path / "s"), "registry": str(tmp_path / "r"),
              "runs": str(tmp_path / "runs"), "num_processes": 1, "k": None, "crop": 148, "shard_workers": 1,
              "synthesize_n": 0, **params}
    with pytest.raises(BadInput) as caught:
        check_parameters(**values)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_flow_rejects_a_missing_source_before_any_work(prefect_harness, tmp_path):
    from vae_runtime.errors import BadInput
    from flows.train_vae import train_vae

    with pytest.raises(BadInput, match="set synthesize_n"):
        train_vae(source=str(tmp_path / "absent"), shards=str(tmp_path / "shards"), config="configs/demo.yaml",
                  registry=str(tmp_path / "registry"))
    assert not (tmp_path / "shards").exists() and not (tmp_path / "absent").exists()


def test_version_is_stable_for_one_flow_run():
    import datetime

    started = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    a = versions.new_version("abcdef0123", started, "1234abcd-5678")
    assert a == versions.new_version("abcdef0123", started, "1234abcd-5678") == "20260102T030405Z-abcdef01-1234abcd"
    assert versions.new_version("abcdef0123", started, "99999999-0000") != a


def test_only_a_missing_or_empty_folder_is_synthesized_into(tmp_path):
    """A folder of real images once got 2,000 synthetic faces written into it (the demo deployment's default)."""
    from flows.train_vae import needs_synthesis

    (tmp_path / "empty").mkdir()
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "me.png").write_bytes(b"not empty")
    (tmp_path / "celeba.zip").write_bytes(b"PK")
    assert needs_synthesis(str(tmp_path / "absent"), 10) and needs_synthesis(str(tmp_path / "empty"), 10)
    assert not needs_synthesis(str(tmp_path / "faces"), 10) and not needs_synthesis(str(tmp_path / "celeba.zip"), 10)
    assert not needs_synthesis("s3://bucket/celeba", 10) and not needs_synthesis(str(tmp_path / "absent"), 0)
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == ["me.png"]
    # a synthetic set cut short by a kill is written again on the retry, not sharded half-made
    from pipeline.synth import IN_PROGRESS, synthesize

    half = tmp_path / "half"
    (half / "img_align_celeba").mkdir(parents=True)
    (half / "img_align_celeba" / "000001.jpg").write_bytes(b"part of a set")
    (half / IN_PROGRESS).touch()
    assert needs_synthesis(str(half), 10)
    synthesize(half, 12, seed=1)
    assert not (half / IN_PROGRESS).exists() and not needs_synthesis(str(half), 10)
    assert (half / "list_eval_partition.txt").is_file()


def test_shards_without_a_test_split_stop_the_flow_before_training(synth_source, tmp_path):
    import shutil

    from vae_runtime.errors import BadInput
    from flows.train_vae import check_shards
    from pipeline.shard import shard

    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    partition = source / "list_eval_partition.txt"
    partition.write_text("".join(f"{line.split()[0]} 0\n" for line in partition.read_text().splitlines()))
    shard(source, tmp_path / "shards", size=16, maxcount=50, progress=False)
    with pytest.raises(BadInput, match="the test split holds no images"):
        check_shards(str(tmp_path / "shards"), None)


def test_a_run_its_worker_left_behind_is_marked_crashed_so_it_can_be_retried(prefect_harness):
    """`prefect flow-run cancel` leaves such a run Cancelling for good and `retry` takes finished runs only."""
    import asyncio
    import uuid

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling, Completed, Running

    from flows.recover import mark_crashed

    @flow
    def left_behind():
        pass

    async def create(state, name=None):
        async with get_client() as client:
            return str((await client.create_flow_run(left_behind, state=state, name=name)).id)

    async def state_of(run_id):
        async with get_client() as client:
            return (await client.read_flow_run(uuid.UUID(run_id))).state.type.value

    for state in (Running(), Cancelling()):
        run_id = asyncio.run(create(state))
        assert "now CRASHED" in asyncio.run(mark_crashed(run_id))
        assert asyncio.run(state_of(run_id)) == "CRASHED"
    finished = asyncio.run(create(Completed()))
    assert "nothing changed" in asyncio.run(mark_crashed(finished))
    assert asyncio.run(state_of(finished)) == "COMPLETED"
    by_name = asyncio.run(create(Running(), name="left-behind-otter"))
    assert "now CRASHED" in asyncio.run(mark_crashed("left-behind-otter"))  # as `prefect flow-run retry` takes
    assert asyncio.run(state_of(by_name)) == "CRASHED"
    with pytest.raises(SystemExit, match="no flow run with the id or name 'no-such-run'"):
        asyncio.run(mark_crashed("no-such-run"))
    with pytest.raises(SystemExit, match="no flow run with the id or name"):
        asyncio.run(mark_crashed(str(uuid.uuid4())))


def test_a_retried_promotion_announces_the_champion_once_more_under_the_same_event_id(
        prefect_harness, trained_run, tmp_path_factory, tmp_path, monkeypatch):
    """A crash between the champion swap and its event once lost the event (the retry found the version already
    champion and said nothing); the retry now sends it again with the same id, which Prefect stores once."""
    from prefect import flow

    import flows.train_vae
    from exported_model import exported_once
    from flows.train_vae import champion_event_id, promote_model

    out, card = exported_once(trained_run, tmp_path_factory)
    sent = []
    monkeypatch.setattr(flows.train_vae, "emit_event", lambda **event: sent.append(event))
    registry = str(tmp_path / "registry")

    @flow
    def promote_twice():
        for _ in range(2):
            promote_model(registry, "v1", str(trained_run), str(out), card["metrics"], str(tmp_path / "runs"))

    promote_twice()
    assert [e["id"] for e in sent] == [champion_event_id(registry, "v1")] * 2
    assert champion_event_id(registry, "v2") != champion_event_id(registry, "v1")
    assert sent[1]["payload"]["version"] == "v1" and sent[1]["payload"]["previous"] is None


def test_watch_source_starts_training_only_for_new_images_and_never_twice(prefect_harness, synth_source, tmp_path):
    """On the harness's real server: a source its shards already hold triggers nothing; new images start the
    training deployment once, with the given parameters; a second look while that run is scheduled waits for it;
    once that run has sharded them, nothing new, nothing started."""
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    from flows.train_vae import train_vae
    from flows.watch_source import watch_source
    from pipeline.shard import shard

    source, shards = tmp_path / "source", tmp_path / "shards"
    shutil.copytree(synth_source, source)
    shard(source, shards, size=16, progress=False)
    train_vae.to_deployment(name="watched").apply()
    params = {"source": str(source), "shards": str(shards), "config": "configs/demo.yaml",
              "registry": str(tmp_path / "registry"), "runs": str(tmp_path / "runs")}
    assert watch_source(str(source), str(shards), "train-vae/watched", params) == {"new_images": 0, "triggered": None}

    first = source / "img_align_celeba" / "000001.jpg"
    for name in ("900001.jpg", "900002.jpg"):  # two new images, named in the partition file as CelebA's are
        shutil.copyfile(first, source / "img_align_celeba" / name)
        with open(source / "list_eval_partition.txt", "a") as f:
            f.write(f"{name} 0\n")
    started = watch_source(str(source), str(shards), "train-vae/watched", params)
    assert started["new_images"] == 2 and started["triggered"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(started["triggered"])
        assert run.parameters == params and run.state.is_scheduled()
        again = watch_source(str(source), str(shards), "train-vae/watched", params)
        assert again == {"new_images": 2, "triggered": None, "waiting_for": started["triggered"]}
        shard(source, shards, size=16, progress=False)  # what the started run does first
        client.set_flow_run_state(run.id, Completed(), force=True)
    assert watch_source(str(source), str(shards), "train-vae/watched", params) == {"new_images": 0, "triggered": None}
