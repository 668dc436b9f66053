"""Aliases, pins, tags and archiving in the model registry, on a local folder and on S3 (moto): an alias names a
published version, `REGISTRY@VERSION` and `REGISTRY@ALIAS` load exactly that version (verified like the champion),
an archived version is never promoted nor aliased, and every refusal is one line, exit 2, the registry unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exported_model import exported_once
from vae_runtime import Champion, Decoder, RuntimeModelError
from vae_runtime import registry as reg
from vae_runtime import storage
from vae.cli import main
from vae.serving import aliases, notes, promotion, versions


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def registry(request, tmp_path):
    """A registry location: a local folder, or a fresh prefix of the moto S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "registry")
    request.getfixturevalue("s3_endpoint")
    return f"s3://models/aliases-{tmp_path.name}"


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return exported_once(trained_run, tmp_path_factory)


def metrics(nll: float) -> dict:
    return {"nll_bpd": nll, "elbo_bpd": 1.0, "k": 10, "split": "test", "split_fingerprint": "f" * 64,
            "image_size": 16, "n_images": 5, "shards": "s", "config_hash": "h", "weights_sha256": "w", "model_step": 1}


def publish(registry: str, version: str, tmp_path, nll: float = 5.0) -> dict:
    (tmp_path / f"{version}.onnx").write_bytes(version.encode())
    (tmp_path / f"{version}.metrics.json").write_text(json.dumps(metrics(nll)))
    versions.register(registry, version, {"decoder.onnx": tmp_path / f"{version}.onnx",
                                          "metrics.json": tmp_path / f"{version}.metrics.json"})
    return metrics(nll)


def snapshot(registry: str) -> dict[str, bytes]:
    """Every file of the registry and its bytes: what a refused command must leave as it was."""
    return {rel: storage.read_bytes(storage.join(registry, rel)) for rel, _ in storage.list_files(registry)}


def refused(args: list[str], says: str, registry: str, capsys) -> None:
    """`vae ARGS` exits 2 with one line naming the problem, and the registry is unchanged."""
    before = snapshot(registry)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert snapshot(registry) == before


def test_aliases_are_set_moved_listed_and_deleted(registry, tmp_path, capsys):
    for version, nll in (("v1", 5.0), ("v2", 4.0)):
        publish(registry, version, tmp_path, nll)
    promotion.promote(registry, "v1", metrics(5.0))
    assert main(["registry", "alias", "set", registry, "staging", "v1"]) == 0
    assert main(["registry", "alias", "set", registry, "canary", "v2"]) == 0
    assert "(was v1)" in (capsys.readouterr(), main(["registry", "alias", "set", registry, "staging", "v2"]),
                          capsys.readouterr().out)[2]
    assert main(["registry", "alias", "list", registry]) == 0
    assert json.loads(capsys.readouterr().out) == {"champion": "v1", "staging": "v2", "canary": "v2"}
    assert main(["registry", "alias", "delete", registry, "canary"]) == 0
    assert reg.list_aliases(registry) == {"champion": "v1", "staging": "v2"}
    assert reg.read_alias(registry, "staging")["record_sha256"]  # its version record pinned, like the champion's


def test_a_version_and_an_alias_pin_exactly_that_version(registry, tmp_path, exported, capsys):
    out, _ = exported
    files = {name: out / name for name in ("decoder.onnx", "encoder.onnx", "model.json")}
    for version in ("v1", "v2"):
        versions.register(registry, version, files)
    promotion.promote(registry, "v2", metrics(5.0))
    aliases.set_alias(registry, "stable", "v1")
    want = Decoder(out).sample(2, seed=4)
    cache = tmp_path / "cache"
    for pin, version in (("@v1", "v1"), ("@stable", "v1"), ("@v2", "v2"), ("@champion", "v2"), ("", "v2")):
        decoder = Decoder(Champion(registry + pin, cache_dir=cache))
        assert decoder.champion_version == version, pin
        np.testing.assert_array_equal(decoder.sample(2, seed=4), want)

    pinned = Champion(registry + "@v1", cache_dir=cache)
    followed = Champion(registry + "@stable", cache_dir=cache)
    versions.register(registry, "v3", files)
    promotion.promote(registry, "v3", metrics(4.0))
    aliases.set_alias(registry, "stable", "v3")
    assert not pinned.refresh() and pinned.version == "v1"  # a pinned version never moves
    assert followed.refresh() and followed.version == "v3"  # an alias is followed

    damaged = storage.join(reg.version_dir(registry, "v2"), "decoder.onnx")
    storage.write_bytes_atomic(damaged, b"replaced")  # v2's graph no longer matches its version record
    with pytest.raises(RuntimeModelError, match="decoder.onnx"):
        Champion(registry + "@v2", cache_dir=tmp_path / "fresh").decoder()
    if not storage.is_url(registry):  # the CLI through resolve_model: a local registry, pinned
        assert main(["sample", "--model", registry + "@stable", "--n", "2", "--out", str(tmp_path / "g.png")]) == 0
        assert (tmp_path / "g.png").stat().st_size > 0
        assert main(["sample", "--model", registry + "@v2", "--n", "2", "--out", str(tmp_path / "x.png")]) == 2
        assert "sha256 differs" in capsys.readouterr().err
        assert main(["info", registry + "@stable"]) == 0
        described = json.loads(capsys.readouterr().out)
        assert described["pinned"] == {"pin": "stable", "version": "v3", "alias": "stable", "archived": None}


def test_sample_on_s3_takes_a_pinned_registry(s3_endpoint, tmp_path, exported, capsys, monkeypatch):
    out, _ = exported
    registry = f"s3://models/pinned-{tmp_path.name}"
    files = {name: out / name for name in ("decoder.onnx", "encoder.onnx", "model.json")}
    versions.register(registry, "v1", files)
    monkeypatch.setenv("VAE_RUNTIME_CACHE", str(tmp_path / "cache"))
    assert main(["sample", "--model", registry + "@v1", "--n", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["sample", "--model", registry, "--n", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "no champion yet" in capsys.readouterr().err  # unpinned it follows the champion, as before


@pytest.mark.parametrize("location, base, pin", [
    ("s3://bucket/registry@v3", "s3://bucket/registry", "v3"),
    ("sftp://user@host/registry", "sftp://user@host/registry", None),
    ("sftp://user@host/registry@staging", "sftp://user@host/registry", "staging"),
    ("http://user@host", "http://user@host", None),
    ("/data/user@host/registry", "/data/user@host/registry", None),
    ("/data/registry@2026-01", "/data/registry", "2026-01"),
])
def test_a_pin_is_split_on_the_last_at_after_the_last_slash(location, base, pin):
    assert reg.split_pin(location) == (base, pin)


@pytest.mark.parametrize("location", ["/data/registry@", "s3://b/registry@", "/data/registry@..", "s3://b/r@-x", "@v1"])
def test_a_malformed_pin_is_one_line(location):
    with pytest.raises(reg.RegistryError, match="after '@' is not a version or an alias") as err:
        reg.split_pin(location)
    assert "\n" not in str(err.value)


def test_an_archived_version_is_kept_never_promoted_nor_aliased(registry, tmp_path, capsys):
    m1, m2 = publish(registry, "v1", tmp_path, 5.0), publish(registry, "v2", tmp_path, 4.0)
    promotion.promote(registry, "v1", m1)
    assert main(["registry", "archive", registry, "v2", "--reason", "draws grey faces"]) == 0
    outcome = promotion.promote(registry, "v2", m2)  # better by the evidence, yet archived
    assert not outcome["promoted"] and "archived: draws grey faces" in outcome["reason"]
    assert reg.read_champion(registry)["version"] == "v1" and reg.read_version_record(registry, "v2")
    refused(["registry", "alias", "set", registry, "staging", "v2"], "is archived (draws grey faces)", registry,
            capsys)
    refused(["registry", "archive", registry, "v1", "--reason", "x"], "it is the champion", registry, capsys)

    publish(registry, "v3", tmp_path, 4.5)
    promotion.promote(registry, "v3", metrics(4.5))
    promotion.rollback(registry, "v1", "v3 is slow")  # rollback archives the version it replaces
    assert "v3 is slow" in reg.read_notes(registry, "v3")["archived"]["reason"]
    assert not promotion.promote(registry, "v3", metrics(4.5))["promoted"]
    promotion.rollback(registry, "v3", "v1 was worse after all")  # an operator may bring it back
    assert reg.read_notes(registry, "v3").get("archived") is None and reg.read_notes(registry, "v1")["archived"]


def test_a_rolled_back_version_of_an_older_registry_counts_as_archived(tmp_path, capsys):
    registry = str(tmp_path / "registry")
    m1, m2 = publish(registry, "v1", tmp_path, 5.0), publish(registry, "v2", tmp_path, 4.0)
    promotion.promote(registry, "v1", m1)
    champion = tmp_path / "registry/train-vae/champion.json"  # as older rollbacks wrote it: no notes
    champion.write_text(json.dumps({**json.loads(champion.read_text()), "rolled_back": ["v2"],
                                    "rollback": {"reason": "old", "from": "v2"}}))
    assert not promotion.promote(registry, "v2", m2)["promoted"]
    refused(["registry", "alias", "set", registry, "staging", "v2"], "rolled back by an operator (old)", registry,
            capsys)


def test_list_shows_metrics_aliases_tags_and_archiving(registry, tmp_path, capsys):
    publish(registry, "v1", tmp_path, 5.0)
    publish(registry, "v2", tmp_path, 4.0)
    promotion.promote(registry, "v1", metrics(5.0))
    aliases.set_alias(registry, "staging", "v1")
    assert main(["registry", "tag", registry, "v1", "owner=ml", "dataset=celeba"]) == 0
    assert main(["registry", "tag", registry, "v1", "owner="]) == 0  # an empty value removes the key
    notes.archive(registry, "v2", "superseded")
    capsys.readouterr()
    assert main(["registry", "list", registry]) == 0
    listed = {v["version"]: v for v in json.loads(capsys.readouterr().out)["versions"]}
    assert listed["v1"]["nll_bpd"] == 5.0 and listed["v1"]["aliases"] == ["champion", "staging"]
    assert listed["v1"]["tags"] == {"dataset": "celeba"} and listed["v1"]["archived"] is None
    assert listed["v2"]["aliases"] == [] and listed["v2"]["archived"] == "superseded"
    assert reg.list_versions(registry) == ["v1", "v2"]  # notes and aliases are not versions


@pytest.mark.parametrize("args, says", [
    (["alias", "set", "{r}", "staging", "v9"], "version v9 is not published"),
    (["alias", "set", "{r}", "v7", "v1"], "could be taken for a version name"),
    (["alias", "set", "{r}", "v1", "v1"], "could be taken for a version name"),
    (["alias", "set", "{r}", "V12", "v1"], "could be taken for a version name"),
    (["alias", "set", "{r}", "20260101T000000Z-abc", "v1"], "not a plain name"),
    (["alias", "set", "{r}", "../x", "v1"], "not a plain name"),
    (["alias", "set", "{r}", "a@b", "v1"], "not a plain name"),
    (["alias", "set", "{r}", "champion", "v1"], "moved by promotion"),
    (["alias", "set", "{r}", "staging"], "name the version"),
    (["alias", "delete", "{r}", "nope"], "no such alias"),
    (["archive", "{r}", "v9", "--reason", "x"], "not published"),
    (["archive", "{r}", "v1", "--reason", " "], "say why"),
    (["tag", "{r}", "v1", "novalue"], "expected key=value"),
    (["tag", "{r}", "v9", "a=b"], "not published"),
    (["list", "{r}@"], "not a"),
    (["list", "{r}@v1"], "not a registry"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(registry, tmp_path, capsys, args, says):
    publish(registry, "v1", tmp_path)
    aliases.set_alias(registry, "canary", "v1")
    refused(["registry", *[a.replace("{r}", registry) for a in args]], says, registry, capsys)


def test_info_and_decoder_refuse_an_unknown_pin_in_one_line(tmp_path, capsys):
    registry = str(tmp_path / "registry")
    publish(registry, "v1", tmp_path)
    for pin in ("@nope", "@"):
        refused(["info", registry + pin], "registry" if pin == "@nope" else "after '@'", registry, capsys)
        refused(["sample", "--model", registry + pin, "--out", str(tmp_path / "g.png")], "'@'" if pin == "@" else
                "no version or alias 'nope'", registry, capsys)
    with pytest.raises(RuntimeModelError, match="no version or alias 'nope'"):
        Decoder(registry + "@nope")
