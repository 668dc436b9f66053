"""`vae sample` and `vae encode`: the exported graphs run by the torch-free runtime (`vae_runtime.Decoder` and
`Encoder`), from a registry's champion, a model folder or an .onnx file. Neither command imports torch."""

from __future__ import annotations

import argparse
import contextlib
import sys

from vae_runtime import schemas
from vae_runtime.atomic import atomic_write
from vae_runtime.errors import BadInput, RunTimeout, RuntimeModelError, VaeError
from vae.cli.args import SEED, bounded, positive

GRID_IMAGES = bounded(1, 10_000, "images in one PNG grid")
TIMEOUT_HELP = ("seconds one batch may run before it is ended (exit 1: a graph that runs too long, or a batch too "
                "big for this machine; default 600)")


def _temperature(text: str) -> float:
    value = float(text)
    if not 0 < value <= 10:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 10], got {text}")
    return value


def _run_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 7 * 86400:  # the runtime's MAX_TIMEOUT: a week
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 604800], got {text}")
    return value


def _runtime_model(kind: str, model: str, device: str, precision: str | None = None, timeout: float | None = None,
                   provider: str | None = None):
    """`Decoder` or `Encoder` from a registry (its champion), a model folder or an .onnx file; bad input exits 2.
    `timeout`: seconds per run (None: the runtime's default). `provider`: an onnxruntime provider by name, ahead of
    the CPU's (it takes precedence over `device`)."""
    import vae_runtime  # its Decoder and Encoder import onnxruntime on first use, kept out of `vae --help`

    options = {} if timeout is None else {"timeout": timeout}
    if provider is not None:
        options["providers"] = list(dict.fromkeys([provider, "CPUExecutionProvider"]))
    with _runtime_errors():
        return getattr(vae_runtime, kind)(model, device=device, precision=precision, **options)


@contextlib.contextmanager
def _runtime_errors():
    """The runtime's errors as the command's. A run past its timeout is a failed run (exit 1), not bad input: the
    timeout cannot tell a graph that loops for ever from a machine too slow for the batch, and the model and images
    may be fine. Any other runtime error names a model or input that cannot be used (exit 2)."""
    try:
        yield
    except RunTimeout as err:
        raise VaeError(str(err)) from None
    except RuntimeModelError as err:
        raise BadInput(str(err)) from None


def cmd_sample(args) -> int:
    from vae_runtime.grid import make_grid, write_png  # lazy: numpy, kept out of `vae --help`

    decoder = _runtime_model("Decoder", args.model, args.device, args.precision, args.timeout, args.provider)
    temperature = decoder.temperature if args.temperature is None else args.temperature
    with _runtime_errors():
        images = decoder.sample(args.n, seed=args.seed, temperature=temperature)
    write_png(args.out, make_grid(images, ncols=int(max(1, round(args.n ** 0.5)))))
    print(f"wrote {args.out} ({args.n} samples, seed {args.seed}, temperature {temperature:g}, "
          f"model {decoder.version}, provider {decoder.provider})")
    return 0


def cmd_encode(args) -> int:
    """Preprocess images as the shards are (center crop, antialiased resize), encode, write keys/mu/logvar."""
    # lazy: numpy and PIL, kept out of `vae --help` (neither brings torch)
    import numpy as np

    from pipeline.images import image_batches

    if not args.out.endswith(".npz"):
        raise BadInput(f"out {args.out}: expected a .npz file name")
    if args.crop is not None and args.crop < 0:
        raise BadInput(f"crop: expected >= 0, got {args.crop}")
    encoder = _runtime_model("Encoder", args.model, args.device, args.precision, args.timeout)
    card = schemas.check(encoder.card(), {"preprocessing": schemas.PREPROCESSING}, f"model {encoder.path}: metadata",
                         "a model card")
    crop = args.crop if args.crop is not None else schemas.recorded_crop(card.get("preprocessing"))
    keys, mu, logvar, skipped = [], [], [], []
    for batch_keys, pixels in image_batches(args.images, crop, encoder.image_size, args.batch_size, skipped):
        with _runtime_errors():
            m, lv = encoder.encode(pixels)
        keys += batch_keys
        mu.append(m)
        logvar.append(lv)
    shown = [f"{record['key']}: {record['reason']}" for record in skipped]
    if not keys:
        first = f"; {shown[0]}" if len(shown) == 1 else f" ({len(shown)} skipped; first: {shown[0]})"
        raise BadInput(f"images {args.images}: no usable image{first}")
    for reason in shown:  # the run goes on without them, as sharding does
        print(f"vae encode: skipped {reason}", file=sys.stderr)
    arrays = {"keys": np.array(keys), "mu": np.concatenate(mu), "logvar": np.concatenate(logvar)}
    atomic_write(args.out, lambda f: np.savez(f, **arrays))
    print(f"wrote {args.out} ({len(keys)} images encoded, {len(skipped)} skipped; crop {crop}, "
          f"size {encoder.image_size}; provider {encoder.provider})")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="a PNG grid of samples from decoder.onnx (onnxruntime only)")
    p.add_argument("--model", required=True,
                   help="a registry (local path or URL: its champion), a model folder, or decoder.onnx itself")
    p.add_argument("--precision", default=None,
                   help="a reduced-precision graph of the model: fp16 (GPUs) or int8 (CPUs), when exported")
    p.add_argument("--n", type=GRID_IMAGES, default=64, help="images in the grid (decoded in batches)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--temperature", type=_temperature, default=None,
                   help="the prior draw's scale: z ~ N(0, t^2 I) (default: the temperature the model's evaluation "
                        "found best, recorded at export; 1 where none is)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--provider", default=None,
                   help="an onnxruntime execution provider by name (e.g. TensorrtExecutionProvider), tried before "
                        "the CPU's; it takes precedence over --device")
    p.add_argument("--timeout", type=_run_timeout, default=None, help=TIMEOUT_HELP)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("encode", help="codes (mu, logvar) of images from encoder.onnx (onnxruntime only)")
    p.add_argument("--model", required=True,
                   help="a registry (local path or URL: its champion), a model folder, or encoder.onnx itself")
    p.add_argument("--images", required=True, help="a folder of images or one image file")
    p.add_argument("--out", required=True, help=".npz file to write: keys, mu, logvar")
    p.add_argument("--crop", type=int, default=None,
                   help="center crop before resizing (default: the model's shards' crop, else 148; 0: largest square)")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default=None, help="int8: encoder.int8.onnx (CPUs), when exported")
    p.add_argument("--timeout", type=_run_timeout, default=None, help=TIMEOUT_HELP)
    p.set_defaults(func=cmd_encode)
