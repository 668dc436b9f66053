"""Shards: round trip against the preprocessing, manifest fields, re-run is a no-op, incremental updates,
bad inputs recorded, and the stock webdataset reader agrees with ours."""

import hashlib
import json
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vae_runtime.errors import BadInput
from common.folder_lock import LOCK_NAME
from vae_runtime.preprocess import preprocess
from pipeline.records import iter_samples
from pipeline.shard import shard
from pipeline.sources import hash_split


def _read_all(shards, split):
    manifest = json.loads((shards / "manifest.json").read_text())
    out = {}
    for rec in manifest["splits"][split]["shards"]:
        for key, pixels, meta in iter_samples((shards / split / rec["name"]).read_bytes()):
            out[key] = (pixels, json.loads(bytes(meta)))
    return out


def test_round_trip_counts_pixels_and_metadata(synth_source, tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    partition = dict(line.split() for line in (synth_source / "list_eval_partition.txt").read_text().splitlines())
    for split, code in (("train", "0"), ("valid", "1"), ("test", "2")):
        expected = sorted(name[:-4] for name, c in partition.items() if c == code)
        samples = _read_all(tiny_shards, split)
        assert sorted(samples) == expected
        assert manifest["splits"][split]["count"] == len(expected)
        for key in expected[:5]:
            pixels, meta = samples[key]
            data = (synth_source / "img_align_celeba" / f"{key}.jpg").read_bytes()
            np.testing.assert_array_equal(pixels, preprocess(data, 148, 16))
            assert meta["image_id"] == key and meta["split"] == split
            assert "attrs" in meta and len(meta["attrs"]) == 40 and "identity" in meta


def test_manifest_fields(tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["preprocessing"]["crop"] == 148 and manifest["preprocessing"]["size"] == 16
    assert len(manifest["source"]["fingerprint"]) == 64
    assert manifest["skipped"] == []
    for split, info in manifest["splits"].items():
        assert info["count"] == sum(s["count"] for s in info["shards"])
        for rec in info["shards"]:
            path = tiny_shards / split / rec["name"]
            assert rec["name"].startswith(f"celeba-{split}-") and rec["name"].endswith(".tar")
            data = path.read_bytes()
            assert rec["bytes"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()
            assert rec["count"] <= 25


def test_rerun_is_a_no_op(synth_source, tiny_shards):
    def data():  # the lock file records who holds the folder while a run is in it: not data
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tiny_shards.rglob("*")
                if p.is_file() and p.name != LOCK_NAME}

    before = data()
    summary = shard(synth_source, tiny_shards, size=16, maxcount=25, progress=False)
    assert summary["up_to_date"] and summary["written"] == 0
    assert data() == before and (tiny_shards / LOCK_NAME).read_bytes() == b""  # no holder recorded after the run


def test_same_bytes_whatever_the_worker_count(synth_source, tmp_path):
    shard(synth_source, tmp_path / "one", size=16, maxcount=25, workers=1, progress=False)
    shard(synth_source, tmp_path / "two", size=16, maxcount=25, workers=2, progress=False)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_stock_webdataset_and_tar_read_the_same_samples(tiny_shards):
    ours = _read_all(tiny_shards, "train")
    urls = sorted(str(p) for p in (tiny_shards / "train").glob("*.tar"))
    stock = {}
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node).decode()
    for sample in ds:
        stock[sample["__key__"]] = (sample["npy"], sample["json"])
    assert sorted(stock) == sorted(ours)
    for key, (pixels, meta) in stock.items():
        np.testing.assert_array_equal(pixels, ours[key][0])
        assert meta == ours[key][1]
    with tarfile.open(urls[0]) as tar:  # plain tar lists one .npy and one .json per image
        names = tar.getnames()
    assert len(names) == 2 * len({n.split(".")[0] for n in names})


def test_new_images_land_in_new_shards(synth_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    (source / "list_eval_partition.txt").unlink()  # split by key hash, so new images need no partition line
    out = tmp_path / "shards"
    shard(source, out, size=16, maxcount=25, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.tar")}
    image = Image.open(source / "img_align_celeba" / "000001.jpg")
    for key in ("900001", "900002"):
        image.save(source / "img_align_celeba" / f"{key}.jpg")
    summary = shard(source, out, size=16, maxcount=25, progress=False)
    assert summary["written"] == 2 and not summary["up_to_date"]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.tar")}
    for rel, data in before.items():
        assert after[rel] == data  # existing shards untouched
    new = set(after) - set(before)
    found = {k: rel.parts[0] for rel in new for k, _, _ in iter_samples(after[rel])}
    assert found == {k: hash_split(k) for k in ("900001", "900002")}
    assert shard(source, out, size=16, maxcount=25, progress=False)["up_to_date"]


def test_bad_inputs_are_skipped_or_converted_and_recorded(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    face = (rng.random((218, 178, 3)) * 255).astype(np.uint8)
    Image.fromarray(face).save(src / "good.jpg")
    Image.fromarray(face).convert("L").save(src / "gray.png")
    Image.fromarray(face).convert("RGBA").save(src / "rgba.png")
    Image.fromarray(face).convert("P").save(src / "palette.png")
    Image.fromarray(face).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray((face[..., 0].astype(np.uint16) * 257)).save(src / "deep.png")
    Image.fromarray(face[:10, :10]).save(src / "tiny.png")
    (src / "empty.jpg").write_bytes(b"")
    (src / "notimage.jpg").write_bytes(b"this is not an image at all")
    good = (src / "good.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (src / "sub").mkdir()
    Image.fromarray(face).save(src / "sub" / "good.png")  # duplicate key 'good'
    summary = shard(src, tmp_path / "out", size=16, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {r["key"]: r["reason"] for r in manifest["skipped"]}
    assert set(reasons) == {"tiny", "empty", "notimage", "truncated", "good"}
    assert "too small" in reasons["tiny"] and "empty" in reasons["empty"]
    assert "not a readable image" in reasons["notimage"] and "duplicate key" in reasons["good"]
    written = {k for s in manifest["splits"].values() for rec in s["shards"] for k in rec["keys"]}
    assert written == {"good", "gray", "rgba", "palette", "cmyk", "deep"}
    assert summary["written"] == 6


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_conversions_give_rgb_pixels(mode, tmp_path):
    face = np.full((200, 200, 3), 120, np.uint8)
    img = Image.fromarray(face)
    img = Image.fromarray(face[..., 0].astype(np.uint16) * 257) if mode == "I;16" else img.convert(mode)
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    img.save(path)
    out = preprocess(path.read_bytes(), 148, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.all(np.abs(out.astype(int) - 120) <= 3)


def test_image_deleted_from_the_source_stays_in_its_shard_and_is_reported(synth_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    out = tmp_path / "shards"
    shard(source, out, size=16, maxcount=25, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.tar")}
    (source / "img_align_celeba" / "000003.jpg").unlink()  # the partition file still names it
    summary = shard(source, out, size=16, maxcount=25, progress=False)
    assert summary["written"] == 0 and not summary["up_to_date"]  # the source changed, nothing to add
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["not_in_source"] == ["000003"] and manifest["partition_missing"] == ["000003"]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.tar")} == before  # shards untouched
    assert shard(source, out, size=16, maxcount=25, progress=False)["up_to_date"]


def test_corrupt_manifest_is_a_one_line_error(tmp_path, synth_source):
    from vae_runtime.errors import BadInput

    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BadInput, match="manifest.json: not valid JSON"):
        shard(synth_source, tmp_path, size=16, progress=False)


def test_image_edited_in_place_keeps_its_shard_and_is_reported(synth_source, tmp_path, capsys):
    from vae.cli import main

    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    out = tmp_path / "shards"
    shard(source, out, size=16, maxcount=25, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.tar")}
    assert json.loads((out / "manifest.json").read_text())["changed_in_source"] == []
    edited = source / "img_align_celeba" / "000005.jpg"
    size = edited.stat().st_size
    Image.open(edited).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited, quality=60)
    assert edited.stat().st_size != size
    assert main(["data", "shard", "--source", str(source), "--out", str(out), "--size", "16",
                 "--maxcount", "25", "--quiet"]) == 0
    out_err = capsys.readouterr()
    assert "written 0" in out_err.out
    assert "1 image(s) changed in the source" in out_err.err and "000005" in out_err.err
    assert json.loads((out / "manifest.json").read_text())["changed_in_source"] == ["000005"]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.tar")} == before  # shards untouched
    again = shard(source, out, size=16, maxcount=25, progress=False)  # still reported when up to date
    assert again["up_to_date"] and again["changed_in_source"] == ["000005"]
    fresh = shard(source, tmp_path / "fresh", size=16, maxcount=25, progress=False)
    assert fresh["changed_in_source"] == []


def test_shards_from_before_sizes_were_kept_learn_them_and_then_notice_edits(synth_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    out = tmp_path / "shards"
    shard(source, out, size=16, maxcount=25, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for record in split["shards"]:
            del record["source_bytes"]  # as an older version wrote it
    del manifest["changed_in_source"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert shard(source, out, size=16, maxcount=25, progress=False)["up_to_date"]  # the source is as sharded
    upgraded = json.loads((out / "manifest.json").read_text())
    record = upgraded["splits"]["train"]["shards"][0]
    assert record["source_bytes"] == [(source / "img_align_celeba" / f"{k}.jpg").stat().st_size
                                      for k in record["keys"]]
    key = record["keys"][0]
    edited = source / "img_align_celeba" / f"{key}.jpg"
    Image.open(edited).convert("RGB").rotate(90).save(edited, quality=55)
    assert shard(source, out, size=16, maxcount=25, progress=False)["changed_in_source"] == [key]


def test_a_second_file_for_a_sharded_key_is_not_taken_for_an_edit(synth_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    out = tmp_path / "shards"
    shard(source, out, size=16, maxcount=25, progress=False)
    # 000005.bmp sorts before 000005.jpg, so the listing now keeps the .bmp (another size) for the key
    Image.open(source / "img_align_celeba" / "000005.jpg").save(source / "img_align_celeba" / "000005.bmp")
    summary = shard(source, out, size=16, maxcount=25, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(r["key"] == "000005" and r["reason"].startswith("duplicate key") for r in manifest["skipped"])
    assert summary["changed_in_source"] == [] and manifest["changed_in_source"] == []


def test_an_image_fixed_after_failing_is_sharded_by_the_next_run(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    face = (np.random.default_rng(1).random((60, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(face).save(src / "good.png")
    good = (src / "good.png").read_bytes()
    (src / "broken.png").write_bytes(good[: len(good) // 2])
    (src / "blank.png").write_bytes(b"")
    first = shard(src, tmp_path / "out", size=16, progress=False)
    assert first["written"] == 1 and first["skipped"] == 2
    Image.fromarray(face[::-1]).save(src / "broken.png")  # replaced by a good image
    again = shard(src, tmp_path / "out", size=16, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert again["written"] == 1
    assert [r["key"] for r in manifest["skipped"]] == ["blank"]  # still empty: still recorded
    assert {k for s in manifest["splits"].values() for rec in s["shards"] for k in rec["keys"]} == {"good", "broken"}
    assert shard(src, tmp_path / "out", size=16, progress=False)["up_to_date"]


def test_new_shards_never_take_a_name_the_manifest_holds(synth_source, tmp_path):
    out = tmp_path / "out"
    shard(synth_source, out, size=16, maxcount=10, progress=False)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    train = manifest["splits"]["train"]
    dropped = train["shards"].pop(0)  # a record removed by hand: its images are sharded again
    train["count"] -= dropped["count"]
    manifest["source"]["fingerprint"] = None
    manifest_path.write_text(json.dumps(manifest))
    shard(synth_source, out, size=16, maxcount=10, progress=False)
    records = json.loads(manifest_path.read_text())["splits"]["train"]["shards"]
    names = [r["name"] for r in records]
    assert len(names) == len(set(names)) and dropped["name"] not in names[:-1]
    for rec in records:  # no shard was overwritten under a record that names it
        assert hashlib.sha256((out / "train" / rec["name"]).read_bytes()).hexdigest() == rec["sha256"]


def _edit(manifest, how):
    train = manifest["splits"]["train"]
    if how == "no preprocessing":
        del manifest["preprocessing"]
    elif how == "source as text":
        manifest["source"] = "somewhere"
    elif how == "no test split":
        del manifest["splits"]["test"]
    elif how == "keys shortened":
        train["shards"][0]["keys"] = train["shards"][0]["keys"][:-5]
    elif how == "count as text":
        train["count"] = "x"
    elif how == "skip without reason":
        manifest["skipped"] = [{"key": "000001"}]
    elif how == "a test shard twice":  # the counts agree: its images would be counted twice
        test = manifest["splits"]["test"]
        test["shards"].append(test["shards"][0])
        test["count"] += test["shards"][0]["count"]


@pytest.mark.parametrize("how, needle", [
    ("no preprocessing", "'preprocessing' must be a dict"), ("source as text", "'source' must be a dict"),
    ("no test split", "'splits' must hold train, valid, test"),
    ("keys shortened", "shard 'celeba-train-000000.tar': its 'keys' must list its 25 images"),
    ("count as text", "split train: count 'x'"),
    ("skip without reason", "each 'skipped' entry needs a 'key' and a 'reason'"),
    ("a test shard twice", "split test lists shard 'celeba-test-000000.tar' twice"),
])
def test_a_damaged_manifest_is_one_line_for_the_writer_and_the_readers(tiny_shards, synth_source, tmp_path, how,
                                                                       needle):
    from vae_runtime.errors import BadInput
    from pipeline.loader import train_loader

    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    _edit(manifest, how)
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.name for p in out.rglob("*"))
    for act in (lambda: shard(synth_source, out, size=16, maxcount=25, progress=False),
                lambda: train_loader(str(out), batch_size=4, seed=0)):
        with pytest.raises(BadInput) as caught:
            act()
        assert f"manifest.json: damaged manifest ({needle}" in str(caught.value)
        assert len(str(caught.value).splitlines()) == 1
    assert sorted(p.name for p in out.rglob("*")) == before


def test_skip_reasons_are_the_same_on_every_run(tmp_path):
    for run in ("a", "b"):
        src = tmp_path / run
        src.mkdir()
        (src / "notimage.jpg").write_bytes(b"plain text, not an image")
        shard(src, tmp_path / f"out-{run}", size=16, progress=False)
    a, b = ((tmp_path / f"out-{run}" / "manifest.json").read_text() for run in ("a", "b"))
    assert "0x" not in a and json.loads(a)["skipped"] == json.loads(b)["skipped"]


def test_exif_orientation_is_applied_and_16_bit_images_keep_their_scale(tmp_path):
    img = Image.new("RGB", (100, 80), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 50, 80))  # left half blue
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the blue half on top
    img.save(tmp_path / "turned.png", exif=exif)
    out = preprocess((tmp_path / "turned.png").read_bytes(), 0, 16)
    assert tuple(out[0, 8]) == (0, 0, 255) and tuple(out[-1, 8]) == (255, 0, 0)
    Image.fromarray(np.full((40, 40), 200, np.uint16)).save(tmp_path / "dark16.png")  # 200/65535: near black
    assert preprocess((tmp_path / "dark16.png").read_bytes(), 0, 16).max() == 0


def test_an_image_with_damaged_exif_keeps_its_pixels(tmp_path, monkeypatch):
    """EXIF that Pillow cannot apply (a damaged block) does not lose an image that decoded, nor stop the run."""
    import struct

    from PIL import ImageOps

    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "x.png")

    def damaged(img):
        raise struct.error("required argument is not an integer")

    monkeypatch.setattr(ImageOps, "exif_transpose", damaged)
    assert preprocess((tmp_path / "x.png").read_bytes(), 0, 16).max() == 90


def test_an_image_the_partition_moves_to_another_split_is_refused_not_left_in_train(synth_source, tmp_path, capsys):
    """Shards are never rewritten: an image moved from train to test by a changed partition file once stayed in
    train silently (a test image trained on), as did images split by hash before a partition file was added."""
    from vae.cli import main

    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    out = tmp_path / "shards"
    shard(source, out, size=16, maxcount=25, progress=False)
    manifest_before = (out / "manifest.json").read_bytes()
    partition = source / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    moved = next(i for i, line in enumerate(lines) if line.endswith(" 0"))
    key = lines[moved].split()[0].rsplit(".", 1)[0]
    lines[moved] = lines[moved][:-1] + "2"
    partition.write_text("\n".join(lines) + "\n")
    code = main(["data", "shard", "--source", str(source), "--out", str(out), "--size", "16", "--maxcount", "25"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"1 sharded images now belong to another split than they were sharded into ({key}: train -> test)" in err
    assert (out / "manifest.json").read_bytes() == manifest_before  # nothing written

    unpartitioned = tmp_path / "unpartitioned"
    shutil.copytree(synth_source, unpartitioned)
    (unpartitioned / "list_eval_partition.txt").rename(tmp_path / "partition.txt")
    shard(unpartitioned, tmp_path / "shards2", size=16, maxcount=25, progress=False)
    (tmp_path / "partition.txt").rename(unpartitioned / "list_eval_partition.txt")
    with pytest.raises(BadInput, match=r"sharded images now belong to another split"):
        shard(unpartitioned, tmp_path / "shards2", size=16, maxcount=25, progress=False)


def test_shard_names_end_at_the_last_six_digit_name_the_readers_take():
    from pipeline.manifest import LAST_SHARD, SHARD_NAME, shard_name
    from pipeline.shard import next_index

    last = shard_name("celeba", "train", LAST_SHARD)
    assert last == "celeba-train-999999.tar" and SHARD_NAME.fullmatch(last)  # the writer's last, the readers take
    assert next_index([{"name": last}]) == LAST_SHARD + 1
    with pytest.raises(BadInput, match=r"shard number 1000000 of celeba-train: past celeba-train-999999\.tar"):
        shard_name("celeba", "train", next_index([{"name": last}]))  # never a seven-digit name the readers refuse


def test_a_run_needing_a_shard_past_the_last_name_is_refused_before_any_work(tiny_shards, synth_source, tmp_path):
    src, out = tmp_path / "src", tmp_path / "shards"
    shutil.copytree(synth_source, src)
    shutil.copytree(tiny_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    last = manifest["splits"]["train"]["shards"][-1]  # as if the split had reached its last shard number
    (out / "train" / last["name"]).rename(out / "train" / "celeba-train-999999.tar")
    last["name"] = "celeba-train-999999.tar"
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(src / "img_align_celeba" / "000001.jpg", src / "img_align_celeba" / "000121.jpg")
    with open(src / "list_eval_partition.txt", "a") as f:
        f.write("000121.jpg 0\n")  # one new train image

    def written():  # the manifest and the shards
        return {p.relative_to(out): p.read_bytes() for p in [out / "manifest.json", *out.rglob("*.tar")]}

    before = written()
    with pytest.raises(BadInput) as caught:
        shard(src, out, size=16, maxcount=25, progress=False)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert f"shards {out}: the train split's 1 new images would need shard number 1000000" in message
    assert "past celeba-train-999999.tar" in message and "--maxcount" in message, message
    assert written() == before and not list(out.rglob("*.tmp"))
