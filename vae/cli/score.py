"""`vae score`: per-image NLL in bits/dim (the IWAE bound) of a run's EMA weights, most anomalous first, as CSV."""

from __future__ import annotations

from vae.cli.args import K


def cmd_score(args) -> int:
    from vae.evaluation.score import score  # lazy: torch (the CLI stays torch-free until a command needs it)

    scores = score(args.run, args.source, k=args.k, out=args.out, progress=True)
    print(f"wrote {args.out}: {len(scores)} images, most anomalous {scores[0][0]} ({scores[0][1]:.3f} bits/dim; "
          f"EMA weights of step {scores.step})")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("score", help="per-image NLL in bits/dim (IWAE), most anomalous first, as CSV")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--source", required=True, help="shards folder/URL, image folder, CelebA folder or zip")
    p.add_argument("--k", type=K, default=100)
    p.add_argument("--out", required=True, help="CSV file to write (key,nll_bpd)")
    p.set_defaults(func=cmd_score)
