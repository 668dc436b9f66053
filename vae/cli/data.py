"""`vae data synth` and `vae data shard`: a synthetic data set in CelebA's layout, and images into WebDataset shards."""

from __future__ import annotations

import sys

from vae.cli.args import SEED, WAIT_HELP, positive, wait_seconds


def cmd_synth(args) -> int:
    from pipeline.synth import synthesize  # lazy: numpy and PIL, kept out of `vae --help`

    summary = synthesize(args.out, args.n, seed=args.seed)
    print(f"wrote {summary['n']} synthetic images to {summary['out']} (splits {summary['splits']})")
    return 0


def cmd_shard(args) -> int:
    # lazy: the shard writer brings WebDataset and torch, which `vae --help` and the torch-free commands never load
    from vae_runtime.schemas import DEFAULT_CROP
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


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="make and shard data sets").add_subparsers(dest="data_command",
                                                                                    required=True)
    p = data.add_parser("synth", help="write a synthetic data set in CelebA's layout")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--n", type=positive, required=True, help="number of images")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("shard", help="preprocess images into WebDataset shards and manifest.json")
    p.add_argument("--source", required=True,
                   help="CelebA folder, img_align_celeba.zip, or any image folder: a local path or an fsspec URL")
    p.add_argument("--out", required=True, help="shard folder")
    p.add_argument("--size", type=positive, default=64, help="output side in pixels (default 64)")
    p.add_argument("--crop", type=int, default=None,
                   help="center crop before resizing (default 148, CelebA's face square; 0: largest square)")
    p.add_argument("--workers", type=positive, default=1, help="preprocessing processes")
    p.add_argument("--maxcount", type=positive, default=1000, help="images per shard")
    p.add_argument("--dataset", default="celeba", help="name in shard file names")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--wait", type=wait_seconds, default=0.0, metavar="SECONDS", help=WAIT_HELP.format("shard folder"))
    p.set_defaults(func=cmd_shard)
