"""The exported models as apps run them: `Decoder`, `Encoder` and `interpolate`; NumPy and onnxruntime only.

    from vae_runtime import Decoder
    decoder = Decoder(model)                     # a Champion, a registry, a model folder or decoder.onnx
    images = decoder.sample(16, seed=0)          # float32 [16, 3, H, W] in [0, 1]

A model is a registry location (its champion, `vae_runtime.champion`), a model folder (its graphs checked against
`model.json`, `vae_runtime.model_folder`) or a bare `.onnx` file (loaded as is). `precision="fp16"` picks
`decoder.fp16.onnx` (`precision=P` in general the file `vae_runtime.vocabulary.graph_name` names), explicitly;
`decoder.fp16.onnx` (float16 weights, float32 interface) loads the same way: use it on a GPU. `.precision` says
which precision the loaded graph is. A run longer than `timeout` seconds (default `DEFAULT_TIMEOUT`) is ended and
raises `RunTimeout`.

On a GPU the app can keep z and the images on the device: `decode_on_device(z, out=...)` binds OrtValues, CUDA
tensors or CuPy arrays in place, and `capture(z, out)` records a CUDA graph on fixed buffers for `.replay()`
(`vae_runtime.device_buffers` says how, and how streams are ordered).

The noise is drawn here with NumPy from the caller's seed, so the same seed gives the same images. The
provider that actually runs is reported (`.provider`); sessions are opened as `vae_runtime.sessions` says, or with
the app's own onnxruntime `providers=` and `sess_options=`. `Encoder.encode_images` takes images of any size or
image files, prepared as the shards were (`vae_runtime.preprocess`, with Pillow).
Models whose contract version is unknown are refused.
"""

from __future__ import annotations

import json
import os

import numpy as np

from vae_runtime import device_buffers as buffers
from vae_runtime import limits, schemas
from vae_runtime import registry as reg
from vae_runtime.champion import Champion
from vae_runtime.errors import RunTimeout, RuntimeModelError, one_line
from vae_runtime.model_folder import CARD, check_card, declared_sizes, verified_graph
from vae_runtime.sessions import ONNXRUNTIME_ERRORS, open_session, provider_device_id
from vae_runtime.vocabulary import graph_name, precision_name
from vae_runtime.watchdog import deadline

LEGACY_STREAM = 1  # cudaStreamLegacy: CUDA's legacy default stream, as a handle
MAX_BATCH = 65536  # latents or images in one call: the largest batch export declares its graphs for
BATCH_BYTES = 1 << 30  # `sample` decodes fewer than batch_size at once where one batch (draws, images) passes this
DEFAULT_TIMEOUT = 600.0  # seconds one run may take: minutes of headroom for a batch of 256 large images on a CPU
MAX_TIMEOUT = 7 * 86400.0


def resolve_model(model, kind: str, precision: str | None = None) -> tuple[str, str | None]:
    """(local path of the graph to load, champion version or None) for a model given as a `Champion`, a
    registry location (local path or URL; `REGISTRY@VERSION` or `@ALIAS` pins one), a model folder, or an `.onnx`
    file."""
    return _resolve(model, kind, precision)[:2]


def _resolve(model, kind: str, precision: str | None) -> tuple[str, str | None, str | None]:
    """`resolve_model`, and the local path of the model card (`model.json`) that came with the graph, verified
    like it: None for a bare graph file or a champion published without one."""
    if isinstance(model, Champion):
        return model.graph(kind, precision), model.version, model.card_file()
    location = os.fspath(model)
    if reg.names_registry(location):  # pinned (REGISTRY@VERSION, @ALIAS) or its champion: "no champion yet"
        champion = Champion(location)
        return champion.graph(kind, precision), champion.version, champion.card_file()
    name = graph_name(kind, precision, RuntimeModelError)
    if os.path.isdir(location):
        path = verified_graph(location, name)
        return path, None, os.path.join(os.path.dirname(path), CARD)  # the card of that same export
    if name != graph_name(kind) and os.path.basename(location) != name:
        raise RuntimeModelError(f"model {location}: precision {precision!r} picks {name} from a model folder or "
                                "registry; this is one graph file, loaded as it is")
    return location, None, None


class _Model:
    KIND = ""
    EXTRA_OUTPUTS: tuple[str, ...] = ()  # outputs besides the bound one, shaped like it
    SIGNATURE: buffers.Signature  # the input and output bound by the *_on_device calls and `capture`

    def __init__(self, model, device: str = "cpu", threads: int | None = None, *, spinning: bool = False,
                 precision: str | None = None, device_id: int = 0, cuda_stream: int | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, providers: list | None = None,
                 sess_options=None):
        """`model`: a `Champion`, a registry location, a model folder or an `.onnx` file (see the module).
        `device_id` and `cuda_stream` (a stream handle of the app's) apply on the CUDA provider. A run (one
        decode or encode call, one batch of `sample`) that lasts longer than `timeout` seconds is ended and raises
        `RunTimeout` (None: no limit); onnxruntime ends it between two nodes, so one node's work is not cut short.

        `providers` and `sess_options` are onnxruntime's own (`onnxruntime.InferenceSession`'s): a list of provider
        names or (name, options dict) tuples, and an `onnxruntime.SessionOptions`; passed through as they are.
        Given, `providers` takes precedence over `device`, `device_id` and `cuda_stream` (put them in the CUDA
        provider's options: its `device_id` is the GPU the *_on_device calls bind), and `sess_options` over `threads`
        and `spinning`. A provider onnxruntime does not have here is refused; `.provider` says what runs, and a
        requested provider that did not start is a warning."""
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
                          cuda_stream=cuda_stream, providers=providers, sess_options=sess_options)
        self.session, self.metadata = open_session(self.path, **self._open)
        self._device_id = provider_device_id(providers, device_id)  # the GPU the bound buffers live on
        self._graph_session = None  # a second session with CUDA graph capture, opened by the first `capture`
        self.provider = self.session.get_providers()[0]
        sizes = declared_sizes(self.metadata, self.path)  # bounded before anything is sized from them
        self.latent_dim, self.image_size, self.channels = sizes["latent_dim"], sizes["image_size"], sizes["channels"]
        self.signature = self._signature()  # the bound input and output, checked against the graph
        self._check_interface()
        check_card(card, sizes, self.path)
        self.precision = _graph_precision(self.metadata.get("precision"), precision)
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
                return buffers.run_bound(self.session, self._device_id, self.signature, value, out, options)
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
                self._graph_session, _ = open_session(self.path, **self._open, cuda_graph=True)
            session = self._graph_session or self.session
            return buffers.CudaGraph(session, self._device_id, self.signature, value, out,
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


def _graph_precision(recorded, asked) -> str:
    """The precision of a loaded graph: what its metadata records (older spellings read as the vocabulary's), else
    (a graph from before it was recorded, or a garbled record) the precision it was picked by."""
    try:
        return precision_name(asked if recorded is None else recorded, RuntimeModelError)
    except RuntimeModelError:
        return precision_name(asked, RuntimeModelError)


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

    @property
    def crop(self) -> int:
        """The center crop `encode_images` takes: the one the model's training images had, as its metadata (the
        same as model.json's `preprocessing`) records, else `vae_runtime.schemas.DEFAULT_CROP`."""
        card = schemas.check(self.card(), {"preprocessing": schemas.PREPROCESSING}, f"model {self.path}: metadata",
                             "a model card", error=RuntimeModelError)
        return schemas.recorded_crop(card.get("preprocessing"))

    def encode_images(self, images, crop: int | None = None, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(mu, logvar) of images of any size or image files, preprocessed as the model's shards were
        (`preprocess`), encoded `batch_size` at a time. Needs Pillow (the runtime's `images` extra)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or not 1 <= batch_size <= MAX_BATCH:
            raise RuntimeModelError(f"batch_size: expected an integer >= 1 and <= {MAX_BATCH}, got {batch_size!r}")
        pixels = self.preprocess(images, crop)
        mu, logvar = zip(*(self.encode(pixels[start:start + batch_size])
                           for start in range(0, len(pixels), batch_size)))
        return np.concatenate(mu), np.concatenate(logvar)

    def preprocess(self, images, crop: int | None = None) -> np.ndarray:
        """Images as the model's shards hold them, uint8 [N, size, size, 3]: each center cropped to `crop` (default
        `self.crop`; 0: the largest centred square) and resized to the model's size with Pillow's antialiased
        filter, by the function sharding runs (`vae_runtime.preprocess`), so the bytes are the shards'.
        `images`: uint8 [N, H, W, 3], or a list whose items are uint8 [H, W, 3] arrays of any size or image file
        paths (one path alone: one image). An image that cannot be used (unreadable, too small, the wrong shape)
        is one line naming it. Needs Pillow (the runtime's `images` extra)."""
        from vae_runtime import preprocess  # Pillow's module: imported by apps that preprocess, not on every load

        if isinstance(images, (str, os.PathLike)):
            images = [images]
        if not (isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4)):
            got = f"an array of shape {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
            raise RuntimeModelError(f"images: expected uint8 [N, H, W, 3] or a list of [H, W, 3] arrays or image "
                                    f"file paths, got {got}")
        if len(images) == 0:
            raise RuntimeModelError("images: expected at least one image, got none")
        if len(images) > MAX_BATCH:
            raise RuntimeModelError(f"images: {len(images)} in one call, over {MAX_BATCH}; encode in parts")
        crop = self.crop if crop is None else crop
        if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 0:
            raise RuntimeModelError(f"crop: expected an integer >= 0 (0: the largest centred square), got {crop!r}")
        return np.stack([self._pixels(preprocess, i, image, int(crop)) for i, image in enumerate(images)])

    def _pixels(self, preprocess, i: int, image, crop: int) -> np.ndarray:
        """The i-th image given to `preprocess` as uint8 [size, size, 3], or one line naming it."""
        try:
            if isinstance(image, (str, os.PathLike)):
                where = f"images[{i}] {os.fspath(image)}"
                try:
                    data = limits.read_file(image, "image")
                except limits.OverCap as err:
                    raise RuntimeModelError(f"images[{i}]: {err}") from None
                except OSError as err:
                    raise RuntimeModelError(f"{where}: cannot be read ({one_line(err)})") from None
                return preprocess.preprocess(data, crop, self.image_size)
            where = f"images[{i}]"
            return preprocess.crop_resize(image, crop, self.image_size)
        except preprocess.SkipImage as err:
            raise RuntimeModelError(f"{where}: {err}") from None

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
