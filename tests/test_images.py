"""Image files as model inputs (`pipeline.images`, the step `vae encode` and `vae score` share): a folder, a zip or
one file gives uint8 batches in key order, preprocessed exactly as the shards are, and every image left out is
recorded with its reason while the rest go on."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from vae_runtime.errors import BadInput
from pipeline.images import image_batches
from vae_runtime.preprocess import preprocess

CROP, SIZE = 40, 16


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """Five usable images of several shapes, a damaged one, one too small, one over the image cap, and notes."""
    root = tmp_path / "images"
    root.mkdir()
    for i, (width, height) in enumerate([(48, 40), (40, 60), (64, 64), (30, 50), (45, 45)]):
        (root / f"img{i}.png").write_bytes(_png(width, height, i))
    (root / "broken.png").write_bytes(_png(48, 48, 9)[:60])  # a PNG cut short
    (root / "small.png").write_bytes(_png(12, 12, 10))
    (root / "huge.png").write_bytes(_png(200, 200, 11))  # about 120 KB, over the cap set below
    (root / "notes.txt").write_text("not an image, not listed")
    return root


def _all(location, batch_size=2):
    skipped = []
    batches = list(image_batches(str(location), CROP, SIZE, batch_size, skipped))
    return batches, {record["key"]: record["reason"] for record in skipped}


def test_a_folder_gives_batches_in_key_order_preprocessed_as_the_shards_are(folder, monkeypatch):
    monkeypatch.setenv("VAE_MAX_IMAGE_MB", "0.05")
    batches, skipped = _all(folder)
    assert [keys for keys, _ in batches] == [["img0", "img1"], ["img2", "img3"], ["img4"]]
    for keys, pixels in batches:
        assert pixels.dtype == np.uint8 and pixels.shape == (len(keys), SIZE, SIZE, 3)
        for key, image in zip(keys, pixels):  # the sharding step's function, byte for byte
            np.testing.assert_array_equal(image, preprocess((folder / f"{key}.png").read_bytes(), CROP, SIZE))
    assert sorted(skipped) == ["broken", "huge", "small"]  # notes.txt is no image: not listed, not skipped
    assert skipped["broken"].startswith("not a readable image")
    assert skipped["small"] == "too small: 12x12, needs at least 16x16"
    assert skipped["huge"].startswith("too large: ") and "VAE_MAX_IMAGE_MB" in skipped["huge"]


def test_a_zip_and_one_file_give_the_same_pixels_as_the_folder(folder, tmp_path):
    (folder / "huge.png").unlink()
    want, want_skipped = _all(folder, batch_size=10)
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"img_align_celeba/{path.name}")
    got, got_skipped = _all(archive, batch_size=10)
    assert [keys for keys, _ in got] == [keys for keys, _ in want] and got_skipped.keys() == want_skipped.keys()
    np.testing.assert_array_equal(got[0][1], want[0][1])

    (one_keys, one_pixels), = _all(folder / "img2.png")[0]
    assert one_keys == ["img2"]
    np.testing.assert_array_equal(one_pixels[0], want[0][1][want[0][0].index("img2")])
    assert _all(folder / "broken.png") == ([], {"broken": want_skipped["broken"]})


def test_duplicate_keys_are_skipped_and_a_bad_location_is_one_line(folder, tmp_path):
    (folder / "img0.jpg").write_bytes(b"")  # keys are file stems: the first name in order is kept
    skipped = []
    keys = [key for batch, _ in image_batches(str(folder), CROP, SIZE, 10, skipped) for key in batch]
    assert keys == ["huge", "img1", "img2", "img3", "img4"]
    assert {"key": "img0", "reason": "duplicate key: img0.png (kept img0.jpg)"} in skipped
    assert {"key": "img0", "reason": "empty file"} in skipped
    with pytest.raises(BadInput, match="nowhere: does not exist"):
        _all(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match=r"empty: holds no image files \(.jpg, "):
        _all(tmp_path / "empty")
