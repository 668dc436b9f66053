"""The shard record format: how one sample is stored in a tar and read back fast.

A sample is two tar members, `<key>.npy` (uint8 [H, W, 3], standard NumPy format, lossless) and
`<key>.json` (`image_id`, `split`, `identity`, `attrs` where known). Both are standard extensions, so `tar`
and the stock `webdataset` reader read them; neither is ever unpickled.

Reading uses a minimal tar parser over the shard's bytes instead of a per-sample pipeline: the shards are
written by us with fixed headers, so walking 512-byte headers and slicing the `.npy` payload at a fixed
offset is what makes the loader fast (see bench/loader.py). PAX and GNU long-name headers are honoured so
that shards repacked by other tools still read.
"""

from __future__ import annotations

import ast
import io
import json
from typing import Iterator

import numpy as np

BLOCK = 512


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    """Parse a `.npy` payload without pickle (format 1.0/2.0/3.0 headers)."""
    data = memoryview(data)
    if bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    major = data[6]
    if major == 1:
        header_len = int.from_bytes(data[8:10], "little")
        start = 10
    else:
        header_len = int.from_bytes(data[8:12], "little")
        start = 12
    header = ast.literal_eval(bytes(data[start:start + header_len]).decode("latin1"))
    if header["fortran_order"]:
        raise ValueError(".npy payload in Fortran order is not supported")
    dtype = np.dtype(header["descr"])
    if dtype.hasobject:
        raise ValueError(".npy payload holds Python objects; refusing to unpickle")
    return np.frombuffer(data, dtype=dtype, offset=start + header_len).reshape(header["shape"])


def sample_members(key: str, pixels: np.ndarray, meta: dict) -> dict[str, bytes]:
    """The members of one sample, as `webdataset.TarWriter.write` takes them."""
    return {"__key__": key, "npy": encode_npy(pixels),
            "json": json.dumps(meta, sort_keys=True).encode()}


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").strip()
    return int(field, 8) if field else 0


def _pax_path(payload: bytes) -> str | None:
    for record in payload.decode("utf-8", "replace").split("\n"):
        if " path=" in record:
            return record.split(" path=", 1)[1]
    return None


def iter_members(data: bytes) -> Iterator[tuple[str, memoryview]]:
    """(name, payload) of each regular file in an uncompressed tar held in memory."""
    view = memoryview(data)
    offset = 0
    next_name = None
    end = len(data)
    while offset + BLOCK <= end:
        header = view[offset:offset + BLOCK]
        if header[0] == 0:
            break
        size = _octal(bytes(header[124:136]))
        kind = bytes(header[156:157])
        body = offset + BLOCK
        payload = view[body:body + size]
        offset = body + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind == b"x":
            next_name = _pax_path(bytes(payload)) or next_name
            continue
        if kind == b"L":
            next_name = bytes(payload).rstrip(b"\0").decode()
            continue
        if kind not in (b"0", b"\0"):
            next_name = None
            continue
        if next_name is not None:
            name, next_name = next_name, None
        else:
            name = bytes(header[0:100]).split(b"\0", 1)[0].decode()
            prefix = bytes(header[345:500]).split(b"\0", 1)[0].decode()
            if prefix and bytes(header[257:262]) == b"ustar":
                name = f"{prefix}/{name}"
        yield name, payload


def iter_samples(data: bytes) -> Iterator[tuple[str, np.ndarray, memoryview | None]]:
    """(key, uint8 pixels [H, W, 3], json payload) for each sample in a shard's bytes, in order."""
    key = None
    pixels = None
    meta = None
    for name, payload in iter_members(data):
        base = name.rsplit("/", 1)[-1]
        stem, _, ext = base.partition(".")
        if stem != key:
            if key is not None and pixels is not None:
                yield key, pixels, meta
            key, pixels, meta = stem, None, None
        if ext == "npy":
            pixels = decode_npy(payload)
        elif ext == "json":
            meta = payload
    if key is not None and pixels is not None:
        yield key, pixels, meta
