"""The `vae` command: data synth/shard, train, eval, score, export, sample, encode, info, config show.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr), 1 a failed run. Heavy imports happen
inside each subcommand so `vae --help`, `vae sample` and `vae encode` stay fast (they never import torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from vae_runtime.errors import BadInput, VaeError
from vae_runtime.limits import read_file
from vae.core.config import MAX_K


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _bounded(low: int, high: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}] ({what}), got {text}")
        return value
    return parse


SEED = _bounded(0, 2**63 - 1, "a non-negative seed")
K = _bounded(1, MAX_K, "importance samples; the config caps eval.k the same way")
GRID_IMAGES = _bounded(1, 10_000, "images in one PNG grid")


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
    return value


WAIT_HELP = "seconds to wait while another process holds the {} (default 0: refuse at once, naming it)"


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


TIMEOUT_HELP = ("seconds one batch may run before it is ended (exit 1: a graph that runs too long, or a batch too "
                "big for this machine; default 600)")


def cmd_synth(args) -> int:
    from pipeline.synth import synthesize

    summary = synthesize(args.out, args.n, seed=args.seed)
    print(f"wrote {summary['n']} synthetic images to {summary['out']} (splits {summary['splits']})")
    return 0


def cmd_shard(args) -> int:
    from pipeline.preprocess import DEFAULT_CROP
    from pipeline.shard import changed_note, shard

    crop = DEFAULT_CROP if args.crop is None else args.crop
    summary = shard(args.source, args.out, crop=crop, size=args.size, workers=args.workers, dataset=args.dataset,
                    maxcount=args.maxcount, progress=not args.quiet, wait_s=args.wait)
    state = "up to date, nothing to do" if summary["up_to_date"] else f"written {summary['written']}"
    print(f"shards {args.out}: {state}, skipped {summary['skipped']}, counts {summary['counts']}, "
          f"{summary['seconds']:.1f} s")
    if summary["changed_in_source"]:
        print(changed_note(args.out, summary["changed_in_source"]), file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from vae.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise BadInput(f"--accelerate-config {args.accelerate_config}: file not found")
    _check_machines(args)
    if args.num_processes == 1 and args.num_machines == 1 and not args.accelerate_config:
        from vae.training.train import Preempted, train

        try:
            run_dir = train(cfg, wait_s=args.wait)
        except Preempted as stopped:
            print(f"vae train: {stopped}", file=sys.stderr)
            return Preempted.exit_code
    else:
        from common import folder_lock

        # this process holds the run folder's lock for its ranks (and passes it on to the launcher)
        with folder_lock.hold(cfg.run_dir, "run folder", args.wait) as lock:
            code = _train_launched(args, cfg, lock)
        if code != 0:
            return code
        run_dir = Path(cfg.run_dir)
    print(f"trained {run_dir}")
    return 0


def _train_launched(args, cfg, lock) -> int:
    """`accelerate launch` of the training ranks, under the run folder's `lock`; 0 when they all succeeded."""
    from vae_runtime.atomic import atomic_write_json
    from vae.core.config import config_to_dict
    from vae.core.distributed import run_launched

    run_dir = Path(cfg.run_dir)
    config_file = atomic_write_json(run_dir / "launch_config.json", config_to_dict(cfg))
    env, fds = lock.for_children()
    code = run_launched("vae.training.train", [str(config_file)], args.num_processes,
                        log=run_dir / "launch.log", env=env, pass_fds=fds, num_machines=args.num_machines,
                        machine_rank=args.machine_rank, main_process_ip=args.main_process_ip,
                        main_process_port=args.main_process_port, accelerate_config=args.accelerate_config)
    if code == 143:
        return _preempted_ranks(run_dir)
    if code != 0:  # the failing rank has said why in one line above; bad input stays exit 2
        log = run_dir / "launch.log"
        bad_input = log.is_file() and any(line.startswith(b"vae: error:") for line in log.read_bytes().splitlines())
        return 2 if bad_input else 1
    return 0


def _check_machines(args) -> None:
    """The machine rank and the main machine's address, before a launch that would wait for them forever."""
    if args.machine_rank < 0 or (not args.accelerate_config and args.machine_rank >= args.num_machines):
        raise BadInput(f"--machine-rank {args.machine_rank}: expected an integer in [0, {args.num_machines - 1}] "
                       f"(one per machine of --num-machines {args.num_machines})")
    if args.num_machines > 1 and not args.main_process_ip and not args.accelerate_config:
        raise BadInput(f"--main-process-ip: needed with --num-machines {args.num_machines} (the address of the "
                       "machine with --machine-rank 0, which every machine connects to)")


def _preempted_ranks(run_dir: Path) -> int:
    """After a SIGTERM passed to the ranks: 143 when every rank recorded the step of the last checkpoint (they
    stopped together and resume from it), else 1."""
    from vae.core.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    records = [json.loads(read_file(p, "json")) for p in sorted((run_dir / "ranks").glob("rank-*.json"))]
    steps = {r["step"] for r in records}
    if latest is not None and records and len(records) == records[0]["world_size"] and \
            steps == {int(latest.stem.split("-")[1])}:
        print(f"vae train: stopped by SIGTERM at step {steps.pop()}: every rank stopped there with a checkpoint; run "
              "the same command again to resume", file=sys.stderr)
        return 143
    print(f"vae train: stopped by SIGTERM before every rank checkpointed; the last complete checkpoint "
          f"({latest.name if latest else 'none'}) is kept", file=sys.stderr)
    return 1


def cmd_eval(args) -> int:
    temperatures = _temperatures(args.temperatures)
    if args.num_processes > 1:
        from vae.core.distributed import run_launched
        from vae.evaluation.evaluate import check_sample_inputs, checked_inputs

        # bad input: one line here, not one per rank
        cfg = checked_inputs(args.run, args.split, args.k, args.shards)[1]
        check_sample_inputs(cfg, temperatures, args.inception_weights)

        forwarded = ["--run", args.run] + [f for name in ("split", "k", "shards", "temperatures", "inception_weights")
                                            if getattr(args, name) is not None
                                            for f in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
        code = run_launched("vae.evaluation.evaluate", forwarded, args.num_processes)
        if code != 0:
            print(f"vae eval: accelerate launch exited with code {code}", file=sys.stderr)
            return 1
        metrics = json.loads(read_file(Path(args.run) / "eval" / "metrics.json", "json"))
    else:
        from vae.evaluation.evaluate import evaluate

        metrics = evaluate(args.run, split=args.split, k=args.k, shards=args.shards, progress=True,
                           temperatures=temperatures, inception_weights=args.inception_weights)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("images", "samples")}))
    if metrics.get("samples"):
        from vae.cli.info import sample_summary

        print(json.dumps({"samples": sample_summary(metrics["samples"])}))
    print(f"wrote {Path(args.run) / 'eval' / 'metrics.json'}")
    return 0


def _temperatures(text: str | None) -> list[float] | None:
    """`--temperatures 0.8,1.0`: checked as eval.temperatures is (one line naming the flag)."""
    if text is None:
        return None
    from vae_runtime.errors import ConfigError
    from vae.core.config import check_temperatures

    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInput(f"--temperatures {text!r}: expected numbers separated by commas, such as 0.8,1.0") from None
    try:
        return check_temperatures(values, "--temperatures")
    except ConfigError as err:
        raise BadInput(str(err).replace("config key '--temperatures'", "--temperatures")) from None


def cmd_score(args) -> int:
    from vae.evaluation.score import score

    scores = score(args.run, args.source, k=args.k, out=args.out, progress=True)
    print(f"wrote {args.out}: {len(scores)} images, most anomalous {scores[0][0]} ({scores[0][1]:.3f} bits/dim; "
          f"EMA weights of step {scores.step})")
    return 0


def _precisions(text: str | None) -> tuple[str, ...]:
    """`--precision int8,fp16` as names (lower case; fp32, always written, is accepted and dropped)."""
    if text is None:
        return ()
    names = [name.strip().lower() for name in text.split(",")]
    if not all(names):
        raise BadInput(f"--precision {text!r}: expected names separated by commas, such as int8 or int8,fp16")
    return tuple(dict.fromkeys(name for name in names if name not in ("fp32", "float32")))


def cmd_export(args) -> int:
    from vae.serving.export import FP16_DECODER, export

    precisions = _precisions(args.precision)
    card = export(args.run, args.out, shards=args.shards, fp16=args.fp16 or "fp16" in precisions,
                  precisions=tuple(p for p in precisions if p != "fp16"))
    worst = max(max(v.values()) for v in card["validation"]["max_abs_diff"].values())
    print(f"exported {args.out}/{', '.join(card['files'])}, model.json "
          f"(EMA weights of step {card['step']}; onnxruntime vs PyTorch max abs diff {worst:.1e})")
    fp16 = card["validation"].get("fp16_decoder")
    if fp16 and fp16["validated"]:
        print(f"{FP16_DECODER}: max abs diff from decoder.onnx {fp16['max_abs_diff']:.1e} "
              f"(tolerance {fp16['tolerance']:.0e}, on {fp16['provider']})")
    elif fp16:
        print(f"{FP16_DECODER}: validation skipped: {fp16['skipped']}")
    int8 = card["validation"].get("int8")
    if int8:
        for graph in ("decoder", "encoder"):
            r = int8[graph]
            print(f"{graph}.int8.onnx: {r['passed']} budget met: images differ by mean {r['mean_abs'] * 255:.2f}/255, "
                  f"max {r['max_abs'] * 255:.1f}/255; held-out images reconstructed with {r['recon_increase']:+.2%} "
                  "error against float32")
    return 0


def _runtime_model(kind: str, model: str, device: str, precision: str | None = None, timeout: float | None = None):
    """`Decoder` or `Encoder` from a registry (its champion), a model folder or an .onnx file; bad input exits 2.
    `timeout`: seconds per run (None: the runtime's default)."""
    from vae_runtime import runtime

    with _runtime_errors():
        return getattr(runtime, kind)(model, device=device, precision=precision,
                                      **({} if timeout is None else {"timeout": timeout}))


@contextlib.contextmanager
def _runtime_errors():
    """The runtime's errors as the command's. A run past its timeout is a failed run (exit 1), not bad input: the
    timeout cannot tell a graph that loops for ever from a machine too slow for the batch, and the model and images
    may be fine. Any other runtime error names a model or input that cannot be used (exit 2)."""
    from vae_runtime import runtime

    try:
        yield
    except runtime.RunTimeout as err:
        raise VaeError(str(err)) from None
    except runtime.RuntimeModelError as err:
        raise BadInput(str(err)) from None


def cmd_sample(args) -> int:
    from vae_runtime.grid import make_grid, write_png

    decoder = _runtime_model("Decoder", args.model, args.device, args.precision, args.timeout)
    temperature = decoder.temperature if args.temperature is None else args.temperature
    with _runtime_errors():
        images = decoder.sample(args.n, seed=args.seed, temperature=temperature)
    write_png(args.out, make_grid(images, ncols=int(max(1, round(args.n ** 0.5)))))
    print(f"wrote {args.out} ({args.n} samples, seed {args.seed}, temperature {temperature:g}, "
          f"model {decoder.version}, provider {decoder.provider})")
    return 0


def _image_files(images: Path) -> list[Path]:
    from pipeline.preprocess import IMAGE_SUFFIXES

    if images.is_file():
        return [images]
    if not images.is_dir():
        raise BadInput(f"images {images}: no such file or folder")
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInput(f"images {images}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    stems = [p.stem for p in files]
    clash = next((s for s in stems if stems.count(s) > 1), None)
    if clash is not None:
        raise BadInput(f"images {images}: two files share the key {clash!r} (keys are file stems)")
    return files


def cmd_encode(args) -> int:
    """Preprocess images as the shards are (center crop, antialiased resize), encode, write keys/mu/logvar."""
    import numpy as np

    from vae_runtime import schemas
    from vae_runtime.atomic import atomic_write
    from pipeline.preprocess import DEFAULT_CROP, SkipImage, preprocess
    from pipeline.sources import read_image

    if not args.out.endswith(".npz"):
        raise BadInput(f"out {args.out}: expected a .npz file name")
    if args.crop is not None and args.crop < 0:
        raise BadInput(f"crop: expected >= 0, got {args.crop}")
    encoder = _runtime_model("Encoder", args.model, args.device, args.precision, args.timeout)
    card = schemas.check(encoder.card(), {"preprocessing": schemas.PREPROCESSING}, f"model {encoder.path}: metadata",
                         "a model card")
    crop = args.crop if args.crop is not None else (card.get("preprocessing") or {}).get("crop", DEFAULT_CROP)
    files = _image_files(Path(args.images))
    keys, pixels, skipped = [], [], []
    for path in files:
        try:
            pixels.append(preprocess(read_image(str(path)), crop, encoder.image_size))  # over the image cap: skipped
            keys.append(path.stem)
        except (SkipImage, OSError) as err:
            skipped.append(f"{path}: {err}")
    if not keys:
        first = f"; {skipped[0]}" if len(files) == 1 else f" ({len(skipped)} skipped; first: {skipped[0]})"
        raise BadInput(f"images {args.images}: no usable image{first}")
    for reason in skipped:  # the run goes on without them, as sharding does
        print(f"vae encode: skipped {reason}", file=sys.stderr)
    mu, logvar = [], []
    for start in range(0, len(pixels), args.batch_size):
        with _runtime_errors():
            m, lv = encoder.encode(np.stack(pixels[start:start + args.batch_size]))
        mu.append(m)
        logvar.append(lv)
    arrays = {"keys": np.array(keys), "mu": np.concatenate(mu), "logvar": np.concatenate(logvar)}
    atomic_write(args.out, lambda f: np.savez(f, **arrays))
    print(f"wrote {args.out} ({len(keys)} images encoded, {len(skipped)} skipped; crop {crop}, "
          f"size {encoder.image_size}; provider {encoder.provider})")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2 (`vae CMD --help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_info(args) -> int:
    from vae.cli.info import describe

    print(json.dumps(describe(args.path), indent=1, default=str))
    return 0


def cmd_registry_rollback(args) -> int:
    from vae_runtime import registry as reg

    try:
        outcome = reg.rollback(args.registry, args.version, args.reason)
    except reg.RegistryError as err:  # an unpublished version, no reason, a damaged record: the operator's input
        raise BadInput(str(err)) from None
    previous = outcome["previous"]["version"] if outcome["previous"] else "none"
    print(f"registry {args.registry}: champion {args.version} (was {previous}); never promoted again: "
          f"{', '.join(outcome['champion']['rolled_back']) or 'none'}")
    return 0


def cmd_config_show(args) -> int:
    import yaml

    from vae.core.config import config_hash, config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    print(f"# resolved config (hash {config_hash(cfg)})")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vae-pipeline")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vae", description="Train, evaluate and export VAEs on CelebA.")
    parser.add_argument("--version", action="version", version=f"vae-pipeline {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what a run folder, a model folder or a registry holds (JSON)")
    p.add_argument("path", help="a run folder, a model folder, or a registry (local path or URL)")
    p.set_defaults(func=cmd_info)

    registry = sub.add_parser("registry", help="the model registry's champion").add_subparsers(
        dest="registry_command", required=True)
    p = registry.add_parser("rollback", help="make a published version the champion again (an operator's decision, "
                                             "kept with its reason); the versions it replaces are never promoted again")
    p.add_argument("registry", help="the registry (local path or URL)")
    p.add_argument("--to", required=True, dest="version", help="a published version (vae info REGISTRY lists them)")
    p.add_argument("--reason", required=True, help="why, kept in champion.json")
    p.set_defaults(func=cmd_registry_rollback)

    config = sub.add_parser("config", help="the configuration").add_subparsers(dest="config_command",
                                                                                 required=True)
    p = config.add_parser("show", help="print the resolved configuration (defaults, file, overrides) as YAML")
    p.add_argument("--config", help="YAML file with the differences from the defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="make and shard data sets").add_subparsers(dest="data_command",
                                                                                    required=True)
    p = data.add_parser("synth", help="write a synthetic data set in CelebA's layout")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--n", type=_positive, required=True, help="number of images")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("shard", help="preprocess images into WebDataset shards and manifest.json")
    p.add_argument("--source", required=True,
                   help="CelebA folder, img_align_celeba.zip, or any image folder: a local path or an fsspec URL")
    p.add_argument("--out", required=True, help="shard folder")
    p.add_argument("--size", type=_positive, default=64, help="output side in pixels (default 64)")
    p.add_argument("--crop", type=int, default=None,
                   help="center crop before resizing (default 148, CelebA's face square; 0: largest square)")
    p.add_argument("--workers", type=_positive, default=1, help="preprocessing processes")
    p.add_argument("--maxcount", type=_positive, default=1000, help="images per shard")
    p.add_argument("--dataset", default="celeba", help="name in shard file names")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--wait", type=_wait_seconds, default=0.0, metavar="SECONDS", help=WAIT_HELP.format("shard folder"))
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("train", help="train (or resume) a run")
    p.add_argument("--config", help="YAML file with the differences from the defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--num-processes", type=_positive, default=1, help="processes per machine")
    p.add_argument("--num-machines", type=_positive, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--main-process-ip", default=None)
    p.add_argument("--main-process-port", type=int, default=None, help="default: a free port (one machine), 29500")
    p.add_argument("--accelerate-config", default=None,
                   help="an accelerate config file (deploy/accelerate/*.yaml) setting processes and machines")
    p.add_argument("--wait", type=_wait_seconds, default=0.0, metavar="SECONDS", help=WAIT_HELP.format("run folder"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="bounds, bits/dim and grids into RUN_DIR/eval/metrics.json")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--split", default=None, choices=["train", "valid", "test"])
    p.add_argument("--k", type=K, default=None, help="importance samples for the IWAE bound")
    p.add_argument("--shards", default=None, help="shards location (default: the run's)")
    p.add_argument("--num-processes", type=_positive, default=1, help="ranks sharing the split")
    p.add_argument("--temperatures", default=None,
                   help="prior temperatures of the sample metrics and grids, e.g. 0.8,1.0 (default: eval.temperatures)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth for FID (default: $VAE_INCEPTION_WEIGHTS, then "
                        "eval.inception_weights; without it fid is null)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="per-image NLL in bits/dim (IWAE), most anomalous first, as CSV")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--source", required=True, help="shards folder/URL, image folder, CelebA folder or zip")
    p.add_argument("--k", type=K, default=100)
    p.add_argument("--out", required=True, help="CSV file to write (key,nll_bpd)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export", help="encoder.onnx, decoder.onnx, model.json, validated")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shards", default=None, help="shards for validation inputs (default: the run's)")
    p.add_argument("--precision", default=None,
                   help="reduced-precision graphs too, comma-separated: int8 (CPU: decoder.int8.onnx and "
                        "encoder.int8.onnx, calibrated and validated against float32), fp16 (as --fp16)")
    p.add_argument("--fp16", action="store_true",
                   help="also write decoder.fp16.onnx (float16 weights, float32 I/O) for GPUs, validated "
                        "against decoder.onnx")
    p.set_defaults(func=cmd_export)

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
    p.add_argument("--timeout", type=_run_timeout, default=None, help=TIMEOUT_HELP)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("encode", help="codes (mu, logvar) of images from encoder.onnx (onnxruntime only)")
    p.add_argument("--model", required=True,
                   help="a registry (local path or URL: its champion), a model folder, or encoder.onnx itself")
    p.add_argument("--images", required=True, help="a folder of images or one image file")
    p.add_argument("--out", required=True, help=".npz file to write: keys, mu, logvar")
    p.add_argument("--crop", type=int, default=None,
                   help="center crop before resizing (default: the model's shards' crop, else 148; 0: largest square)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default=None, help="int8: encoder.int8.onnx (CPUs), when exported")
    p.add_argument("--timeout", type=_run_timeout, default=None, help=TIMEOUT_HELP)
    p.set_defaults(func=cmd_encode)
    return parser


def _os_error(err: OSError) -> str:
    """`FILE: reason`; the reason alone where the error names no file (the writers name theirs: vae_runtime.atomic)."""
    reason = err.strerror or str(err)
    return f"{err.filename}: {reason}" if err.filename else reason


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2, one line already printed)
        return int(done.code or 0)
    try:
        return args.func(args)
    except BadInput as err:
        print(f"vae: error: {err}", file=sys.stderr)
        return 2
    except (PermissionError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        print(f"vae: error: {_os_error(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not the input: disk full, I/O errors
        print(f"vae: failed: {_os_error(err)}", file=sys.stderr)
        return 1
    except VaeError as err:
        print(f"vae: failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vae: interrupted", file=sys.stderr)
        return 130
