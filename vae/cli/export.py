"""`vae export`: a run's EMA weights as encoder.onnx, decoder.onnx (and reduced-precision graphs) with model.json,
each validated against PyTorch."""

from __future__ import annotations

from vae_runtime.errors import BadInput
from vae_runtime.vocabulary import graph_name, precision_names


def _precisions(text: str | None, fp16: bool = False) -> tuple[str, ...]:
    """`--precision fp16,int8` as the vocabulary's names (`vae_runtime.vocabulary`: any case, older spellings read;
    fp32, always written, is accepted and dropped), checked before any work; `fp16`: `--fp16`, the older spelling
    of `--precision fp16`."""
    names = []
    if text is not None:
        names = [name.strip().lower() for name in text.split(",")]
        if not all(names):
            raise BadInput(f"--precision {text!r}: expected names separated by commas, such as int8 or fp16,int8")
    return precision_names([*names, *(["fp16"] if fp16 else [])], BadInput, "--precision")


def cmd_export(args) -> int:
    from vae.serving.export import export  # lazy: torch and onnx (the CLI stays torch-free)

    card = export(args.run, args.out, shards=args.shards, precisions=_precisions(args.precision, args.fp16))
    worst = max(max(v.values()) for v in card["validation"]["max_abs_diff"].values())
    print(f"exported {args.out}/{', '.join(card['files'])}, model.json "
          f"(EMA weights of step {card['step']}; onnxruntime vs PyTorch max abs diff {worst:.1e})")
    fp16, fp16_decoder = card["validation"].get("fp16_decoder"), graph_name("decoder", "fp16")
    if fp16 and fp16["validated"]:
        print(f"{fp16_decoder}: max abs diff from {graph_name('decoder')} {fp16['max_abs_diff']:.1e} "
              f"(tolerance {fp16['tolerance']:.0e}, on {fp16['provider']})")
    elif fp16:
        print(f"{fp16_decoder}: validation skipped: {fp16['skipped']}")
    int8 = card["validation"].get("int8")
    if int8:
        for graph in ("decoder", "encoder"):
            r = int8[graph]
            print(f"{graph_name(graph, 'int8')}: {r['passed']} budget met: images differ by mean "
                  f"{r['mean_abs'] * 255:.2f}/255, max {r['max_abs'] * 255:.1f}/255; held-out images reconstructed "
                  f"with {r['recon_increase']:+.2%} error against float32")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="encoder.onnx, decoder.onnx, model.json, validated")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shards", default=None, help="shards for validation inputs (default: the run's)")
    p.add_argument("--precision", default=None,
                   help="graphs of other precisions too, comma-separated: fp16 (GPUs: decoder.fp16.onnx, float16 "
                        "weights behind float32 I/O, validated against decoder.onnx), int8 (CPUs: decoder.int8.onnx "
                        "and encoder.int8.onnx, calibrated and validated against fp32)")
    p.add_argument("--fp16", action="store_true", help="the older spelling of --precision fp16")
    p.set_defaults(func=cmd_export)
