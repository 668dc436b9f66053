"""The human-readable model card, `README.md` beside `model.json`: what the model is, how it measured, how to
use it, and the terms of the data it learned from. Written after validation, from the card's own values."""

from __future__ import annotations

from pathlib import Path

from vae_runtime.atomic import atomic_write_text

CELEBA_TERMS = ("CelebA is available for non-commercial research purposes only (see the data set's agreement at "
                "mmlab.ie.cuhk.edu.hk/projects/CelebA.html). A model trained on it inherits those terms: research "
                "use only, no commercial use, no redistribution of the images.")


def _metric(metrics: dict, key: str, fmt: str = "{:.4f}") -> str:
    value = metrics.get(key)
    return fmt.format(value) if isinstance(value, (int, float)) else "n/a"


def model_card_markdown(card: dict, samples: str | None = "samples.png") -> str:
    m = card.get("metrics") or {}
    graphs = "\n".join(f"| `{name}` | `{card.get('sha256', {}).get(name, 'n/a')}` |" for name in card.get("files", []))
    lines = [
        f"# VAE {card.get('version')}",
        "",
        f"A variational autoencoder for {card.get('image_size')}x{card.get('image_size')} RGB face images, "
        f"latent size {card.get('latent_dim')}, `{card.get('likelihood')}` likelihood; exported "
        f"{card.get('created')} from the EMA weights of step {card.get('step')} (config hash "
        f"`{card.get('config_hash')}`).",
        "",
        "## Measured",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| split | {m.get('split', 'n/a')} ({m.get('n_images', 'n/a')} images) |",
        f"| negative log-likelihood, bits/dim (IWAE, K={m.get('k', 'n/a')}) | {_metric(m, 'nll_bpd')} |",
        f"| ELBO, bits/dim | {_metric(m, 'elbo_bpd')} |",
        f"| active latent units | {m.get('active_units', 'n/a')} |",
        "",
        "Lower bits/dim is better; the values are true log-likelihoods of the 8-bit images.",
    ]
    if samples:
        lines += ["", "## Samples", "", f"![prior samples, seed 0]({samples})"]
    lines += _reduced_precision(card.get("validation") or {})
    lines += [
        "", "## Use",
        "",
        "Decode latents drawn from N(0, I) with `decoder.onnx` (`z` float32 [N, latent_dim] -> `x_mean` float32 "
        "[N, 3, H, W] in [0, 1]), or encode images with `encoder.onnx`; with Python, `vae_runtime` needs only "
        "numpy and onnxruntime:",
        "",
        "```python",
        "from vae_runtime import Decoder",
        "images = Decoder(\"THIS_FOLDER\").sample(16, seed=0)",
        "```",
        "",
        "Intended use: research on generative models of faces, image compression and representation learning. "
        "Not for identifying people, not for decisions about people, and not as a source of realistic faces: "
        "samples show the biases of the training data.",
        "",
        "## Files",
        "",
        "| graph | sha256 |",
        "| --- | --- |",
        graphs,
        "",
        "## Data terms",
        "",
        CELEBA_TERMS,
        "",
    ]
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
        lines.append(f"| `{graph}.int8.onnx` | {r['passed']} budget | {255 * r['mean_abs']:.2f}/255 | "
                     f"{255 * r['max_abs']:.1f}/255 | {r['recon_increase']:+.2%} |")
    return lines


def write_model_card(folder: Path, card: dict, samples: str | None = "samples.png") -> Path:
    return atomic_write_text(folder / "README.md", model_card_markdown(card, samples))
