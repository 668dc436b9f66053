"""The shard record format: how one sample is stored in a tar and read back fast.

A sample is two tar members, `<key>.npy` (uint8 [H, W, 3], standard NumPy format, lossless) and
`<key>.json` (`image_id`, `split`, `identity`, `attrs` where known). Both are standard extensions, so `tar`
and the stock `webdataset` reader read them; neither is ever unpickled.

Reading uses a minimal tar parser over a whole shard's bytes instead of a per-sample pipeline
(`read_shard`): it walks the 512-byte headers, parses the `.npy` header once per shard (every image of a
shard has the same shape, so later headers are only compared byte for byte) and copies each payload straight
into one preallocated [N, H, W, 3] array. No per-sample Python objects, no per-sample `np.stack`: this is
what makes the loader fast (see bench/loader.py). PAX and GNU long-name headers are honoured so that shards
repacked by other tools still read.
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


MAX_NPY_HEADER = 4096  # ours are 128 bytes; a longer header is not one this project wrote


def npy_layout(data: bytes | memoryview) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, offset of the array data) of a `.npy` payload, without pickle (formats 1.0-3.0).

    Every field is checked against the payload: a header that runs past it, is not a plain dict literal,
    names an object dtype, Fortran order, a malformed shape, or an array larger or smaller than the bytes
    that follow it raises ValueError."""
    data = memoryview(data)
    if len(data) < 10 or bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    major = data[6]
    if major not in (1, 2, 3):
        raise ValueError(f".npy format version {major} is unknown")
    size_bytes = 2 if major == 1 else 4
    start = 8 + size_bytes
    header_len = int.from_bytes(data[8:start], "little")
    if header_len > MAX_NPY_HEADER or start + header_len > len(data):
        raise ValueError(f".npy header of {header_len} bytes does not fit the {len(data)}-byte payload")
    try:
        header = ast.literal_eval(bytes(data[start:start + header_len]).decode("latin1"))
        dtype = np.dtype(header["descr"])
        shape, fortran = header["shape"], header["fortran_order"]
    except Exception as err:  # literal_eval and np.dtype raise many types on crafted input
        raise ValueError(f".npy header is malformed ({type(err).__name__})") from None
    if dtype.hasobject:
        raise ValueError(".npy payload holds Python objects; refusing to unpickle")
    if fortran is not False:
        raise ValueError(".npy payload in Fortran order is not supported")
    if not (isinstance(shape, tuple) and all(type(d) is int and 0 <= d < 2**31 for d in shape)):
        raise ValueError(f".npy shape {shape!r} is not a tuple of sizes")
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if need != len(data) - start - header_len:
        raise ValueError(f".npy header declares {need} bytes of data, the payload holds "
                         f"{len(data) - start - header_len}")
    return dtype, tuple(shape), start + header_len


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    """Parse a `.npy` payload without pickle (format 1.0/2.0/3.0 headers)."""
    dtype, shape, start = npy_layout(data)
    return np.frombuffer(data, dtype=dtype, offset=start).reshape(shape)


def escape_key(key: str) -> str:
    """A key as it is written into member names: '%' and '.' percent-encoded, because tar readers (this one and
    WebDataset's) take a member's key to be its name up to the first dot. `unescape_key` reverses it."""
    return key.replace("%", "%25").replace(".", "%2E")


def unescape_key(name: str) -> str:
    return name.replace("%2E", ".").replace("%2e", ".").replace("%25", "%") if "%" in name else name


def sample_members(key: str, pixels: np.ndarray, meta: dict) -> dict[str, bytes]:
    """The members of one sample, as `webdataset.TarWriter.write` takes them."""
    return {"__key__": escape_key(key), "npy": encode_npy(pixels),
            "json": json.dumps(meta, sort_keys=True).encode()}


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").strip()
    return int(field, 8) if field else 0


def _pax_path(payload: bytes) -> str | None:
    for record in payload.decode("utf-8", "replace").split("\n"):
        if " path=" in record:
            return record.split(" path=", 1)[1]
    return None


def _walk(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(name, payload offset, payload size) of each regular file in an uncompressed tar held in memory.

    A tight loop over the 512-byte headers; PAX and GNU long names apply to the member that follows. Each
    header moves the walk forward by at least one block, and a member whose size is not a non-negative number
    or whose payload runs past the end of the bytes raises ValueError with its offset: a damaged or crafted
    tar can neither loop nor make anything read outside `data`."""
    offset = 0
    next_name = None
    end = len(data)
    while offset + BLOCK <= end:
        if data[offset] == 0:
            break
        header = data[offset:offset + BLOCK]
        try:
            size = int(header[124:135], 8)  # the usual field: 11 octal digits and a NUL
        except ValueError:
            size = _size_field(header, offset)
        body = offset + BLOCK
        if size < 0 or body + size > end:
            raise ValueError(f"tar member at offset {offset}: size {size} runs outside the {end}-byte shard")
        kind = header[156]
        offset = body + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind == 48 or kind == 0:  # b"0" or b"\0": a regular file
            if next_name is not None:
                name, next_name = next_name, None
            else:
                name = header[0:100].split(b"\0", 1)[0]
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            yield name, body, size
        elif kind == 120:  # b"x": a PAX header for the next member
            next_name = (_pax_path(data[body:body + size]) or "").encode() or next_name
        elif kind == 76:  # b"L": a GNU long name for the next member
            next_name = data[body:body + size].rstrip(b"\0")
        else:
            next_name = None


def iter_members(data: bytes) -> Iterator[tuple[str, memoryview]]:
    """(name, payload) of each regular file in an uncompressed tar held in memory."""
    view = memoryview(data)
    for name, start, size in _walk(bytes(data)):
        yield name.decode(), view[start:start + size]


class ShardIndex:
    """Where a shard's samples lie in its bytes: keys, pixel offsets, json payloads, the pixels' layout."""

    def __init__(self, keys: list[str], starts: np.ndarray, metas: list[memoryview | None],
                 dtype: np.dtype, shape: tuple[int, ...], nbytes: int):
        self.keys, self.starts, self.metas = keys, starts, metas
        self.dtype, self.shape, self.nbytes = dtype, shape, nbytes

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, data: bytes) -> np.ndarray:
        """The pixels as [N, nbytes] uint8 over `data`: a strided view (no copy) when every sample takes
        the same room in the tar (the usual case: fixed-size pixels, metadata within the same 512-byte
        blocks), else a gathered copy."""
        source = np.frombuffer(data, np.uint8)
        starts, n = self.starts, len(self.starts)
        if n == 0:
            return np.empty((0, self.nbytes), np.uint8)
        step = int(starts[1] - starts[0]) if n > 1 else self.nbytes
        if step >= self.nbytes and (n < 3 or (np.diff(starts) == step).all()):
            return np.lib.stride_tricks.as_strided(source[starts[0]:], (n, self.nbytes), (step, 1),
                                                   writeable=False)
        out = np.empty((n, self.nbytes), np.uint8)
        for i, start in enumerate(starts.tolist()):
            out[i] = source[start:start + self.nbytes]
        return out

    def pixels(self, data: bytes) -> np.ndarray:
        """A copy of all pixels, [N, *shape] (uint8 [N, H, W, 3] for our shards)."""
        return np.array(self.rows(data)).view(self.dtype).reshape(len(self), *self.shape)


def index_shard(data: bytes, meta: bool = True) -> ShardIndex:
    """Walk a shard's tar headers once (a tight loop, no per-member objects beyond the key).

    Samples without pixels are left out. All pixels of a shard must share one shape and dtype (ours do);
    a shard that mixes them raises ValueError naming the sample.
    """
    keys: list[bytes] = []
    starts: list[int] = []
    metas: list[memoryview | None] = []
    view = memoryview(data)
    layout = None  # (npy header bytes, dtype, shape, npy header length, pixel bytes) of the first image
    key = None
    has_pixels = False
    pending_meta = None
    for name, body, size in _walk(data):
        # WebDataset's key: the base name up to its first dot (the folder prefix never matters here)
        stem, _, ext = name.rpartition(b"/")[2].partition(b".")
        if stem != key:
            key, has_pixels, pending_meta = stem, False, None
        if ext == b"npy":
            if layout is None:
                try:
                    dtype, shape, skip = npy_layout(view[body:body + size])
                except ValueError as err:
                    raise ValueError(f"member {name!r} at offset {body}: {err}") from None
                if dtype != np.uint8 or len(shape) != 3 or shape[2] != 3:
                    raise ValueError(f"member {name!r} at offset {body}: pixels are {dtype} {list(shape)}, "
                                     "expected uint8 [H, W, 3]")
                layout = (data[body:body + skip], dtype, shape, skip, size - skip)
            elif size != layout[3] + layout[4] or data[body:body + layout[3]] != layout[0]:
                raise ValueError(f"member {name!r} at offset {body}: pixels differ in shape or type from the "
                                 "shard's first")
            if has_pixels:
                continue
            has_pixels = True
            keys.append(stem)
            starts.append(body + layout[3])
            metas.append(pending_meta)
        elif ext == b"json" and meta:
            if has_pixels:
                metas[-1] = view[body:body + size]
            else:
                pending_meta = view[body:body + size]
    if layout is None:
        return ShardIndex([], np.empty(0, np.int64), [], np.dtype(np.uint8), (0, 0, 3), 0)
    try:
        names = [unescape_key(k.decode()) for k in keys]
    except UnicodeDecodeError as err:
        raise ValueError(f"a member name is not UTF-8 ({err.object[:40]!r})") from None
    return ShardIndex(names, np.asarray(starts, np.int64), metas, layout[1], layout[2], layout[4])


def _size_field(header: bytes, offset: int) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 size (members over 8 GiB); 0xff starts a negative number
        return -1 if field[0] == 0xFF else int.from_bytes(field[1:], "big")
    try:
        return _octal(field)
    except ValueError:
        raise ValueError(f"tar member at offset {offset}: size field {bytes(field)!r} is not a number") from None


def read_shard(data: bytes, meta: bool = True) -> tuple[list[str], np.ndarray, list[memoryview | None]]:
    """A whole shard's (keys, uint8 pixels [N, H, W, 3], json payloads) in order, pixels in one array."""
    data = bytes(data)
    index = index_shard(data, meta)
    return index.keys, index.pixels(data), index.metas


def iter_samples(data: bytes) -> Iterator[tuple[str, np.ndarray, memoryview | None]]:
    """(key, uint8 pixels [H, W, 3], json payload) for each sample in a shard's bytes, in order."""
    keys, pixels, metas = read_shard(data)
    yield from zip(keys, pixels, metas)
