"""Buffers that already live where a session runs: binding them without a copy, and CUDA graphs on them.

The runtime's `decode_on_device`, `encode_on_device` and `capture` take the app's own memory, never copied
through NumPy:

- an `onnxruntime.OrtValue` on the session's device;
- on the CUDA provider, any object with `__cuda_array_interface__` (PyTorch CUDA tensors, CuPy arrays, Numba);
- on the CPU provider, any object with `__array_interface__` (NumPy arrays).

A buffer is C-contiguous float32 of the shape the graph expects, on the session's device (CUDA device 0 unless
the model was opened with another `device_id`). Outputs are written in place into the buffer given as `out`,
or allocated by onnxruntime on the session's device and returned as an OrtValue.

Ordering: onnxruntime runs on its own CUDA stream unless the model was opened with `cuda_stream=` (the app's
stream handle, e.g. `torch.cuda.Stream().cuda_stream`; not 0, the default stream, which onnxruntime takes as no
stream): then it runs on that stream, after the app's queued work. Otherwise the app finishes writing its inputs
(synchronizes its stream) before a call. The `stream` an array's `__cuda_array_interface__` names is not waited
on: the same rule holds for it. Every call returns once its outputs are written.

`CudaGraph` replays one captured CUDA graph on fixed buffers: the app writes new inputs into the same memory
and calls `replay()`; one kernel-graph launch replaces the per-node launches. Each capture has its own graph id,
so several batch sizes can be captured on one model. onnxruntime keeps CUDA graphs per thread: a graph is
replayed on the thread that captured it.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from dataclasses import dataclass

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

from vae_runtime.errors import one_line  # noqa: E402


class DeviceBufferError(ValueError):
    """A buffer the runtime cannot bind: one line naming it and what is wrong (the runtime raises it as its
    RuntimeModelError)."""


@dataclass(frozen=True)
class Buffer:
    """What binding needs of one buffer: where it lives, its address and shape; `owner` keeps it alive."""

    device: str  # "cpu" or "cuda"
    pointer: int
    shape: tuple[int, ...]
    owner: object
    index: int | None = None  # the GPU it lives on, where the object says (DLPack's device)


def _interface(name: str, value) -> tuple[str, dict] | None:
    for attr, device in (("__cuda_array_interface__", "cuda"), ("__array_interface__", "cpu")):
        try:
            found = getattr(value, attr)
        except AttributeError:  # e.g. a CPU tensor asked for its CUDA interface
            continue
        except (RuntimeError, TypeError, KeyError, ValueError) as err:  # a tensor that requires grad, a float8 one
            raise DeviceBufferError(f"{name}: {type(value).__name__} offers no {attr} ({one_line(err)})") from None
        if isinstance(found, dict):
            return device, found
    return None


def _gpu_index(value) -> int | None:
    try:
        kind, index = value.__dlpack_device__()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    return int(index) if int(kind) == 2 else None  # 2: kDLCUDA


def describe(name: str, value, writable: bool = False) -> Buffer:
    """The buffer behind `value` (see the module), checked: float32, C-contiguous, not empty, writable when it
    receives an output."""
    if isinstance(value, ort.OrtValue):
        if value.data_type() != "tensor(float)":
            raise DeviceBufferError(f"{name}: expected float32, got {value.data_type()}")
        buffer = Buffer(value.device_name().lower(), value.data_ptr(), tuple(value.shape()), value, _gpu_index(value))
    else:
        buffer = _described(name, value, writable)
    if math.prod(buffer.shape) == 0:
        raise DeviceBufferError(f"{name}: expected a non-empty buffer, got shape {list(buffer.shape)}")
    return buffer


def _described(name: str, value, writable: bool) -> Buffer:
    found = _interface(name, value)
    if found is None:
        raise DeviceBufferError(f"{name}: expected an OrtValue or an array with __cuda_array_interface__ or "
                                f"__array_interface__, got {type(value).__name__}")
    device, face = found
    attr = "__cuda_array_interface__" if device == "cuda" else "__array_interface__"
    shape, data = face.get("shape"), face.get("data")
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DeviceBufferError(f"{name}: its {attr} gives no shape of sizes (got {shape!r})")
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], int)):
        raise DeviceBufferError(f"{name}: its {attr} gives no (address, read-only) pair as data (got "
                                f"{type(data).__name__}); the runtime binds only memory it is given the address of")
    shape, (pointer, readonly) = tuple(shape), data
    typestr, strides = face.get("typestr"), face.get("strides")
    if typestr != "<f4":
        raise DeviceBufferError(f"{name}: expected float32 (typestr '<f4'), got {typestr!r}")
    if strides is not None and tuple(strides) != _c_strides(shape, 4):
        raise DeviceBufferError(f"{name}: expected a C-contiguous buffer, got strides {tuple(strides)} for shape "
                                f"{list(shape)}")
    if writable and readonly:
        raise DeviceBufferError(f"{name}: the buffer is read-only and cannot receive an output")
    return Buffer(device, pointer, shape, value, _gpu_index(value) if device == "cuda" else None)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def session_device(session: ort.InferenceSession) -> str:
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def check(name: str, buffer: Buffer, device: str, device_id: int, shape: tuple) -> None:
    """`buffer` lives on `device` (GPU `device_id`, where the buffer says which) and has `shape` (None for any
    size of that dimension)."""
    if buffer.device != device:
        fix = "use decode/encode for NumPy arrays" if device == "cuda" else \
            "open the model with device='cuda' where onnxruntime-gpu and a GPU are present; `.provider` says what runs"
        raise DeviceBufferError(f"{name}: the buffer lives on {buffer.device} but the session runs on {device} "
                                f"({fix})")
    if device == "cuda" and buffer.index is not None and buffer.index != device_id:
        raise DeviceBufferError(f"{name}: the buffer lives on GPU {buffer.index} but the session runs on GPU "
                                f"{device_id} (open the model with device_id={buffer.index})")
    if len(buffer.shape) != len(shape) or any(w is not None and w != g for w, g in zip(shape, buffer.shape)):
        want = ["N" if d is None else d for d in shape]
        raise DeviceBufferError(f"{name}: expected shape {want}, got {list(buffer.shape)}")


def bind(binding: ort.IOBinding, name: str, buffer: Buffer, device_id: int, output: bool, label: str) -> None:
    """Bind `buffer` as graph input or output `name`; what onnxruntime refuses is one line naming `label`."""
    try:
        if isinstance(buffer.owner, ort.OrtValue):
            (binding.bind_ortvalue_output if output else binding.bind_ortvalue_input)(name, buffer.owner)
            return
        bind_fn = binding.bind_output if output else binding.bind_input
        bind_fn(name, buffer.device, device_id, "float32", list(buffer.shape), buffer.pointer)
    except (ValueError, RuntimeError) as err:  # e.g. an OrtValue scoped to another session
        raise DeviceBufferError(f"{label}: onnxruntime cannot bind it ({one_line(err)}); an OrtValue "
                                "made by a session binds to that session only: make it with "
                                "OrtValue.ortvalue_from_shape_and_type or ortvalue_from_numpy") from None


@dataclass(frozen=True)
class Signature:
    """One graph's bound input and output: their names and shapes (None: the batch, shared by both)."""

    input_name: str
    input_shape: tuple
    output_name: str
    output_shape: tuple


def prepare(session, device_id: int, sig: Signature, value, out) -> tuple[ort.IOBinding, list[Buffer]]:
    """An I/O binding of `value` (and `out`, when given) after checking both against `sig`."""
    device = session_device(session)
    source = describe(sig.input_name, value)
    check(sig.input_name, source, device, device_id, sig.input_shape)
    batch = source.shape[0]
    binding = session.io_binding()
    bind(binding, sig.input_name, source, device_id, output=False, label=sig.input_name)
    kept = [source]
    if out is None:
        binding.bind_output(sig.output_name, device, device_id)  # allocated by onnxruntime on that device
    else:
        target = describe("out", out, writable=True)
        check("out", target, device, device_id, (batch, *sig.output_shape[1:]))
        bind(binding, sig.output_name, target, device_id, output=True, label="out")
        kept.append(target)
    return binding, kept


def run_bound(session, device_id: int, sig: Signature, value, out=None, run_options=None):
    """Run once on bound buffers (with `run_options`: the caller's deadline); returns `out` (written in place) or
    the output as an OrtValue."""
    binding, _ = prepare(session, device_id, sig, value, out)
    session.run_with_iobinding(binding, run_options)
    return out if out is not None else binding.get_outputs()[0]


_graph_ids = itertools.count(1)  # ids are unique in the process; 0 is onnxruntime's own, -1 means none


class CudaGraph:
    """A CUDA graph captured on fixed buffers: write new inputs into the same memory, then `replay()`.

    Capturing runs the graph (onnxruntime warms up, then records); `replay()` launches the recorded kernels and
    returns once the output buffer is written. The buffers must stay alive and in place while the graph is used:
    the graph holds references to them. A captured graph keeps its memory for the session's life: capture once
    per batch size and replay it, never per request. onnxruntime keeps CUDA graphs per thread, so a graph
    replays on the thread that captured it; another thread captures its own.
    """

    def __init__(self, session: ort.InferenceSession, device_id: int, sig: Signature, value, out,
                 error: type[Exception] = DeviceBufferError):
        if session_device(session) != "cuda":
            raise DeviceBufferError("CUDA graphs need onnxruntime-gpu's CUDA provider (open the model with "
                                    f"device='cuda'); this session runs on {session.get_providers()[0]}")
        if out is None:
            raise DeviceBufferError("out: a CUDA graph writes into a fixed output buffer; pass one")
        self.session = session
        self.binding, self._kept = prepare(session, device_id, sig, value, out)
        self.graph_id = next(_graph_ids)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(self.graph_id))
        self.thread, self.error = threading.get_ident(), error  # `error`: what replay raises (the runtime's)
        session.run_with_iobinding(self.binding, self.run_options)  # warm-up and capture
        self.out = out

    def replay(self):
        """Run the captured graph on the buffers' current contents; returns the output buffer."""
        if threading.get_ident() != self.thread:  # onnxruntime would silently capture a second graph here
            raise self.error(f"replay: CUDA graph {self.graph_id} was captured on another thread, and "
                                    "onnxruntime keeps CUDA graphs per thread; capture one on this thread")
        self.session.run_with_iobinding(self.binding, self.run_options)
        return self.out
