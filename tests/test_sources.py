"""Sources: the official zip layout shards byte-identically to the extracted folder (partition file beside
the zip or inside it); partition mismatches are reported in the manifest, not fatal; the shared real
CelebA sample shards with the partition's counts and identities; bad sources are one-line errors."""

import json
import shutil
import zipfile

import pytest

from conftest import SHARED_SAMPLE
from pipeline.shard import shard
from pipeline.sources import PARTITION_FILE, open_source
from vae.errors import BadInput

META_FILES = ("list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt")


def _make_zip(folder, zip_path, with_metadata_inside):
    """A zip in CelebA's layout: `img_align_celeba/000001.jpg` members (and the metadata files if asked)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(zipfile.ZipInfo("img_align_celeba/"), b"")  # a directory entry, as in the official zip
        for path in sorted((folder / "img_align_celeba").iterdir()):
            zf.write(path, f"img_align_celeba/{path.name}")
        if with_metadata_inside:
            for name in META_FILES:
                zf.write(folder / name, name)
    return zip_path


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without_source(manifest_path):
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("source")
    return manifest


@pytest.mark.parametrize("metadata", ["beside", "inside"])
def test_zip_shards_like_the_extracted_folder(synth_source, tiny_shards, tmp_path, metadata):
    folder = tmp_path / "celeba"
    folder.mkdir()
    zip_path = _make_zip(synth_source, folder / "img_align_celeba.zip", metadata == "inside")
    if metadata == "beside":
        for name in META_FILES:
            shutil.copy(synth_source / name, folder / name)
    out = tmp_path / "shards"
    # worker processes reopen the zip themselves (the headline use: `--workers 8` on the official zip)
    summary = shard(zip_path, out, size=16, maxcount=25, workers=2 if metadata == "inside" else 1, progress=False)
    assert summary["written"] == 120
    from_zip, from_folder = _tree(out), _tree(tiny_shards)
    assert sorted(from_zip) == sorted(from_folder)
    for rel in from_zip:
        if rel != "manifest.json":
            assert from_zip[rel] == from_folder[rel], rel  # byte-identical shards
    assert _without_source(out / "manifest.json") == _without_source(tiny_shards / "manifest.json")
    assert shard(zip_path, out, size=16, maxcount=25, progress=False)["up_to_date"]


def test_partition_mismatches_are_reported_not_fatal(synth_source, tmp_path):
    folder = tmp_path / "celeba"
    folder.mkdir()
    lines = (synth_source / PARTITION_FILE).read_text().splitlines()
    # the partition names two images the zip lacks, and does not name the zip's last image
    named = lines[:-1] + ["999998.jpg 0", "999999.jpg 2"]
    (folder / PARTITION_FILE).write_text("\n".join(named) + "\n")
    zip_path = _make_zip(synth_source, folder / "img_align_celeba.zip", with_metadata_inside=False)
    summary = shard(zip_path, tmp_path / "out", size=16, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    last = lines[-1].split()[0][:-4]
    assert manifest["partition_missing"] == ["999998", "999999"]
    assert manifest["skipped"] == [{"key": last, "reason": f"not named in {PARTITION_FILE}"}]
    assert summary["written"] == 119 and summary["skipped"] == 1


def test_bad_sources_are_one_line_errors(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BadInput, match="broken.zip: not a valid zip file"):
        open_source(tmp_path / "broken.zip")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadInput, match="notes.txt: expected a folder of images or a .zip file"):
        open_source(tmp_path / "notes.txt")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / PARTITION_FILE).write_text("000001.jpg 7\n")
    with pytest.raises(BadInput, match=f"{PARTITION_FILE} line 1"):
        open_source(tmp_path / "src").listing()


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason=f"{SHARED_SAMPLE} (real CelebA sample) is absent")
def test_real_celeba_sample_shards_by_its_partition(tmp_path):
    # a subset as symlinks (the real images are never copied) with the official files trimmed to it
    partition = dict(line.split() for line in (SHARED_SAMPLE / PARTITION_FILE).read_text().splitlines())
    identity = dict(line.split() for line in (SHARED_SAMPLE / "identity_CelebA.txt").read_text().splitlines())
    train = [n for n in sorted(partition) if partition[n] == "0"][:200]
    valid = [n for n in sorted(partition) if partition[n] == "1"][:100]
    names = sorted(train + valid)
    src = tmp_path / "celeba"
    (src / "img_align_celeba").mkdir(parents=True)
    for name in names:
        (src / "img_align_celeba" / name).symlink_to(SHARED_SAMPLE / "img_align_celeba" / name)
    (src / PARTITION_FILE).write_text("".join(f"{n} {partition[n]}\n" for n in names))
    (src / "identity_CelebA.txt").write_text("".join(f"{n} {identity[n]}\n" for n in names))

    out = tmp_path / "shards"
    summary = shard(src, out, size=64, workers=2, maxcount=128, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["written"] == 300 and manifest["skipped"] == [] and manifest["partition_missing"] == []
    assert {s: manifest["splits"][s]["count"] for s in ("train", "valid", "test")} == \
        {"train": 200, "valid": 100, "test": 0}
    from pipeline.records import iter_samples

    for split, expected in (("train", train), ("valid", valid)):
        seen = {}
        for rec in manifest["splits"][split]["shards"]:
            for key, pixels, meta in iter_samples((out / split / rec["name"]).read_bytes()):
                assert pixels.shape == (64, 64, 3)
                seen[key] = json.loads(bytes(meta))
        assert sorted(seen) == sorted(n[:-4] for n in expected)
        for key, meta in seen.items():
            assert meta == {"image_id": key, "split": split, "identity": int(identity[f"{key}.jpg"])}
