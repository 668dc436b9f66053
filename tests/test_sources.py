"""Sources: the official zip layout shards byte-identically to the extracted folder (partition file beside
the zip or inside it); partition mismatches are reported in the manifest, not fatal; the shared real
CelebA sample shards with the partition's counts and identities; bad sources are one-line errors."""

import json
import shutil
import zipfile

import pytest

from vae_runtime.errors import BadInput
from conftest import SHARED_SAMPLE
from pipeline.shard import shard
from pipeline.sources import PARTITION_FILE, open_source

META_FILES = ("list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt", "dataset.json")


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
    _same_shards(out, tiny_shards)
    assert shard(zip_path, out, size=16, maxcount=25, progress=False)["up_to_date"]


def test_the_manifest_records_what_the_images_are(synth_source, tmp_path):
    """Synthetic faces say so (their dataset.json), CelebA's layout with its partition file is CelebA, any other
    folder is images of unknown terms; a damaged dataset.json is one line before any work."""
    from vae_runtime.errors import BadInput

    def data_of(source, name):
        shard(source, tmp_path / name, size=16, progress=False)
        return json.loads((tmp_path / name / "manifest.json").read_text())["data"]

    assert data_of(synth_source, "synth") == {"kind": "synthetic", "name": "vae-synthetic-faces"}
    celeba = tmp_path / "celeba"
    shutil.copytree(synth_source, celeba, ignore=shutil.ignore_patterns("dataset.json"))
    assert data_of(celeba, "celeba") == {"kind": "celeba", "name": "CelebA"}
    photos = tmp_path / "photos"
    shutil.copytree(synth_source / "img_align_celeba", photos)
    assert data_of(photos, "photos") == {"kind": "images", "name": "photos"}
    (celeba / "dataset.json").write_text('{"kind": "paintings"}')
    with pytest.raises(BadInput, match="dataset.json must be a JSON object whose 'kind' is one of"):
        shard(celeba, tmp_path / "bad", size=16, progress=False)
    assert not (tmp_path / "bad" / "manifest.json").exists()


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
    (tmp_path / "src" / PARTITION_FILE).write_text("000001.jpg 0\n000002.jpg 1\n000001.jpg 0\n000002.jpg 2\n")
    with pytest.raises(BadInput, match=f"{PARTITION_FILE} line 4: puts 000002.jpg in test, line 2 in valid"):
        open_source(tmp_path / "src").listing()
    (tmp_path / "src" / PARTITION_FILE).unlink()
    (tmp_path / "src" / "readme.txt").write_text("no images here")
    with pytest.raises(BadInput, match=r"src: holds no image files \(.jpg, "):
        open_source(tmp_path / "src").listing()


def _serve(root, ranges: bool):
    """A real HTTP server (python's http.server, in a thread) for `root`; with `ranges`, it answers byte-range
    requests (206) as object stores and web servers do. Returns (server, base URL)."""
    import functools
    import http.server
    import re
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            path = root / self.path.lstrip("/")
            if not (ranges and wanted and path.is_file()):
                return super().do_GET()
            data = path.read_bytes()
            start = int(wanted[1])
            end = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(data[start:end + 1])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    server.handle_error = lambda request, address: None  # a client that stops reading is not a failure here
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(params=[True], ids=["ranges"])
def http_root(tmp_path, request):
    root = tmp_path / "www"
    root.mkdir()
    server, url = _serve(root, ranges=request.param)
    yield root, url
    server.shutdown()
    server.server_close()


def _same_shards(out, reference):
    from_url, from_folder = _tree(out), _tree(reference)
    assert sorted(from_url) == sorted(from_folder)
    for rel in from_url:
        if rel != "manifest.json":
            assert from_url[rel] == from_folder[rel], rel  # byte-identical shards
    assert _without_source(out / "manifest.json") == _without_source(reference / "manifest.json")


def test_zip_at_an_http_url_shards_like_the_local_folder(synth_source, tiny_shards, tmp_path, http_root):
    """The official zip on a web server or object store is read in place (byte ranges), by worker processes
    too, with its partition file beside it at the same URL."""
    root, url = http_root
    _make_zip(synth_source, root / "img_align_celeba.zip", with_metadata_inside=False)
    for name in META_FILES:
        shutil.copy(synth_source / name, root / name)
    source = f"{url}/img_align_celeba.zip"
    summary = shard(source, tmp_path / "shards", size=16, maxcount=25, workers=2, progress=False)
    assert summary["written"] == 120
    _same_shards(tmp_path / "shards", tiny_shards)
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["source"]["path"] == source
    assert shard(source, tmp_path / "shards", size=16, maxcount=25, progress=False)["up_to_date"]


def test_folder_at_a_url_shards_like_the_local_folder(synth_source, tiny_shards, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"memory://celeba-{tmp_path.name}"
    for path in synth_source.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{base}/{path.relative_to(synth_source).as_posix()}", path.read_bytes())
    summary = shard(base, tmp_path / "shards", size=16, maxcount=25, progress=False)
    assert summary["written"] == 120
    _same_shards(tmp_path / "shards", tiny_shards)


@pytest.mark.parametrize("http_root", [False], ids=["no-ranges"], indirect=True)
def test_unreachable_url_sources_are_one_line_errors(synth_source, http_root):
    root, url = http_root
    with pytest.raises(BadInput, match=r"celeba\.zip: does not exist"):
        open_source(f"{url}/celeba.zip")
    _make_zip(synth_source, root / "img_align_celeba.zip", with_metadata_inside=False)
    with pytest.raises(BadInput, match="img_align_celeba.zip: cannot be read in place: the server does not "
                                       "answer byte-range requests"):
        open_source(f"{url}/img_align_celeba.zip")
    with pytest.raises(BadInput, match="nosuchscheme://bucket/celeba.zip: cannot be reached"):
        open_source("nosuchscheme://bucket/celeba.zip")


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


def test_folder_listing_skips_hidden_files_and_dangling_links(synth_source, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    images = sorted((synth_source / "img_align_celeba").iterdir())[:3]
    for path in images:
        shutil.copy(path, folder / path.name)
    shutil.copy(images[0], folder / ".hidden.jpg")
    (folder / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")  # e.g. a half-synced file
    listing = open_source(folder).listing()
    keys = sorted(e.key for split in listing.entries.values() for e in split)
    assert keys == sorted(p.stem for p in images)


def _flip_member_byte(zip_path, member):
    """Damage one member's data in place (its CRC no longer matches); the central directory stays intact."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    data = bytearray(zip_path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    data[at] ^= 0xFF
    zip_path.write_bytes(bytes(data))


def test_damaged_or_oversized_zip_members_are_skipped_and_recorded(synth_source, tmp_path, monkeypatch):
    zip_path = _make_zip(synth_source, tmp_path / "img_align_celeba.zip", with_metadata_inside=True)
    names = sorted(n for n in zipfile.ZipFile(zip_path).namelist() if n.endswith(".jpg"))
    _flip_member_byte(zip_path, names[4])
    big = max(names, key=lambda n: zipfile.ZipFile(zip_path).getinfo(n).file_size)
    # the image cap just under the largest image (VAE_MAX_IMAGE_MB is in MiB; a power-of-two fraction is exact)
    monkeypatch.setenv("VAE_MAX_IMAGE_MB", str((zipfile.ZipFile(zip_path).getinfo(big).file_size - 1) / 2**20))
    summary = shard(zip_path, tmp_path / "out", size=16, progress=False)
    reasons = {r["key"]: r["reason"] for r in json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]}
    damaged, large = names[4].split("/")[-1][:-4], big.split("/")[-1][:-4]
    assert reasons[damaged].startswith("damaged zip member: BadZipFile: Bad CRC-32")
    assert reasons[large].startswith("too large: ")
    assert summary["written"] == 120 - len({damaged, large})


def test_metadata_with_a_byte_order_mark_loses_no_image(synth_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    partition = source / PARTITION_FILE
    partition.write_bytes(b"\xef\xbb\xbf" + partition.read_bytes())  # as Windows editors save UTF-8
    summary = shard(source, tmp_path / "out", size=16, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary["written"] == 120 and manifest["skipped"] == [] and manifest["partition_missing"] == []


@pytest.mark.parametrize("name, content, needle", [
    (PARTITION_FILE, "000001.jpg 0\n".encode("utf-16"), "list_eval_partition.txt: not UTF-8 text (byte 0"),
    ("identity_CelebA.txt", b"000001.jpg 12\n000002.jpg caf\xe9\n", "identity_CelebA.txt: not UTF-8 text (byte 28"),
    ("list_attr_celeba.txt", b"1\nSmiling Young\n000001.jpg 1 x\n",
     "list_attr_celeba.txt line 3: expected an image name and 2 integer attribute values, got '000001.jpg 1 x'"),
    ("list_attr_celeba.txt", b"1\nSmiling Young\n000001.jpg 1 --1\n", "list_attr_celeba.txt line 3: expected"),
])
def test_unreadable_metadata_is_one_line_naming_the_file(synth_source, tmp_path, name, content, needle):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    (source / name).write_bytes(content)
    with pytest.raises(BadInput) as caught:
        shard(source, tmp_path / "out", size=16, progress=False)
    assert needle in str(caught.value) and len(str(caught.value).splitlines()) == 1
    assert not (tmp_path / "out" / "manifest.json").exists()
