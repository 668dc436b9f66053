"""onnxruntime sessions as every model here runs them: options, providers, and opening a graph of this project.

Session options (`session_options`): all graph optimizations, sequential execution, idle threads that sleep
(`spinning=True` to let them spin on dedicated cores), `threads` intra-op threads (default: onnxruntime's, one per
physical core). Export validates with the same options, so it checks what apps run. docs/onnx.md has what was
measured.

Providers (`providers_for`): CUDA first where onnxruntime has it and it is asked for, then the CPU. A requested
CUDA provider that fell back to the CPU is a warning, never silent. A graph whose contract version this runtime
does not know is refused when it is opened.

An app that wants another provider (TensorRT, OpenVINO, CoreML, DirectML, ...) or its own options passes
onnxruntime's own forms through `open_session`: `providers` (names, or (name, options) tuples) and `sess_options`
(an `onnxruntime.SessionOptions`). Given, they take precedence over `device` (and the CUDA options) and over
`threads` and `spinning`; a provider onnxruntime does not have here is refused in one line, and one that did not
start (onnxruntime ran the graph on the next) is a warning.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np

from vae_runtime.errors import RuntimeModelError, shown
from vae_runtime.model_folder import checked_graph_files

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

# the exception types of onnxruntime's native layer (Fail, InvalidArgument, EPFail, ...)
ONNXRUNTIME_ERRORS = tuple(error for error in vars(ort.capi.onnxruntime_pybind11_state).values()
                           if isinstance(error, type) and issubclass(error, Exception))
KNOWN_CONTRACTS = ("1",)
MAX_THREADS = 1024  # intra-op threads: more is a mistake on any machine (onnxruntime would try to start them)


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """The session options every model here runs with (export validates with the same ones).

    `spinning=False` (the default) lets idle worker threads sleep: on CPUs shared with other processes,
    spinning threads steal the cores the work needs. On cores dedicated to this model, `spinning=True` trims
    latency at batch 1 (docs/onnx.md).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # these graphs are chains: nothing to overlap
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_THREADS:
            raise RuntimeModelError(f"threads: expected an integer in [1, {MAX_THREADS}], got {threads!r}")
        options.intra_op_num_threads = int(threads)
    return options


def cuda_provider_options(version: str | None = None) -> dict[str, str]:
    """CUDA provider options for onnxruntime `version` (default: the installed one): NHWC convolutions
    (`prefer_nhwc`, built into onnxruntime-gpu since 1.20): faster convolutions on tensor cores, the same
    outputs (docs/gpu.md)."""
    found = re.match(r"(\d+)\.(\d+)", version or ort.__version__)
    return {"prefer_nhwc": "1"} if found and (int(found[1]), int(found[2])) >= (1, 20) else {}


def providers_for(device: str, device_id: int = 0, cuda_stream: int | None = None, cuda_graph: bool = False) -> list:
    """The providers asked for: CUDA first where onnxruntime has it (onnxruntime-gpu) and it is wanted, then CPU.
    On CUDA: GPU `device_id`, the app's stream `cuda_stream` (a handle) if given, and CUDA graph capture if asked.

    A provider that is available may still fail to start (no GPU, missing CUDA libraries): onnxruntime then
    runs on the next one, so what runs is the session's first provider, not this list's."""
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        options = {**cuda_provider_options(), "device_id": str(device_id)}
        if cuda_stream is not None:
            options["user_compute_stream"] = str(int(cuda_stream))
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def checked_providers(providers) -> list:
    """`providers` in onnxruntime's form (a list of names, or of (name, options) tuples; options a dict), each one
    that onnxruntime has here (`onnxruntime.get_available_providers()`); anything else is one line."""
    if isinstance(providers, (str, bytes)) or not isinstance(providers, (list, tuple)) or not providers:
        raise RuntimeModelError(f"providers: expected a non-empty list of onnxruntime provider names or (name, "
                                f"options) tuples, got {shown(providers)}")
    available = ort.get_available_providers()
    out = []
    for entry in providers:
        if isinstance(entry, str):
            name, options = entry, None
        elif isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict):
            name, options = entry
        else:
            name, options = None, None
        if not isinstance(name, str):
            raise RuntimeModelError(f"providers: {shown(entry)} is neither a provider name nor a (name, options "
                                    "dict) tuple")
        if name not in available:
            raise RuntimeModelError(f"providers: onnxruntime {ort.__version__} here has no {shown(name)} (it has "
                                    f"{', '.join(available)})")
        out.append(name if options is None else (name, {str(k): str(v) for k, v in options.items()}))
    return out


def _name(entry) -> str:
    """The provider name of an entry of a checked provider list."""
    return entry[0] if isinstance(entry, tuple) else entry


def _with_cuda_graph(providers: list) -> list:
    """`providers` (a checked list the app gave) with CUDA graph capture asked of the CUDA provider."""
    return [("CUDAExecutionProvider", {**(entry[1] if isinstance(entry, tuple) else {}), "enable_cuda_graph": "1"})
            if _name(entry) == "CUDAExecutionProvider" else entry for entry in providers]


def provider_device_id(providers, default: int = 0) -> int:
    """The GPU a checked provider list puts the CUDA provider on (its `device_id` option), else `default`."""
    for entry in providers or ():
        if isinstance(entry, tuple) and entry[0] == "CUDAExecutionProvider" and "device_id" in entry[1]:
            return int(entry[1]["device_id"])
    return default


def open_session(path: str, device: str, threads: int | None, spinning: bool, providers: list | None = None,
                 sess_options: ort.SessionOptions | None = None, cuda_graph: bool = False,
                 **cuda) -> tuple[ort.InferenceSession, dict]:
    """(session, metadata_props) of the graph file `path` on `device` (`cuda`: `providers_for`'s options), after
    checking the files it reads (`checked_graph_files`); a graph of an unknown contract version is refused.
    `providers` and `sess_options` (onnxruntime's forms) take precedence over `device` and over `threads` and
    `spinning` (see the module)."""
    if not os.path.isfile(path):
        raise RuntimeModelError(f"model {path}: file not found")
    if sess_options is not None and not isinstance(sess_options, ort.SessionOptions):
        raise RuntimeModelError(f"sess_options: expected an onnxruntime.SessionOptions, got "
                                f"{type(sess_options).__name__}")
    if providers is not None:
        providers = checked_providers(providers)
        providers = _with_cuda_graph(providers) if cuda_graph else providers
    checked_graph_files(path)  # also a bare graph: its size, and no weights read from outside its folder
    options = sess_options if sess_options is not None else session_options(threads, spinning)
    asked = providers if providers is not None else providers_for(device, cuda_graph=cuda_graph, **cuda)
    try:
        session = ort.InferenceSession(path, options, providers=asked)
    except Exception as err:
        raise RuntimeModelError(f"model {path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None
    runs = session.get_providers()[0]
    if providers is not None:
        wanted = requested = _name(providers[0])
    else:
        wanted, requested = ("CUDAExecutionProvider", "CUDA") if device == "cuda" else (runs, None)
    if runs != wanted:  # a provider that did not start: onnxruntime ran the graph on the next one
        warnings.warn(f"model {path}: {requested} was requested but onnxruntime runs it on {runs}",
                      RuntimeWarning, stacklevel=3)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    version = meta.get("contract_version")
    if version not in KNOWN_CONTRACTS:
        raise RuntimeModelError(f"model {path}: unknown contract version {version!r} "
                                f"(this runtime knows {', '.join(KNOWN_CONTRACTS)})")
    return session, meta
