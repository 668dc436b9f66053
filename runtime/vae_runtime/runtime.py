"""The torch-free runtime for exported models: NumPy, onnxruntime and fsspec only (never import torch here).

    from vae_runtime import Champion
    champion = Champion("s3://bucket/registry")  # or a local registry path; files cached and sha256-verified
    decoder = champion.decoder()                 # or Decoder(model_folder), Decoder("decoder.onnx")
    images = decoder.sample(16, seed=0)          # float32 [16, 3, H, W] in [0, 1]
    if champion.refresh(): decoder = champion.decoder()   # one small read: True when the champion changed

A model is a registry location (its champion), a model folder (its graphs are checked against the sha256 in
`model.json`; a folder exported before hashes loads with a warning) or a bare `.onnx` file (loaded as is).
What a graph reads besides itself (external weights) is checked with it: a plain file beside it, within the size
caps (`vae_runtime.limits`: `onnx`, `onnx_data`), and hashed in the card or version record when the graph is. The sizes a
model declares (latent_dim, image_size, channels) are bounded and must match the graph's inputs and outputs and
its card before anything is sized from them. A run longer than `timeout` seconds (default `DEFAULT_TIMEOUT`) is
ended and raises `RunTimeout`.
`precision="fp16"` picks `decoder.fp16.onnx` (and `precision=P` in general `<kind>.P.onnx`), explicitly.

On a GPU the app can keep z and the images on the device: `decode_on_device(z, out=...)` binds OrtValues, CUDA
tensors or CuPy arrays in place, and `capture(z, out)` records a CUDA graph on fixed buffers for `.replay()`
(`vae_runtime.device_buffers` says how, and how streams are ordered).

The noise is drawn here with NumPy from the caller's seed, so the same seed gives the same images. The
provider that actually runs is reported (`.provider`); a requested CUDA provider that fell back to the CPU is
a warning, never silent. Models whose contract version is unknown are refused. `decoder.fp16.onnx` (float16
weights, float32 interface) loads the same way; use it on a GPU.

Session options (`session_options`): all graph optimizations, sequential execution, idle threads that sleep
(`spinning=True` to let them spin on dedicated cores), `threads` intra-op threads (default: onnxruntime's, one per
physical core). docs/onnx.md has what was measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from vae_runtime import schemas, storage
from vae_runtime.atomic import atomic_write_bytes
from vae_runtime.digest import sha256_file
from vae_runtime.errors import BadInput, one_line
from vae_runtime.limits import OverCap
from vae_runtime import device_buffers as buffers
from vae_runtime import graph_files
from vae_runtime.watchdog import deadline
from vae_runtime import registry as reg

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

# the exception types of onnxruntime's native layer (Fail, InvalidArgument, EPFail, ...)
ONNXRUNTIME_ERRORS = tuple(error for error in vars(ort.capi.onnxruntime_pybind11_state).values()
                           if isinstance(error, type) and issubclass(error, Exception))

__all__ = ["Champion", "Decoder", "Encoder", "KNOWN_CONTRACTS", "RunTimeout", "RuntimeModelError",
           "cuda_provider_options", "default_cache_dir", "graph_name", "interpolate", "providers_for", "resolve_model",
           "session_options", "verified_graph"]

KNOWN_CONTRACTS = ("1",)


MAX_THREADS = 1024  # intra-op threads: more is a mistake on any machine (onnxruntime would try to start them)
LEGACY_STREAM = 1  # cudaStreamLegacy: CUDA's legacy default stream, as a handle
# Bounds on what a model declares, checked before anything is sized from it: far beyond this project's models
# (latent_dim 128-512, 64x64 RGB images), far below what would exhaust a machine's memory.
MAX_LATENT_DIM = 1 << 16
MAX_IMAGE_SIZE = 4096
MAX_CHANNELS = 4
MAX_BATCH = 65536  # latents or images in one call: the largest batch export declares its graphs for
BATCH_BYTES = 1 << 30  # `sample` decodes fewer than batch_size at once where one batch (draws, images) passes this
DEFAULT_TIMEOUT = 600.0  # seconds one run may take: minutes of headroom for a batch of 256 large images on a CPU
MAX_TIMEOUT = 7 * 86400.0


class RuntimeModelError(ValueError):
    """The model file or the input given to it is not usable; the message names which."""


class RunTimeout(RuntimeModelError):
    """A run passed its timeout and was ended: a graph that runs too long, or a machine too slow for it."""


def graph_name(kind: str, precision: str | None = None) -> str:
    """`decoder.onnx`, or `decoder.<precision>.onnx` for a reduced-precision graph (`fp16`, ...)."""
    if precision in (None, "float32", "fp32"):
        return f"{kind}.onnx"
    if not re.fullmatch(r"[a-z0-9]+", str(precision)):
        raise RuntimeModelError(f"precision {precision!r}: expected a name such as 'fp16'")
    return f"{kind}.{precision}.onnx"


def verified_graph(folder: str | os.PathLike, name: str) -> str:
    """`folder/name`, checked against the sha256 that the folder's `model.json` lists for it.

    The folder is resolved once (an export's `--out` is a link switched whole), so the graph and the card come
    from one export. A folder whose card lists no hashes (exported before they existed) loads with a warning."""
    given, folder = folder, os.path.realpath(folder)
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        held = sorted(n for n in os.listdir(folder) if n.endswith(".onnx")) if os.path.isdir(folder) else []
        precision = name.split(".")[1] if name.count(".") == 2 else None
        hint = f"; export it with `vae export --precision {precision}`" if precision else ""
        raise RuntimeModelError(f"model folder {given}: no {name} (it holds {', '.join(held) or 'no graphs'}){hint}")
    try:
        card = json.loads(storage.read_capped(os.path.join(folder, "model.json"), "json"))
    except FileNotFoundError:
        raise RuntimeModelError(f"model folder {folder}: no model.json (pass the .onnx file itself to load "
                                "a graph without its card)") from None
    except OverCap:
        raise
    except ValueError as err:
        raise RuntimeModelError(f"model folder {folder}: model.json is not valid JSON ({err})") from None
    except RecursionError:  # the parser's depth limit: no card nests past a few levels
        raise RuntimeModelError(f"model folder {folder}: model.json is not a model card (nested too deeply)") from None
    if not isinstance(card, dict):
        raise RuntimeModelError(f"model folder {folder}: model.json is not a model card (a JSON object)")
    hashes = card.get("sha256")
    if "sha256" in card and not (isinstance(hashes, dict) and hashes
                                 and all(isinstance(v, str) for v in hashes.values())):
        raise RuntimeModelError(f"model folder {folder}: model.json's sha256 is not a mapping of graph names to "
                                f"digests (damaged card)")
    schemas.check(card, schemas.MODEL_CARD, f"model folder {folder}: model.json", "a model card", RuntimeModelError)
    if not hashes:
        warnings.warn(f"model folder {folder}: model.json lists no sha256 (an older export); {name} is not "
                      "verified", RuntimeWarning, stacklevel=3)
        return path
    if name not in hashes:
        raise RuntimeModelError(f"model folder {folder}: model.json lists no sha256 for {name}")
    referenced = checked_graph_files(path)  # size caps first: nothing over them is hashed
    if sha256_file(path) != hashes[name]:
        raise RuntimeModelError(f"model {path}: sha256 differs from model.json's (damaged or replaced file)")
    # A card written before external weights were hashed lists its graphs alone: export writes graphs that hold
    # all their weights, so such a card still loads; a graph that reads a file the card does not hash is refused.
    for data in referenced:
        if data not in hashes:
            raise RuntimeModelError(f"model folder {folder}: {name} keeps weights in {data}, for which model.json "
                                    "lists no sha256")
        if sha256_file(os.path.join(folder, data)) != hashes[data]:
            raise RuntimeModelError(f"model {os.path.join(folder, data)}: sha256 differs from model.json's (damaged "
                                    f"or replaced weights of {name})")
    return path


def checked_graph_files(path: str, present: bool = True) -> list[str]:
    """The files the graph `path` keeps weights in (ONNX external data, `vae_runtime.graph_files`): plain names
    beside it, the graph within its size cap (`onnx`) and, with `present`, each file there and within its own
    (`onnx_data`)."""
    try:
        return graph_files.check_referenced(path) if present else graph_files.referenced_files(path)
    except OverCap:
        raise
    except BadInput as err:
        raise RuntimeModelError(str(err)) from None


def resolve_model(model, kind: str, precision: str | None = None) -> tuple[str, str | None]:
    """(local path of the graph to load, champion version or None) for a model given as a `Champion`, a
    registry location (local path or URL), a model folder, or an `.onnx` file."""
    return _resolve(model, kind, precision)[:2]


def _resolve(model, kind: str, precision: str | None) -> tuple[str, str | None, str | None]:
    """`resolve_model`, and the local path of the model card (`model.json`) that came with the graph, verified
    like it: None for a bare graph file or a champion published without one."""
    if isinstance(model, Champion):
        return model.graph(kind, precision), model.version, model.card_file()
    location = os.fspath(model)
    if "://" in location or os.path.isdir(os.path.join(location, reg.PROJECT)):  # Champion: "no champion yet"
        champion = Champion(location)
        return champion.graph(kind, precision), champion.version, champion.card_file()
    if os.path.isdir(location):
        path = verified_graph(location, graph_name(kind, precision))
        return path, None, os.path.join(os.path.dirname(path), "model.json")  # the card of that same export
    name = graph_name(kind, precision)
    if name != f"{kind}.onnx" and os.path.basename(location) != name:
        raise RuntimeModelError(f"model {location}: precision {precision!r} picks {name} from a model folder or "
                                "registry; this is one graph file, loaded as it is")
    return location, None, None


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


def _session(path: str, device: str, threads: int | None, spinning: bool,
             **cuda) -> tuple[ort.InferenceSession, dict]:
    if not os.path.isfile(path):
        raise RuntimeModelError(f"model {path}: file not found")
    checked_graph_files(path)  # also a bare graph: its size, and no weights read from outside its folder
    options = session_options(threads, spinning)
    try:
        session = ort.InferenceSession(path, options, providers=providers_for(device, **cuda))
    except Exception as err:
        raise RuntimeModelError(f"model {path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        warnings.warn(f"model {path}: CUDA was requested but onnxruntime runs it on "
                      f"{session.get_providers()[0]}", RuntimeWarning, stacklevel=3)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    version = meta.get("contract_version")
    if version not in KNOWN_CONTRACTS:
        raise RuntimeModelError(f"model {path}: unknown contract version {version!r} "
                                f"(this runtime knows {', '.join(KNOWN_CONTRACTS)})")
    return session, meta


class _Model:
    KIND = ""
    EXTRA_OUTPUTS: tuple[str, ...] = ()  # outputs besides the bound one, shaped like it
    SIGNATURE: buffers.Signature  # the input and output bound by the *_on_device calls and `capture`

    def __init__(self, model, device: str = "cpu", threads: int | None = None, *, spinning: bool = False,
                 precision: str | None = None, device_id: int = 0, cuda_stream: int | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT):
        """`model`: a `Champion`, a registry location, a model folder or an `.onnx` file (see the module).
        `device_id` and `cuda_stream` (a stream handle of the app's) apply on the CUDA provider. A run (one
        decode or encode call, one batch of `sample`) that lasts longer than `timeout` seconds is ended and raises
        `RunTimeout` (None: no limit); onnxruntime ends it between two nodes, so one node's work is not cut short."""
        if device not in ("cpu", "cuda"):
            raise RuntimeModelError(f"device {device!r}: expected 'cpu' or 'cuda'")
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise RuntimeModelError(f"device_id: expected an integer >= 0, got {device_id!r}")
        if cuda_stream is not None and (isinstance(cuda_stream, bool) or not isinstance(cuda_stream, int)
                                        or cuda_stream < 0):
            raise RuntimeModelError(f"cuda_stream: expected a stream handle (an integer >= 0), got {cuda_stream!r}")
        if cuda_stream == 0:  # onnxruntime reads a null stream as none and runs on its own, unordered with the app's
            raise RuntimeModelError("cuda_stream: 0 is the default stream, which onnxruntime takes as no stream "
                                    "(it would run on its own, unordered with your work); pass a stream of your own "
                                    "(torch.cuda.Stream().cuda_stream), or none and synchronize before each call")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer,
                                                                                           np.floating))
                                    or not 0 < timeout <= MAX_TIMEOUT):
            raise RuntimeModelError(f"timeout: expected seconds in (0, {MAX_TIMEOUT:g}] or None, got {timeout!r}")
        self.timeout = None if timeout is None else float(timeout)
        self.path, self.champion_version, card = _resolve(model, self.KIND, precision)
        self._open = dict(device=device, threads=threads, spinning=spinning, device_id=device_id,
                          cuda_stream=cuda_stream)
        self.session, self.metadata = _session(self.path, **self._open)
        self._graph_session = None  # a second session with CUDA graph capture, opened by the first `capture`
        self.provider = self.session.get_providers()[0]
        try:
            self.latent_dim = int(self.metadata["latent_dim"])
            self.image_size = int(self.metadata["image_size"])
            self.channels = int(self.metadata["channels"])
        except (KeyError, ValueError) as err:
            raise RuntimeModelError(f"model {self.path}: metadata_props lack or garble {err} (not an export of "
                                    "this project)") from None
        for key, top in (("latent_dim", MAX_LATENT_DIM), ("image_size", MAX_IMAGE_SIZE), ("channels", MAX_CHANNELS)):
            if not 1 <= getattr(self, key) <= top:  # before anything is sized from it
                raise RuntimeModelError(f"model {self.path}: its metadata declares {key} {getattr(self, key)}, "
                                        f"outside [1, {top}]")
        self.signature = self._signature()  # the bound input and output, checked against the graph
        self._check_interface()
        self._check_card(card)
        self.version = self.metadata.get("version")  # the model version the graph was exported as
        # the prior temperature the model's evaluation found best (graphs from before it record none: 1)
        self.temperature = _recorded_temperature(self.metadata.get("temperature"))

    def _check_interface(self) -> None:
        """The graph's input and output shapes against its metadata: a graph and card that disagree are refused
        here rather than failing inside onnxruntime later."""
        def dims(arg):
            return [d if isinstance(d, int) else None for d in arg.shape]

        sig = self.signature
        found = {"input": {arg.name: (dims(arg), arg.type) for arg in self.session.get_inputs()},
                 "output": {arg.name: (dims(arg), arg.type) for arg in self.session.get_outputs()}}
        wanted = [("input", sig.input_name, list(sig.input_shape)), ("output", sig.output_name, list(sig.output_shape))]
        wanted += [("output", name, list(sig.output_shape)) for name in self.EXTRA_OUTPUTS]
        for side, name, want in wanted:
            shape, kind = found[side].get(name, (None, None))
            if shape != want or kind != "tensor(float)":
                got = f"{shape} {kind}" if kind else "missing"
                raise RuntimeModelError(f"model {self.path}: {side} {name} is {got}, its metadata says {want} "
                                        f"float32 (graph and metadata disagree, or not a {self.KIND})")

    def _check_card(self, card: str | None) -> None:
        """The sizes the model card `card` declares against the graph's (its inputs and outputs, checked above):
        a card that says otherwise is refused, so no size is ever taken from a declaration the graph disagrees with."""
        if card is None:
            return
        try:
            declared = json.loads(storage.read_capped(card, "json"))
        except OverCap:
            raise
        except (OSError, ValueError) as err:
            raise RuntimeModelError(f"model card {card}: cannot be read ({one_line(err)})") from None
        if not isinstance(declared, dict):
            raise RuntimeModelError(f"model card {card}: not a model card (a JSON object)")
        for key in ("latent_dim", "image_size", "channels"):
            value, actual = declared.get(key), getattr(self, key)
            if key in declared and (type(value) is not int or value != actual):
                raise RuntimeModelError(f"model folder {os.path.dirname(card)}: model.json declares {key} "
                                        f"{value!r:.40}, its graph {os.path.basename(self.path)} has {actual} "
                                        "(the card and the graph disagree)")

    def _run(self, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        """session.run under the timeout, its failures one line."""
        with deadline(self.timeout) as options:
            try:
                return self.session.run(outputs, feeds, options)
            except ONNXRUNTIME_ERRORS as err:
                if options.terminate:
                    raise self._timed_out() from None
                raise RuntimeModelError(f"model {self.path}: onnxruntime failed ({str(err).splitlines()[0]})") \
                    from None

    def _timed_out(self) -> RunTimeout:
        return RunTimeout(f"model {self.path}: a run took longer than the {self.timeout:g} s timeout and was ended "
                          "(a graph that runs too long, or a batch too big for this machine: raise the timeout)")

    def _signature(self) -> buffers.Signature:
        """SIGNATURE with this model's sizes in place of their names."""
        sizes = {"latent": self.latent_dim, "channels": self.channels, "size": self.image_size}
        sig = self.SIGNATURE
        return buffers.Signature(sig.input_name, tuple(sizes.get(d, d) for d in sig.input_shape), sig.output_name,
                                 tuple(sizes.get(d, d) for d in sig.output_shape))

    def on_device(self, value, out=None):
        """Run on a buffer that already lives where the session runs (see `vae_runtime.device_buffers`): an
        OrtValue, or an array with `__cuda_array_interface__` (CUDA provider) or `__array_interface__` (CPU).
        The output is written into `out` when given (and `out` returned), else returned as an OrtValue on the
        session's device. No copy through the host on either side (onnxruntime I/O binding)."""
        with deadline(self.timeout) as options:
            try:
                return buffers.run_bound(self.session, self._open["device_id"], self.signature, value, out, options)
            except buffers.DeviceBufferError as err:
                raise RuntimeModelError(str(err)) from None
            except ONNXRUNTIME_ERRORS as err:
                if options.terminate:
                    raise self._timed_out() from None
                raise RuntimeModelError(f"model {self.path}: onnxruntime failed on the bound buffers "
                                        f"({str(err).splitlines()[0]})") from None

    def capture(self, value, out) -> buffers.CudaGraph:
        """A CUDA graph of this model on fixed buffers `value` and `out` (batch = their first dimension): write
        new inputs into `value`'s memory, then `.replay()`; `out` then holds the outputs. CUDA provider only;
        capture once per batch size (each graph keeps its memory), on onnxruntime's stream or one of the app's
        own (`cuda_stream`), not the legacy default stream (handle 1), where CUDA cannot capture. The graph
        replays on the thread that captured it (onnxruntime keeps CUDA graphs per thread)."""
        if self._open["cuda_stream"] == LEGACY_STREAM:
            raise RuntimeModelError("cuda_stream: 1 is CUDA's legacy default stream, where CUDA graphs cannot be "
                                    "captured; pass a stream of your own (torch.cuda.Stream().cuda_stream)")
        try:
            if self._graph_session is None and self.provider == "CUDAExecutionProvider":
                self._graph_session, _ = _session(self.path, **self._open, cuda_graph=True)
            session = self._graph_session or self.session
            return buffers.CudaGraph(session, self._open["device_id"], self.signature, value, out,
                                     error=RuntimeModelError)
        except buffers.DeviceBufferError as err:
            raise RuntimeModelError(str(err)) from None
        except ONNXRUNTIME_ERRORS as err:  # e.g. a node the CUDA provider cannot take
            raise RuntimeModelError(f"model {self.path}: onnxruntime cannot capture it as a CUDA graph "
                                    f"({str(err).splitlines()[0]})") from None

    def card(self) -> dict:
        """The metadata as Python values (JSON-decoded where they are JSON)."""
        out = {}
        for key, value in self.metadata.items():
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        return out


def _recorded_temperature(value) -> float:
    """A graph's recorded sampling temperature: a finite number in (0, 100], else 1 (none recorded, or garbled)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 1.0
    return value if np.isfinite(value) and 0 < value <= 100 else 1.0


class Decoder(_Model):
    """`decoder.onnx`: latents [N, latent_dim] -> images float32 [N, 3, H, W] in [0, 1]."""

    KIND = "decoder"
    SIGNATURE = buffers.Signature("z", (None, "latent"), "x_mean", (None, "channels", "size", "size"))

    def decode(self, z: np.ndarray) -> np.ndarray:
        try:
            z = np.asarray(z)
        except ValueError as err:  # e.g. rows of different lengths
            raise RuntimeModelError(f"z: not an array of latents ({err})") from None
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise RuntimeModelError(f"z: expected shape [N, {self.latent_dim}], got {list(z.shape)}")
        if z.shape[0] == 0:
            raise RuntimeModelError("z: expected at least one latent, got N = 0")
        if z.shape[0] > MAX_BATCH:
            raise RuntimeModelError(f"z: {z.shape[0]} latents in one call, over {MAX_BATCH}; decode in parts")
        if not np.issubdtype(z.dtype, np.floating):
            raise RuntimeModelError(f"z: expected floating point values, got {z.dtype}")
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below
            z = np.ascontiguousarray(z, dtype=np.float32)
        if not np.all(np.isfinite(z)):
            raise RuntimeModelError("z: contains NaN or infinite values (or values beyond float32's range)")
        return self._run(["x_mean"], {"z": z})[0]

    def decode_on_device(self, z, out=None):
        """Decode latents [N, latent_dim] that already live where the session runs (an OrtValue, e.g.
        `ort.OrtValue.ortvalue_from_numpy(z, "cuda", 0)`, or a CUDA tensor / CuPy array): the images
        [N, 3, H, W] go into `out` (same kinds) or come back as an OrtValue on that device (see `on_device`)."""
        return self.on_device(z, out)

    def sample(self, n: int, seed: int = 0, temperature: float | None = None, batch_size: int = 256) -> np.ndarray:
        """n images from the prior; z ~ N(0, temperature^2 I) drawn with NumPy from `seed`, decoded `batch_size`
        at a time, fewer where one batch would pass `BATCH_BYTES` (the draws are the same as one draw of all n).
        Without a temperature, the one the model records (`self.temperature`: the best its evaluation found by the
        primary sample figure, else 1)."""
        temperature = self.temperature if temperature is None else temperature
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise RuntimeModelError(f"n: expected an integer >= 1, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise RuntimeModelError(f"seed: expected an integer >= 0, got {seed!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating))
                or not np.isfinite(temperature) or temperature <= 0):
            raise RuntimeModelError(f"temperature: expected a finite number > 0, got {temperature!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or not 1 <= batch_size <= MAX_BATCH:
            raise RuntimeModelError(f"batch_size: expected an integer >= 1 and <= {MAX_BATCH}, got {batch_size!r}")
        per_image = 8 * self.latent_dim + 4 * self.channels * self.image_size ** 2  # its float64 draw and its pixels
        batch_size = max(1, min(int(batch_size), BATCH_BYTES // per_image))
        rng = np.random.default_rng(seed)
        out = output_array("n", (n, self.channels, self.image_size, self.image_size))
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            z = rng.standard_normal((size, self.latent_dim)) * temperature
            out[start:start + size] = self.decode(z.astype(np.float32))
        return out


class Encoder(_Model):
    """`encoder.onnx`: images -> (mu, logvar) of q(z|x), each [N, latent_dim]."""

    KIND = "encoder"
    EXTRA_OUTPUTS = ("logvar",)
    SIGNATURE = buffers.Signature("x", (None, "channels", "size", "size"), "mu", (None, "latent"))

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images: uint8 [N, H, W, 3] (0..255) or float [N, 3, H, W] in [0, 1]; returns (mu, logvar)."""
        x = self.to_input(images)
        mu, logvar = self._run(["mu", "logvar"], {"x": x})
        return mu, logvar

    def encode_on_device(self, x, out=None):
        """`mu` [N, latent_dim] of images (float32 [N, 3, H, W] in [0, 1]) that already live where the session
        runs, into `out` or as an OrtValue on that device (see `Decoder.decode_on_device`)."""
        return self.on_device(x, out)

    def to_input(self, images: np.ndarray) -> np.ndarray:
        """Validate images and convert them to the graph's input: float32 [N, 3, H, W] in [0, 1]."""
        images = np.asarray(images)
        s, c = self.image_size, self.channels
        if images.ndim and images.shape[0] > MAX_BATCH:  # before the conversion copies them
            raise RuntimeModelError(f"images: {images.shape[0]} in one call, over {MAX_BATCH}; encode in parts")
        if images.dtype == np.uint8:
            if images.ndim != 4 or images.shape[1:] != (s, s, c):
                hint = " (it looks like CHW: uint8 must be HWC)" if images.shape[1:] == (c, s, s) else ""
                raise RuntimeModelError(f"images: uint8 input must be [N, {s}, {s}, {c}] (HWC), "
                                        f"got {list(images.shape)}{hint}")
            x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        elif np.issubdtype(images.dtype, np.floating):
            if images.ndim != 4 or images.shape[1:] != (c, s, s):
                hint = " (it looks like HWC: float must be CHW)" if images.shape[1:] == (s, s, c) else ""
                raise RuntimeModelError(f"images: float input must be [N, {c}, {s}, {s}] (CHW), "
                                        f"got {list(images.shape)}{hint}")
            if not np.all(np.isfinite(images)):
                raise RuntimeModelError("images: float input contains NaN or infinite values")
            low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
            if low < 0.0 or high > 1.0:
                hint = " (0..255 values? divide by 255, or pass uint8 HWC)" if high > 1.0 else ""
                raise RuntimeModelError(f"images: float input must lie in [0, 1], got [{low:g}, {high:g}]{hint}")
            x = images.astype(np.float32, copy=False)
        else:
            raise RuntimeModelError(f"images: expected uint8 HWC or float CHW, got dtype {images.dtype}")
        if x.shape[0] == 0:
            raise RuntimeModelError("images: expected at least one image, got N = 0")
        return np.ascontiguousarray(x)


def interpolate(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """Latents on the straight line from a to b, endpoints included: [steps, latent_dim].

    a and b are single codes, [latent_dim] (or [1, latent_dim], e.g. one row of `Encoder.encode`'s mu).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise RuntimeModelError(f"steps: expected an integer >= 2, got {steps!r}")
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    a = a[0] if a.ndim == 2 and a.shape[0] == 1 else a
    b = b[0] if b.ndim == 2 and b.shape[0] == 1 else b
    if a.ndim != 1 or a.shape != b.shape:
        raise RuntimeModelError(f"a, b: expected two codes of the same shape [latent_dim], got "
                                f"{list(a.shape)} and {list(b.shape)}")
    out = output_array("steps", (steps, a.shape[0]))
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    np.multiply(t, (b - a)[None], out=out)  # in place: no temporaries the size of the result
    out += a[None]
    out[-1] = b  # the endpoint exactly
    return out


def output_array(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """An empty float32 result of `shape`, refused in one line (naming the argument `name` that sized it) when it
    is larger than this machine's memory or cannot be allocated."""
    shape = tuple(int(d) for d in shape)
    nbytes = 4 * int(np.prod(shape, dtype=object))
    physical = _physical_memory()
    if physical is not None and nbytes > physical:
        raise RuntimeModelError(f"{name}: {shape[0]} would need {nbytes / 2**30:.1f} GiB, more than this machine's "
                                f"{physical / 2**30:.1f} GiB of memory; ask in parts")
    try:
        return np.empty(shape, np.float32)
    except (MemoryError, ValueError) as err:
        raise RuntimeModelError(f"{name}: {shape[0]} would need {nbytes / 2**30:.1f} GiB, which cannot be "
                                f"allocated ({type(err).__name__}); ask in parts") from None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        return None


def default_cache_dir() -> str:
    """Where remote champions are cached: `$VAE_RUNTIME_CACHE`, else `~/.cache/vae-runtime`."""
    return os.environ.get("VAE_RUNTIME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vae-runtime")


class Champion:
    """The promoted version of a registry (a local path or an fsspec URL such as s3://bucket/registry).

    `champion.json` names the version relative to the registry; its `version.json` lists every file's sha256
    and is itself pinned by the champion record. Graphs of a remote registry are downloaded once into
    `cache_dir` (versions are immutable, so a cached file never goes stale) and every graph is verified against
    the record before it loads. `refresh()` re-reads only `champion.json`.
    """

    def __init__(self, registry: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.registry = os.fspath(registry)
        self.remote = "://" in self.registry and not self.registry.startswith("file://")
        key = hashlib.sha256(self.registry.rstrip("/").encode()).hexdigest()[:16]
        self.cache = Path(cache_dir or default_cache_dir()) / key
        self.record: dict = {}
        self.files: dict[str, str] = {}
        self._load(self._read_record())

    @property
    def version(self) -> str:
        return self.record["version"]

    def _read_record(self) -> dict:
        try:
            record = reg.read_champion(self.registry)
        except Exception as err:  # noqa: BLE001 - any store's client error (HTTP status, S3 endpoint, timeout)
            raise RuntimeModelError(f"registry {self.registry}: cannot read the champion ({one_line(err)})") from None
        if record is None:
            raise RuntimeModelError(f"registry {self.registry}: no champion yet "
                                    f"({reg.PROJECT}/{reg.CHAMPION} not found)")
        return record

    def _load(self, record: dict) -> None:
        version = record["version"]
        pinned = record.get("record_sha256")
        try:
            parsed, raw = reg.read_version_record_bytes(self.registry, version)
        except Exception as err:  # noqa: BLE001 - a damaged record, or any store's client error
            raise RuntimeModelError(f"registry {self.registry}: cannot read the record of champion {version} "
                                    f"({one_line(err)})") from None
        if parsed is None:
            if pinned is not None:
                raise RuntimeModelError(f"registry {self.registry}: champion {version} has no "
                                        f"{reg.VERSION_RECORD} (not published whole, or removed)")
            warnings.warn(f"registry {self.registry}: champion {version} is from a registry without version "
                          "records; its files are not verified", RuntimeWarning, stacklevel=3)
            self.record, self.files = record, None
            return
        if pinned is None:
            warnings.warn(f"registry {self.registry}: champion record of {version} pins no version record (an "
                          "older registry)", RuntimeWarning, stacklevel=3)
        elif hashlib.sha256(raw).hexdigest() != pinned:
            raise RuntimeModelError(f"registry {self.registry}: {reg.VERSION_RECORD} of {version} differs "
                                    "from the one the champion record pins")
        self.record, self.files = record, parsed["files"]

    def graph(self, kind: str, precision: str | None = None) -> str:
        """A local, sha256-verified copy (or the registry's own file) of one graph of the champion."""
        name = graph_name(kind, precision)
        if self.files is not None and name not in self.files:
            raise RuntimeModelError(f"registry {self.registry}: champion {self.version} has no {name} "
                                    f"(it holds {', '.join(sorted(self.files))})")
        path = self.file(name, cap="onnx")
        # The files it keeps weights in are verified like it and kept beside it, where onnxruntime reads them. A
        # version record from before they were hashed lists its graphs alone, and those graphs hold all their
        # weights, so it loads as before; a graph that reads a file its record does not list is refused.
        for data in checked_graph_files(path, present=False):
            if self.files is not None and data not in self.files:
                raise RuntimeModelError(f"registry {self.registry}: champion {self.version}'s {name} keeps weights "
                                        f"in {data}, which its version record does not list")
            self.file(data, cap="onnx_data")
        return path

    def card_file(self) -> str | None:
        """A local, verified copy of the champion's `model.json`; None where its version record lists none."""
        if self.files is None or "model.json" not in self.files:
            return None
        return self.file("model.json", cap="json")

    def file(self, name: str, cap: str | None = None) -> str:
        """A local copy of one file of the champion, verified against its version record (when it has one); a
        remote one read under the size cap `cap` of `vae_runtime.limits` when given."""
        try:
            reg.plain_name("file", name, f"registry {self.registry}")
        except reg.RegistryError as err:
            raise RuntimeModelError(str(err)) from None
        want = self.files.get(name) if self.files is not None else None
        if want is None and self.files is not None:
            raise RuntimeModelError(f"registry {self.registry}: champion {self.version} has no {name}")
        source = storage.join(reg.version_dir(self.registry, self.version), name)
        if not self.remote:
            path = storage.local_path(source)
            if not os.path.isfile(path):
                raise RuntimeModelError(f"registry {self.registry}: champion {self.version} has no {name}")
            if want is not None and sha256_file(path) != want:
                raise RuntimeModelError(f"model {path}: sha256 differs from the registry's version record")
            return path
        path = self.cache / self.version / name  # both plain names (checked when read): inside the cache
        if want is not None and path.is_file() and sha256_file(path) == want:
            return str(path)
        try:
            data = storage.read_capped(source, cap, f"{name} of {self.version}") if cap else storage.read_bytes(source)
        except OverCap:
            raise
        except Exception as err:  # noqa: BLE001 - any store's client error (HTTP status, S3 endpoint, timeout)
            raise RuntimeModelError(f"registry {self.registry}: cannot read {name} of {self.version} "
                                    f"({one_line(err)})") from None
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise RuntimeModelError(f"registry {self.registry}: {name} of {self.version} differs from its "
                                    "version record (damaged or replaced)")
        try:
            atomic_write_bytes(path, data)
        except OSError as err:
            raise RuntimeModelError(f"cache {self.cache}: cannot write {path} ({err.strerror or err}); give "
                                    "Champion(cache_dir=...) or $VAE_RUNTIME_CACHE a writable folder") from None
        return str(path)

    def refresh(self) -> bool:
        """Re-read `champion.json`; True (and this object now names the new champion) when it changed."""
        record = self._read_record()
        if record.get("version") == self.record.get("version"):
            return False
        self._load(record)
        return True

    def decoder(self, **options) -> "Decoder":
        return Decoder(self, **options)

    def encoder(self, **options) -> "Encoder":
        return Encoder(self, **options)
