"""The shard reader against damaged and crafted tars: seeded mutations of real shards (bit flips, truncations at
every kind of boundary, negative and huge sizes, duplicated and reordered members, lying `.npy` headers). Each
must, quickly, either raise `BadInput` or give samples of the declared shape and dtype read from inside the
buffer; never hang, never read past the buffer, never raise another exception type. Checksums are a separate
layer (`verify`), tested last: it catches every payload flip."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from vae_runtime.errors import BadInput
from pipeline.loader import decode_shard, parse_meta, verify
from pipeline.manifest import ShardRef
from pipeline.records import BLOCK, _walk

MUTATIONS = 4000
SECONDS_PER_READ = 1.0


@pytest.fixture(scope="module")
def shard_bytes(tiny_shards) -> bytes:
    return next((tiny_shards / "train").glob("*.tar")).read_bytes()


def members(data: bytes) -> list[tuple[int, int, int]]:
    """(header offset, payload offset, payload size) of every member (PAX headers included)."""
    out, offset = [], 0
    while offset + BLOCK <= len(data) and data[offset] != 0:
        size = int(data[offset + 124:offset + 135], 8)
        out.append((offset, offset + BLOCK, size))
        offset += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return out


def read_or_refuse(data: bytes) -> str:
    """'refused' (BadInput), or 'read' after checking what came back; anything else propagates."""
    try:
        index = decode_shard(data, "fuzz.tar", meta=True)
        metas = [parse_meta(m, "fuzz.tar", k) for k, m in zip(index.keys, index.metas)]
    except BadInput as err:
        assert "shard fuzz.tar" in str(err) and "\n" not in str(err)
        return "refused"
    pixels, rows = index.pixels(data), index.rows(data)
    n = len(index)
    assert len(index.keys) == len(metas) == n and all(isinstance(k, str) for k in index.keys)
    if n == 0:
        return "read"
    assert pixels.dtype == np.uint8 and pixels.shape == (n, *index.shape) and len(index.shape) == 3
    assert index.shape[2] == 3 and index.nbytes == int(np.prod(index.shape))
    for i, start in enumerate(index.starts.tolist()):
        assert 0 <= start and start + index.nbytes <= len(data), "a row lies outside the shard's bytes"
        assert rows[i].tobytes() == data[start:start + index.nbytes]
    return "read"


def _set_size(data: bytearray, header: int, field: bytes) -> None:
    data[header + 124:header + 136] = field.ljust(12, b"\0")[:12]


def mutate(data: bytes, rng: random.Random) -> bytes:
    spots = members(data)
    out = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:  # bit flips anywhere
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation at a boundary: a header's start or end, a payload's end, or one byte off
        header, body, size = rng.choice(spots)
        cut = rng.choice([header, body, body + size, header + rng.randrange(BLOCK), body + size // 2])
        out = out[:max(0, cut + rng.choice([-1, 0, 1]))]
    elif kind == 2:  # a lying size field: negative, huge, base-256, garbage, or slightly off
        header, _, size = rng.choice(spots)
        field = rng.choice([b"-0000000001", b"77777777777", b"\xff" * 12, b"\x80" + b"\xff" * 11, b"zz",
                            b"%011o" % (size + rng.choice([-513, -1, 1, 512, 10**6])), b"", b" 0"])
        _set_size(out, header, field)
    elif kind == 3:  # a duplicated member (header and payload), inserted elsewhere
        header, body, size = rng.choice(spots)
        block = bytes(out[header:body + (size + BLOCK - 1) // BLOCK * BLOCK])
        at = rng.choice(spots)[0]
        out[at:at] = block
    elif kind == 4:  # two members swapped
        (h1, b1, s1), (h2, b2, s2) = sorted(rng.sample(spots, 2))
        e1, e2 = b1 + (s1 + BLOCK - 1) // BLOCK * BLOCK, b2 + (s2 + BLOCK - 1) // BLOCK * BLOCK
        out = out[:h1] + out[h2:e2] + out[e1:h2] + out[h1:e1] + out[e2:]
    elif kind == 5:  # a lying .npy header: shape, dtype, order, header length
        npys = [(b, s) for h, b, s in spots if out[b:b + 6] == b"\x93NUMPY"]
        body, size = rng.choice(npys)
        text = bytes(out[body + 10:body + 10 + 118])
        swaps = [(b"(16, 16, 3)", rng.choice([b"(17, 16, 3)", b"(16, 16, 4)", b"(1600, 16, 3)", b"(16, 16)  ",
                                              b"(-1, 16, 3)", b"(16,16,3,1)", b"[16, 16, 3]"])),
                 (b"'|u1'", rng.choice([b"'<f8'", b"'|O' ", b"'<u2'", b"'xx' ", b"'|b1'"])),
                 (b"False", rng.choice([b"True ", b"None ", b"0    "])),
                 (b"'descr'", b"'desc' ")]
        old, new = rng.choice(swaps)
        out[body + 10:body + 10 + 118] = text.replace(old, new[:len(old)].ljust(len(old)), 1)
        if rng.random() < 0.3:
            out[body + 8:body + 10] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x10\x00"])
    elif kind == 6:  # a bit flip inside one header (names, sizes, types, magic)
        header, _, _ = rng.choice(spots)
        out[header + rng.randrange(BLOCK)] ^= 1 << rng.randrange(8)
    return bytes(out)


@pytest.mark.timeout(300)
def test_mutated_shards_are_refused_or_read_within_bounds(shard_bytes):
    assert read_or_refuse(shard_bytes) == "read"
    rng = random.Random(20261129)
    outcomes = {"read": 0, "refused": 0}
    slowest = 0.0
    for _ in range(MUTATIONS):
        data = mutate(shard_bytes, rng)
        started = time.perf_counter()
        outcomes[read_or_refuse(data)] += 1
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < SECONDS_PER_READ, slowest
    assert outcomes["refused"] > MUTATIONS // 10 and outcomes["read"] > MUTATIONS // 10, outcomes


@pytest.mark.parametrize("field, message", [
    (b"-0000000001", "size -1 runs outside"), (b"77777777777", "runs outside"), (b"\xff" * 12, "size -1"),
    (b"zz", "size field b'zz"), (b"\x80" + b"\xff" * 11, "runs outside")])
def test_lying_size_fields_name_the_member_offset(shard_bytes, field, message):
    data = bytearray(shard_bytes)
    header = members(shard_bytes)[3][0]
    _set_size(data, header, field)
    with pytest.raises(BadInput, match=f"shard fuzz.tar: unreadable \\(tar member at offset {header}: .*"):
        decode_shard(bytes(data), "fuzz.tar")
    with pytest.raises(BadInput, match=message.replace("(", "\\(")):
        decode_shard(bytes(data), "fuzz.tar")


def test_a_shard_cut_inside_its_last_image_is_refused(shard_bytes):
    header, body, size = [m for m in members(shard_bytes) if shard_bytes[m[1]:m[1] + 6] == b"\x93NUMPY"][-1]
    with pytest.raises(BadInput, match=f"offset {header}: size {size} runs outside"):
        decode_shard(shard_bytes[:body + size - 7], "fuzz.tar")


def test_the_walk_always_moves_forward(shard_bytes):
    """Every header advances the walk by at least one block, whatever its size field says."""
    offsets = [body for _, body, _ in _walk(shard_bytes)]
    assert offsets == sorted(set(offsets))


def test_verification_catches_every_payload_flip(shard_bytes):
    from hashlib import sha256

    ref = ShardRef("verify.tar", 25, sha256(shard_bytes).hexdigest())
    positions = [b + i for _, b, s in members(shard_bytes) for i in range(0, s, max(1, s // 16))]
    for position in positions:  # every member, 16 places in each
        flipped = bytearray(shard_bytes)
        flipped[position] ^= 0x01
        with pytest.raises(BadInput, match="shard verify.tar: sha256 differs from the manifest's"):
            verify(ref, bytes(flipped))
    verify(ref, shard_bytes)
    assert len(positions) > 500
