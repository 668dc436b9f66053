"""`vae eval`: bounds, bits/dim, sample metrics and grids of a run into RUN_DIR/eval/metrics.json, in this process
or as `accelerate launch` ranks sharing the split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vae_runtime.errors import BadInput, ConfigError
from vae_runtime.limits import read_file
from vae.cli.args import K, positive
from vae.cli.info import sample_summary
from vae.core.config import check_temperatures
from vae.core.distributed import run_launched


def cmd_eval(args) -> int:
    temperatures = _temperatures(args.temperatures)
    if args.num_processes > 1:
        # lazy: evaluation imports torch (the CLI stays torch-free until a command needs it)
        from vae.evaluation.evaluate import check_sample_inputs, checked_inputs

        # bad input: one line here, not one per rank; every rank reads the checkpoint checked here (a run being
        # trained may write a newer one meanwhile)
        _, cfg, step, *_ = checked_inputs(args.run, args.split, args.k, args.shards)
        check_sample_inputs(cfg, temperatures, args.inception_weights)

        forwarded = ["--run", args.run, "--step", str(step)] + [
            f for name in ("split", "k", "shards", "temperatures", "inception_weights") if getattr(args, name) is not None
            for f in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
        code = run_launched("vae.evaluation.evaluate", forwarded, args.num_processes)
        if code != 0:
            print(f"vae eval: accelerate launch exited with code {code}", file=sys.stderr)
            return 1
        metrics = json.loads(read_file(Path(args.run) / "eval" / "metrics.json", "json"))
    else:
        from vae.evaluation.evaluate import evaluate  # lazy: torch, as above

        metrics = evaluate(args.run, split=args.split, k=args.k, shards=args.shards, progress=True,
                           temperatures=temperatures, inception_weights=args.inception_weights)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("images", "samples")}))
    if metrics.get("samples"):
        print(json.dumps({"samples": sample_summary(metrics["samples"])}))
    print(f"wrote {Path(args.run) / 'eval' / 'metrics.json'}")
    return 0


def _temperatures(text: str | None) -> list[float] | None:
    """`--temperatures 0.8,1.0`: checked as eval.temperatures is (one line naming the flag)."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInput(f"--temperatures {text!r}: expected numbers separated by commas, such as 0.8,1.0") from None
    try:
        return check_temperatures(values, "--temperatures")
    except ConfigError as err:
        raise BadInput(str(err).replace("config key '--temperatures'", "--temperatures")) from None


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="bounds, bits/dim and grids into RUN_DIR/eval/metrics.json")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--split", default=None, choices=["train", "valid", "test"])
    p.add_argument("--k", type=K, default=None, help="importance samples for the IWAE bound")
    p.add_argument("--shards", default=None, help="shards location (default: the run's)")
    p.add_argument("--num-processes", type=positive, default=1, help="ranks sharing the split")
    p.add_argument("--temperatures", default=None,
                   help="prior temperatures of the sample metrics and grids, e.g. 0.8,1.0 (default: eval.temperatures)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth for FID (default: $VAE_INCEPTION_WEIGHTS, then "
                        "eval.inception_weights; without it fid is null)")
    p.set_defaults(func=cmd_eval)
