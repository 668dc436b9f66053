"""The fast shard reader: it agrees with a plain tar walk on our shards, on shards repacked by other tools
(PAX and GNU long names, uneven member sizes, so no fixed stride), refuses mixed shapes and pickled arrays;
the loader's shuffle buffer hands out every image it holds exactly once."""

import io
import tarfile

import numpy as np
import pytest

from pipeline.loader import _ShuffleBuffer
from pipeline.records import decode_npy, encode_npy, index_shard, iter_members, read_shard


def _plain_read(data):
    """Reference: Python's tarfile, member by member."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            stem, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            out.setdefault(stem, {})[ext] = tar.extractfile(member).read()
    return out


def _tar(members, fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_reads_our_shards_like_tarfile(tiny_shards):
    for path in sorted((tiny_shards / "train").glob("*.tar")):
        data = path.read_bytes()
        keys, pixels, metas = read_shard(data)
        reference = _plain_read(data)
        assert keys == sorted(reference) and pixels.dtype == np.uint8 and pixels.shape[1:] == (16, 16, 3)
        for key, px, meta in zip(keys, pixels, metas):
            np.testing.assert_array_equal(px, decode_npy(reference[key]["npy"]))
            assert bytes(meta) == reference[key]["json"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reads_repacked_shards_with_long_names_and_uneven_members(fmt):
    rng = np.random.default_rng(0)
    folder = "some/deep/" + "x" * 120  # longer than a ustar name: PAX or GNU long-name headers
    images = {f"{i:06d}": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(7)}
    members = []
    for i, (key, px) in enumerate(images.items()):
        members.append((f"{folder}/{key}.json", b'{"n": "' + b"y" * (i * 300) + b'"}'))  # 0.5 to 4 blocks
        members.append((f"{folder}/{key}.npy", encode_npy(px)))
    data = _tar(members, fmt)
    keys, pixels, metas = read_shard(data)
    assert keys == list(images)
    for key, px, meta in zip(keys, pixels, metas):
        np.testing.assert_array_equal(px, images[key])
        assert bytes(meta).startswith(b'{"n": "')
    assert [n for n, _ in iter_members(data)] == [n for n, _ in members]


def test_refuses_mixed_shapes_and_object_arrays():
    a, b = np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="'2.npy'.*differ"):
        read_shard(_tar([("1.npy", encode_npy(a)), ("2.npy", encode_npy(b))], tarfile.USTAR_FORMAT))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        index_shard(_tar([("1.npy", pickled.getvalue())], tarfile.USTAR_FORMAT))


def test_shuffle_buffer_hands_out_each_image_once(tiny_shards):
    paths = sorted((tiny_shards / "train").glob("*.tar"))
    buffer = _ShuffleBuffer(capacity=10)  # smaller than the shards: it grows
    rng = np.random.default_rng(0)
    expected = []
    for path in paths:
        data = path.read_bytes()
        buffer.add(str(path), data, index_shard(data, meta=False))
        expected.append(read_shard(data)[1])
    expected = np.concatenate(expected)
    drawn, drawn_keys = [], []
    while len(buffer) >= 7:
        keys, batch = buffer.draw(rng, 7)
        drawn.append(batch)
        drawn_keys += keys
    drawn = np.concatenate(drawn)
    all_keys = [k for path in paths for k in read_shard(path.read_bytes())[0]]
    by_key = {k: px for path in paths for k, px in zip(*read_shard(path.read_bytes())[:2])}
    assert len(set(drawn_keys)) == len(drawn_keys) and set(drawn_keys) <= set(all_keys)
    for key, pixels in zip(drawn_keys, drawn):  # each key comes with its own pixels
        np.testing.assert_array_equal(pixels, by_key[key])
    assert len(drawn) == len(expected) - len(buffer)
    as_rows = lambda arr: sorted(arr.reshape(len(arr), -1).tobytes()[i:i + 768] for i in range(0, arr.size, 768))
    remaining = buffer.pool[buffer.occupied].reshape(-1, 16, 16, 3)
    assert as_rows(np.concatenate([drawn, remaining])) == as_rows(expected)  # nothing lost or repeated
    assert not np.array_equal(drawn[:len(drawn) // 2], expected[:len(drawn) // 2])  # and shuffled
