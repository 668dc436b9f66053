"""`make demo`: the whole train-vae flow on synthetic faces, on the CPU, without a Prefect server.

Generates the synthetic CelebA-layout data set (once), runs the flow with `configs/demo.yaml`, and prints
where the champion's decoder.onnx, its metrics and its sample grid are.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from vae_runtime.registry import read_champion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="folder for data, shards, runs and registry")
    parser.add_argument("--n", type=int, default=2000, help="synthetic images")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")

    from flows.train_vae import train_vae
    from pipeline.synth import synthesize

    started = time.time()
    out = Path(args.out)
    source = out / "data"
    if not (source / "list_eval_partition.txt").exists():
        synthesize(source, args.n, seed=0)
    result = train_vae(source=str(source), shards=str(out / "shards"), config=args.config,
                       registry=str(out / "registry"), runs=str(out / "runs"), overrides=args.overrides)
    champion = read_champion(out / "registry")
    folder = out / "registry" / champion["path"]  # relative to the registry
    print()
    print(f"train-vae finished in {time.time() - started:.0f} s: version {result['version']} "
          f"{'promoted' if result['promoted'] else 'not promoted'} ({result['reason']})")
    print(f"champion:     {champion['version']} (test nll_bpd {champion['nll_bpd']:.3f})")
    print(f"decoder.onnx: {folder / 'decoder.onnx'}")
    print(f"metrics.json: {folder / 'metrics.json'}")
    print(f"samples:      {folder / 'samples.png'}")
    print(json.dumps({k: result["metrics"][k] for k in ("nll_bpd", "elbo_bpd", "n_images", "k")}))
    primary = (result["metrics"].get("samples") or {}).get("primary")
    if primary:  # the sample figure promotion guards, beside its real-versus-real floor (docs/model.md)
        floor = result["metrics"]["samples"]["floor"][primary["metric"]]
        print(f"sample KID:   {primary['value']:.4f} ± {primary['stderr'] or 0:.4f} at "
              f"temperature {primary['temperature']:g} (real-versus-real floor {floor['value']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
