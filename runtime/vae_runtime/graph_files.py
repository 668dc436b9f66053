"""The files an ONNX graph file reads besides itself: the external data of its tensors (torch-free, onnx-free).

A tensor may keep its values in another file (`TensorProto.data_location = EXTERNAL`, the file named by the
`location` entry of its `external_data`), and onnxruntime opens that file relative to the graph's folder. Such a
tensor can sit in a graph's initializers, in a node's attribute (a `Constant`), in a subgraph (the body of a
`Loop`, the branches of an `If`), in a local function or in training info, so all of them are read here.

A referenced file is part of the model: export and publishing hash it beside the graph, and the runtime checks it
like the graph before a session is created. A location that is not a plain file name beside the graph (an
absolute path, `..`, a subfolder) would let a model folder read any file on the machine: it is refused.

The graph is read with a small reader of protobuf's wire format (fields by number, from onnx.proto), so the
runtime needs neither the `onnx` package nor a copy of the graph in memory: the file is mapped and only the
messages that can hold tensors are entered; the raw weights are skipped by their length.
"""

from __future__ import annotations

import mmap
import os

from vae_runtime import limits
from vae_runtime.errors import BadInput

# message -> {field number: message it holds}, for the fields on the way to a tensor (onnx.proto's numbers)
MODEL, GRAPH, NODE, ATTRIBUTE, FUNCTION, TRAINING, SPARSE, TENSOR, ENTRY = range(9)
FIELDS = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},  # graph, training_info, functions
    TRAINING: {1: GRAPH, 2: GRAPH},  # initialization, algorithm
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},  # node, initializer, sparse_initializer
    FUNCTION: {7: NODE, 11: ATTRIBUTE},  # node, attribute_proto (default values)
    NODE: {5: ATTRIBUTE},  # attribute
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},  # t, g, tensors, graphs, ...
    SPARSE: {1: TENSOR, 2: TENSOR},  # values, indices
    TENSOR: {13: ENTRY},  # external_data: {key, value} entries
}
MAX_DEPTH = 256  # messages inside messages: far beyond any real graph's subgraph nesting


def referenced_files(graph: str | os.PathLike) -> list[str]:
    """The files the graph file `graph` keeps tensors in (sorted names, each beside the graph); [] for a graph that
    holds all its weights. The graph is refused over the `onnx` size cap, when it is not a protobuf message, or
    when a location is not a plain file name beside it (`BadInput`, one line naming the graph)."""
    graph = os.fspath(graph)
    with open(graph, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        limits.check_size(f"model {graph}", size, "onnx")
        if size == 0:
            raise BadInput(f"model {graph}: empty file (not an ONNX graph)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            with memoryview(data) as view:
                try:
                    locations = _locations(view)
                except _Malformed as err:
                    raise BadInput(f"model {graph}: not an ONNX graph (malformed protobuf at byte {err})") from None
    for location in locations:
        plain = location not in ("", ".", "..") and "\0" not in location and os.path.basename(location) == location \
            and "\\" not in location and not os.path.isabs(location)
        if not plain:
            raise BadInput(f"model {graph}: keeps weights in {location!r}, not a file beside it (an absolute path, "
                           "'..' or a subfolder is refused: a graph reads only its own folder)")
    return sorted(locations)


def check_referenced(graph: str | os.PathLike) -> list[str]:
    """`referenced_files(graph)`, each checked to exist beside the graph and to be within the `onnx_data` cap;
    what onnxruntime would open, refused in one line before it does."""
    folder = os.path.dirname(os.path.abspath(graph))
    names = referenced_files(graph)
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise BadInput(f"model {graph}: keeps weights in {name}, which is not beside it")
        limits.check_size(f"model {graph}: its weights file {name}", os.path.getsize(path), "onnx_data")
    return names


class _Malformed(Exception):
    """The byte offset where the wire format stops making sense."""


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Malformed(pos)


def _locations(data: memoryview) -> set[str]:
    """Every `location` of an `external_data` entry in the ModelProto `data`."""
    found: set[str] = set()
    stack = [(MODEL, 0, len(data), 0)]  # (message kind, start, end, depth): no recursion on crafted nesting
    while stack:
        kind, pos, end, depth = stack.pop()
        entry: dict[int, bytes] = {}
        while pos < end:
            key, pos = _varint(data, pos, end)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos, end)
            elif wire == 1 or wire == 5:
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                length, pos = _varint(data, pos, end)
                if pos + length > end:
                    raise _Malformed(pos)
                inner = FIELDS.get(kind, {}).get(number)
                if inner is not None:
                    if depth >= MAX_DEPTH:
                        raise _Malformed(pos)
                    stack.append((inner, pos, pos + length, depth + 1))
                elif kind == ENTRY and number in (1, 2):
                    entry[number] = bytes(data[pos:pos + length])
                pos += length
            else:  # groups (3, 4) are not in onnx.proto; 6 and 7 do not exist
                raise _Malformed(pos)
        if pos != end:
            raise _Malformed(end)
        if kind == ENTRY and entry.get(1) == b"location":
            try:
                found.add(entry.get(2, b"").decode("utf-8"))
            except UnicodeDecodeError:
                raise _Malformed(pos) from None
    return found
