"""The model card, `README.md` beside `model.json`, in Hugging Face's format: YAML front matter (license, datasets,
tags, the library, and a model-index with the measured figures) and sections for the model, its intended use, the
training data and procedure, the evaluation, limitations, use and files. Written after validation from the card's
own values: what the run really trained on (the shards' `data` record), how it trained (its config and
checkpoint), what it measured. CelebA's terms appear only for CelebA."""

from __future__ import annotations

from pathlib import Path

import yaml

from vae_runtime.atomic import atomic_write_text
from vae_runtime.errors import BadInput
from vae_runtime.vocabulary import graph_name
from pipeline.manifest import load_manifest

CELEBA_TERMS = ("CelebA is available for non-commercial research purposes only (see the data set's agreement at "
                "mmlab.ie.cuhk.edu.hk/projects/CelebA.html). A model trained on it inherits those terms: research "
                "use only, no commercial use, no redistribution of the images.")
DATA_TEXT = {
    "celeba": "CelebA's aligned face images (`img_align_celeba`), its official train split",
    "synthetic": "synthetic faces drawn by `vae data synth` (no person's image), in CelebA's layout",
    "images": "a folder of images, `{name}`, its train split",
}
UNKNOWN_DATA = ("The shards this model trained on did not record what their images are (they were made before "
                "that was recorded, or could not be read at export): check the data's terms before using the model.")


def data_record(shards: str) -> dict | None:
    """What the training shards' manifest says the images are (`pipeline.sources.Source.data`), or None."""
    try:
        data = load_manifest(shards).get("data")
    except (BadInput, OSError, ImportError, ValueError):  # unreadable here (an s3:// run without credentials)
        return None
    return data if isinstance(data, dict) else None


def training_record(cfg, state: dict) -> dict:
    """How the exported weights were trained, from the run's config and checkpoint."""
    model = {"kind": "vdvae-style hierarchical" if cfg.model.layout else cfg.model.kind,
             "channels": list(cfg.model.channels), "latent_dim": cfg.model.latent_dim}
    if cfg.model.layout:
        model["layout"] = cfg.model.layout
    return {"model": model, "steps": int(state.get("step", 0)), "images_seen": int(state.get("images", 0)),
            "train_s": round(float(state.get("train_s", 0.0)), 1), "batch_size": cfg.data.batch_size,
            "optimizer": cfg.train.optimizer, "lr": cfg.train.lr, "mixed_precision": cfg.train.mixed_precision,
            "flip": cfg.data.flip, "ema_decay": cfg.train.ema_decay}


def _metric(metrics: dict, key: str, fmt: str = "{:.4f}") -> str:
    value = metrics.get(key)
    return fmt.format(value) if isinstance(value, (int, float)) else "n/a"


def front_matter(card: dict) -> dict:
    """Hugging Face's model card metadata: license, datasets, tags, library and the model-index of results."""
    data, m = card.get("data") or {}, card.get("metrics") or {}
    kind = data.get("kind")
    meta = {"license": {"celeba": "other", "synthetic": "apache-2.0"}.get(kind, "unknown"),
            "library_name": "onnx", "pipeline_tag": "unconditional-image-generation",
            "tags": ["vae", "variational-autoencoder", "onnx", "image-generation", *([kind] if kind else [])]}
    if kind == "celeba":
        meta.update({"license_name": "celeba-research-only", "datasets": ["celeba"]})
    metrics = [{"type": "nll_bpd", "name": f"negative log-likelihood, bits/dim (IWAE, K={m.get('k')})",
                "value": m.get("nll_bpd")},
               {"type": "elbo_bpd", "name": "ELBO, bits/dim", "value": m.get("elbo_bpd")}]
    primary = (m.get("samples") or {}).get("primary") or {}
    if isinstance(primary.get("value"), (int, float)):
        metrics.append({"type": primary.get("metric"), "value": primary["value"],
                        "name": f"{str(primary.get('metric')).upper()} of prior samples at temperature "
                                f"{primary.get('temperature')} (random features; lower is better)"})
    meta["model-index"] = [{"name": f"vae-{card.get('version')}", "results": [{
        "task": {"type": "unconditional-image-generation", "name": "image generation"},
        "dataset": {"type": kind or "unknown", "name": data.get("name", "unknown"), "split": m.get("split")},
        "metrics": [x for x in metrics if isinstance(x["value"], (int, float))]}]}]
    return meta


def model_card_markdown(card: dict, samples: str | None = "samples.png") -> str:
    m, data, training = card.get("metrics") or {}, card.get("data") or {}, card.get("training") or {}
    graphs = "\n".join(f"| `{name}` | `{card.get('sha256', {}).get(name, 'n/a')}` |" for name in card.get("files", []))
    kind, size = data.get("kind"), card.get("image_size")
    subject = {"celeba": "face images", "synthetic": "synthetic face images"}.get(kind, "images")
    lines = ["---", yaml.safe_dump(front_matter(card), sort_keys=False).rstrip(), "---", "",
             f"# VAE {card.get('version')}", "",
             f"A variational autoencoder for {size}x{size} RGB {subject}, latent size {card.get('latent_dim')}, "
             f"`{card.get('likelihood')}` likelihood; exported {card.get('created')} from the EMA weights of step "
             f"{card.get('step')} (config hash `{card.get('config_hash')}`).", "",
             "## Intended use", "",
             "Research on generative models, image compression and representation learning; anomaly scores "
             "(bits/dim per image). Not for identifying people, not for decisions about people, and not as a "
             "source of realistic images of people: samples show the biases of the training data.", "",
             "## Training data", ""]
    if kind in DATA_TEXT:
        lines.append(DATA_TEXT[kind].format(name=data.get("name")) + ", preprocessed as the card's "
                     f"`preprocessing` says (center crop {(card.get('preprocessing') or {}).get('crop', 'n/a')}, "
                     f"resized to {size}x{size}).")
    else:
        lines.append(UNKNOWN_DATA)
    if training:
        model = training.get("model") or {}
        lines += ["", "## Training procedure", "",
                  f"A {model.get('kind')} VAE (channels {model.get('channels')}"
                  + (f", layout `{model['layout']}`" if model.get("layout") else "") + "), "
                  f"{training.get('steps')} steps of batch {training.get('batch_size')} "
                  f"({training.get('images_seen')} images seen, {training.get('train_s')} s of training), "
                  f"{training.get('optimizer')} at learning rate {training.get('lr')}, mixed precision "
                  f"`{training.get('mixed_precision')}`, left-right flips {'on' if training.get('flip') else 'off'}; "
                  f"the exported weights are the EMA (decay {training.get('ema_decay')})."]
    lines += ["", "## Evaluation", "",
              "| metric | value |", "| --- | --- |",
              f"| split | {m.get('split', 'n/a')} ({m.get('n_images', 'n/a')} images) |",
              f"| negative log-likelihood, bits/dim (IWAE, K={m.get('k', 'n/a')}) | {_metric(m, 'nll_bpd')} |",
              f"| ELBO, bits/dim | {_metric(m, 'elbo_bpd')} |",
              f"| active latent units | {m.get('active_units', 'n/a')} |"]
    primary = (m.get("samples") or {}).get("primary") or {}
    if isinstance(primary.get("value"), (int, float)):
        lines.append(f"| {str(primary.get('metric')).upper()} of prior samples, temperature "
                     f"{primary.get('temperature')} | {_metric(primary, 'value')} ± {_metric(primary, 'stderr')} |")
    lines += ["", "Lower bits/dim is better; the values are true log-likelihoods of the 8-bit images."]
    if samples:
        lines += ["", "## Samples", "", f"![prior samples, seed 0]({samples})"]
    lines += _reduced_precision(card.get("validation") or {})
    lines += [
        "", "## Limitations", "",
        "Trained on the data above only: images unlike them (other crops, poses, sizes) get high bits/dim and poor "
        "reconstructions. Samples of a small model are blurry; their quality is measured above, not promised.",
        "", "## Use", "",
        "Decode latents drawn from N(0, I) with `decoder.onnx` (`z` float32 [N, latent_dim] -> `x_mean` float32 "
        "[N, 3, H, W] in [0, 1]), or encode images with `encoder.onnx`; with Python, `vae_runtime` needs only "
        "numpy, onnxruntime and fsspec:",
        "",
        "```python",
        "from vae_runtime import Decoder",
        "images = Decoder(\"THIS_FOLDER\").sample(16, seed=0)",
        "```",
        "", "## Files", "",
        "| graph | sha256 |",
        "| --- | --- |",
        graphs,
        "",
    ]
    if kind == "celeba" or kind is None:
        lines += ["## Data terms", "",
                  CELEBA_TERMS if kind == "celeba" else "If the training images were CelebA's: " + CELEBA_TERMS, ""]
    return "\n".join(lines)


def budgets_text(budget: dict, fidelity: dict) -> str:
    """The int8 graphs' two budgets in words, from their values (`vae.serving.quantize`)."""
    return (f"agreement with the float32 graph (mean absolute difference <= {255 * budget['mean_abs']:g}/255, "
            f"max <= {255 * budget['max_abs']:g}/255), or else the fidelity budget: held-out images reconstructed "
            f"with at most {fidelity['recon_increase']:.0%} more error than with the float32 graphs, and agreement "
            f"within {255 * fidelity['mean_abs']:g}/255 on average and {255 * fidelity['max_abs']:g}/255 everywhere")


def _reduced_precision(validation: dict) -> list[str]:
    """What the int8 graphs are held to and what they measured (nothing when the export wrote none)."""
    report = validation.get("int8")
    if not report:
        return []
    lines = ["", "## int8 graphs (CPUs)", "",
             "`decoder.int8.onnx` and `encoder.int8.onnx` run int8 weights and activations; apps choose them "
             "explicitly (`Decoder(folder, precision=\"int8\")`). Each met one of two budgets: "
             f"{budgets_text(report['budget'], report['fidelity_budget'])}. 8-bit activations through a trained "
             "decoder usually miss the first by a little; what an app sees of the model is how well it renders "
             "faces, which the second measures. The decoder's differences are the larger of those on prior draws "
             "and on codes of held-out images.", "",
             "| graph | budget met | mean abs difference | max abs difference | reconstruction error vs float32 |",
             "| --- | --- | --- | --- | --- |"]
    for graph in ("decoder", "encoder"):
        r = report[graph]
        lines.append(f"| `{graph_name(graph, 'int8')}` | {r['passed']} budget | {255 * r['mean_abs']:.2f}/255 | "
                     f"{255 * r['max_abs']:.1f}/255 | {r['recon_increase']:+.2%} |")
    return lines


def write_model_card(folder: Path, card: dict, samples: str | None = "samples.png") -> Path:
    return atomic_write_text(folder / "README.md", model_card_markdown(card, samples))
