"""How the runtime finds and trusts a model: folders checked against model.json's sha256, registries followed
to their champion (relative paths, version records pinned by the champion), bare graphs loaded as they are,
and `vae sample` / `vae encode` given a registry."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import numpy as np
import pytest

from vae_runtime.digest import sha256_file
from exported_model import exported_once
from vae.cli import main
from vae_runtime import Champion, Decoder, Encoder, RuntimeModelError
from vae_runtime import registry as reg
from vae.serving import promotion, versions


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return exported_once(trained_run, tmp_path_factory)


@pytest.fixture()
def copy(exported, tmp_path):
    out, _ = exported
    target = tmp_path / "model"
    shutil.copytree(out.resolve(), target)
    return target


def evidence(nll):
    return {"nll_bpd": nll, "elbo_bpd": 1.0, "k": 8, "split": "test", "split_fingerprint": "f" * 64,
            "image_size": 16}


def test_model_json_lists_the_sha256_of_every_graph(exported):
    out, card = exported
    assert sorted(card["sha256"]) == sorted(card["files"]) == ["decoder.fp16.onnx", "decoder.onnx", "encoder.onnx"]
    assert all(sha256_file(out / name) == digest for name, digest in card["sha256"].items())


def test_a_folder_loads_verified_and_a_replaced_graph_is_refused(copy):
    want = Decoder(copy).sample(2, seed=0)
    np.testing.assert_array_equal(Decoder(copy / "decoder.onnx").sample(2, seed=0), want)  # a bare graph
    np.testing.assert_array_equal(Decoder(copy, precision="fp16").sample(2, seed=0).round(1), want.round(1))
    shutil.copyfile(copy / "decoder.fp16.onnx", copy / "decoder.onnx")  # a valid graph, but not this export's
    with pytest.raises(RuntimeModelError, match=r"decoder.onnx: sha256 differs from model.json's"):
        Decoder(copy)
    Encoder(copy)  # the encoder is still the one the card describes
    with pytest.raises(RuntimeModelError, match=rf"model folder {copy}: no decoder.int8.onnx \(it holds decoder.fp16"
                                                r".onnx, decoder.onnx, encoder.onnx\); export it with `vae export "
                                                r"--precision int8`"):
        Decoder(copy, precision="int8")  # named as the app gave it, not the export's hidden folder


def test_a_folder_as_exports_write_it_loads_by_every_spelling_of_a_precision(copy):
    """Today's exports: model.json lists decoder.fp16.onnx and that graph's metadata says "float16" (ONNX's word);
    the runtime reads both as the vocabulary's fp16, and an unknown precision is one line naming the known ones."""
    card = json.loads((copy / "model.json").read_text())
    assert "decoder.fp16.onnx" in card["sha256"]
    for spelling in ("fp16", "float16"):
        half = Decoder(copy, precision=spelling)
        assert half.path.endswith("decoder.fp16.onnx") and half.card()["precision"] == "float16"
        assert half.precision == "fp16"
    for spelling in (None, "fp32", "float32"):
        plain = Decoder(copy, precision=spelling)
        assert plain.path.endswith("/decoder.onnx") and plain.card()["precision"] == "float32"
        assert plain.precision == "fp32"
    assert Decoder(copy / "decoder.fp16.onnx").precision == "fp16"  # a bare graph: what its metadata says
    with pytest.raises(RuntimeModelError, match=r"^precision 'half': not offered \(the precisions: fp32, fp16, int8"):
        Decoder(copy, precision="half")
    with pytest.raises(RuntimeModelError, match=r"no encoder.fp16.onnx .*; an export writes no encoder at fp16"):
        Encoder(copy, precision="fp16")


def test_an_older_folder_without_hashes_loads_with_a_warning(copy):
    card = json.loads((copy / "model.json").read_text())
    del card["sha256"]
    (copy / "model.json").write_text(json.dumps(card))
    with pytest.warns(RuntimeWarning, match="lists no sha256"):
        assert Decoder(copy).sample(1, seed=0).shape == (1, 3, 16, 16)


def test_a_local_registry_champion_loads_verified_and_refreshes(exported, tmp_path):
    out, _ = exported
    registry = tmp_path / "registry"
    files = {name: out / name for name in ("decoder.onnx", "encoder.onnx", "model.json")}
    versions.register(registry, "v1", files)
    promotion.promote(registry, "v1", evidence(5.0))
    champion = Champion(registry)
    assert champion.version == "v1" and not champion.refresh()
    decoder = Decoder(registry)  # a registry location loads its champion
    assert decoder.champion_version == "v1" and decoder.version == "test-1"
    np.testing.assert_array_equal(decoder.sample(2, seed=3), Decoder(out).sample(2, seed=3))

    versions.register(registry, "v2", files)
    promotion.promote(registry, "v2", evidence(4.0))
    assert champion.refresh() and champion.version == "v2" and champion.decoder().champion_version == "v2"

    (registry / "train-vae/versions/v2/decoder.onnx").write_bytes(b"tampered")
    with pytest.raises(RuntimeModelError, match="sha256 differs from the registry's version record"):
        champion.decoder()
    record = registry / "train-vae/versions/v2/version.json"
    record.write_text(record.read_text().replace("decoder.onnx", "decoder2.onnx"))
    with pytest.raises(RuntimeModelError, match="differs from the one the champion record pins"):
        Champion(registry)
    with pytest.raises(RuntimeModelError, match="has no decoder.fp16.onnx"):
        champion.graph("decoder", "fp16")


def test_a_registry_without_a_champion_is_one_line(tmp_path):
    (tmp_path / "empty" / "train-vae").mkdir(parents=True)
    with pytest.raises(RuntimeModelError, match="no champion yet"):
        Champion(tmp_path / "empty")


def test_sample_and_encode_accept_a_registry(exported, tmp_path, capsys, synth_source):
    out, _ = exported
    registry = tmp_path / "registry"
    versions.register(registry, "v1", {name: out / name for name in ("decoder.onnx", "encoder.onnx", "model.json")})
    promotion.promote(registry, "v1", evidence(5.0))
    assert main(["sample", "--model", str(registry), "--n", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert "model test-1" in capsys.readouterr().out
    assert main(["encode", "--model", str(registry), "--images", str(synth_source / "img_align_celeba"),
                 "--out", str(tmp_path / "c.npz")]) == 0
    with np.load(tmp_path / "c.npz") as npz:
        assert npz["mu"].shape[1] == 4
    (tmp_path / "broken" / "train-vae").mkdir(parents=True)
    (tmp_path / "broken" / "train-vae" / "champion.json").write_text("{")
    assert main(["sample", "--model", str(tmp_path / "broken"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read the champion" in err and "not valid JSON" in err


def test_a_warning_free_load_of_a_current_folder(copy):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Decoder(copy)


def test_a_champion_of_an_older_registry_loads_with_a_warning(exported, tmp_path):
    out, _ = exported
    folder = tmp_path / "registry" / "train-vae" / "versions" / "old"
    shutil.copytree(out.resolve(), folder)
    (folder.parents[1] / "champion.json").write_text(json.dumps({"version": "old", "path": str(folder),
                                                                  "nll_bpd": 5.0, "split": "test", "k": 8}))
    with pytest.warns(RuntimeWarning, match="without version records"):
        champion = Champion(tmp_path / "registry")
    assert champion.decoder().sample(1, seed=0).shape == (1, 3, 16, 16)
    with pytest.raises(RuntimeModelError, match="has no decoder.int8.onnx"):
        champion.graph("decoder", "int8")


def _memory_registry(out, name: str) -> str:
    registry = f"memory://{name}"
    versions.register(registry, "v1", {n: out / n for n in ("decoder.onnx", "encoder.onnx", "model.json")})
    promotion.promote(registry, "v1", evidence(5.0))
    return registry


def test_names_in_records_never_reach_outside_the_registry_or_the_cache(exported, tmp_path):
    from vae_runtime import storage

    out, _ = exported
    registry = tmp_path / "registry"
    versions.register(registry, "v1", {n: out / n for n in ("decoder.onnx", "model.json")})
    promotion.promote(registry, "v1", evidence(5.0))
    champion_json = registry / "train-vae" / "champion.json"
    record = json.loads(champion_json.read_text())
    for version in ("../../../escaped", "/etc", "a/b"):
        champion_json.write_text(json.dumps({**record, "version": version}))
        with pytest.raises(RuntimeModelError) as caught:
            Champion(registry, cache_dir=tmp_path / "cache")
        assert f"version {version!r} is not a plain name" in str(caught.value)
    remote = _memory_registry(out, "names")
    record_url = storage.join(reg.version_dir(remote, "v1"), reg.VERSION_RECORD)
    listed = json.loads(storage.read_bytes(record_url))
    listed["files"]["../../../outside.txt"] = listed["files"]["model.json"]
    storage.write_bytes_atomic(record_url, json.dumps(listed).encode())
    with pytest.raises(RuntimeModelError, match=r"file '\.\./\.\./\.\./outside.txt' is not a plain name"):
        Champion(remote, cache_dir=tmp_path / "cache")
    with pytest.raises(reg.RegistryError, match="file '../x' is not a plain name"):
        versions.register(registry, "v2", {"../x": out / "model.json"})
    assert not (tmp_path / "outside.txt").exists() and not (registry / "x").exists()


def test_a_failing_http_registry_is_one_line(tmp_path):
    import http.server
    import threading

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeModelError) as caught:
            Champion(f"http://127.0.0.1:{server.server_port}/registry", cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()
    message = str(caught.value)
    assert "cannot read the champion (" in message and "500" in message and len(message.splitlines()) == 1


def test_an_unwritable_cache_is_one_line(exported, tmp_path):
    out, _ = exported
    registry = _memory_registry(out, "cache")
    (tmp_path / "a-file").write_text("not a folder")
    champion = Champion(registry, cache_dir=tmp_path / "a-file" / "cache")
    with pytest.raises(RuntimeModelError, match=r"cache .*a-file.*: cannot write .*decoder.onnx .*cache_dir"):
        champion.decoder()


def test_a_damaged_record_of_an_older_registry_is_one_line(exported, tmp_path):
    out, _ = exported
    folder = tmp_path / "registry" / "train-vae" / "versions" / "old"
    shutil.copytree(out.resolve(), folder)
    (folder.parents[1] / "champion.json").write_text(json.dumps({"version": "old", "nll_bpd": 5.0}))
    for damaged, needle in (("{", "not valid JSON"), ('{"version": "old"}', "not a version record (no 'files')")):
        (folder / "version.json").write_text(damaged)
        with pytest.raises(RuntimeModelError, match=f"cannot read the record of champion old .*{re.escape(needle)}"):
            Champion(tmp_path / "registry")


def test_a_version_record_written_by_hand_is_pinned_as_written(exported, tmp_path):
    """The champion pins the record's bytes as stored, which the runtime hashes, whatever their formatting."""
    out, _ = exported
    registry = tmp_path / "registry"
    versions.register(registry, "v1", {n: out / n for n in ("decoder.onnx", "model.json")})
    record = registry / "train-vae" / "versions" / "v1" / "version.json"
    record.write_text(json.dumps(json.loads(record.read_text())))  # compact, as another tool writes it
    promotion.promote(registry, "v1", evidence(5.0))
    assert Champion(registry).decoder().sample(1, seed=0).shape == (1, 3, 16, 16)


def _register_same_version(registry, files, barrier, errors):
    barrier.wait()
    try:
        versions.register(registry, "v1", files)
    except Exception as err:  # noqa: BLE001 - the test reports whatever escapes
        errors.put(f"{type(err).__name__}: {err}")


def test_two_registrations_of_one_version_at_once_both_succeed(exported, tmp_path):
    """A zombie task and its retry register the same version: they take turns, and one publishes it whole."""
    import multiprocessing

    out, _ = exported
    files = {n: out.resolve() / n for n in ("decoder.onnx", "encoder.onnx", "model.json")}
    context = multiprocessing.get_context("fork")
    for trial in range(4):
        registry = tmp_path / f"registry-{trial}"
        barrier, errors = context.Barrier(2), context.Queue()
        procs = [context.Process(target=_register_same_version, args=(registry, files, barrier, errors))
                 for _ in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert errors.empty(), errors.get()
        assert reg.list_versions(registry) == ["v1"]
        assert not [p for p in (registry / "train-vae" / "versions").iterdir() if p.name.startswith(".")]
