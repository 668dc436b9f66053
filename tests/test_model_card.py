"""The model card in Hugging Face's format, written from what the run used: its front matter parses as YAML with
the license, datasets and measured figures of the card, and CelebA's terms appear for CelebA only (and, said as a
condition, where the data's kind was not recorded)."""

from __future__ import annotations

import pytest
import yaml

from vae.serving.model_card import model_card_markdown

TERMS = "non-commercial research purposes only"


def card_for(data: dict | None) -> dict:
    return {"version": "v7", "image_size": 64, "latent_dim": 128, "likelihood": "logistic_mixture", "step": 300,
            "created": "2026-01-01T00:00:00+00:00", "config_hash": "abc", "data": data,
            "preprocessing": {"crop": 148, "size": 64},
            "metrics": {"split": "test", "n_images": 500, "k": 100, "nll_bpd": 4.41, "elbo_bpd": 4.52,
                        "samples": {"primary": {"metric": "kid", "temperature": 0.8, "value": 0.035,
                                                "stderr": 0.003}}},
            "training": {"model": {"kind": "conv", "channels": [32, 64]}, "steps": 300, "images_seen": 9600,
                         "train_s": 600.0, "batch_size": 32, "optimizer": "adamw", "lr": 0.002,
                         "mixed_precision": "no", "flip": True, "ema_decay": 0.999},
            "files": ["decoder.onnx"], "sha256": {"decoder.onnx": "f" * 64}}


def parts(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.mark.parametrize("data, license_, terms", [
    ({"kind": "celeba", "name": "CelebA"}, "other", "always"),
    ({"kind": "synthetic", "name": "vae-synthetic-faces"}, "apache-2.0", "never"),
    ({"kind": "images", "name": "holiday-photos"}, "unknown", "never"),
    (None, "unknown", "conditional")])
def test_the_front_matter_and_terms_follow_the_training_data(data, license_, terms):
    meta, body = parts(model_card_markdown(card_for(data)))
    assert meta["license"] == license_ and meta["library_name"] == "onnx"
    assert ("datasets" in meta) == (data is not None and data["kind"] == "celeba")
    [result] = meta["model-index"][0]["results"]
    figures = {m["type"]: m["value"] for m in result["metrics"]}
    assert figures == {"nll_bpd": 4.41, "elbo_bpd": 4.52, "kid": 0.035}
    assert result["dataset"]["split"] == "test"
    assert {"always": TERMS in body and "If the training images" not in body,
            "never": TERMS not in body,
            "conditional": "If the training images were CelebA's" in body}[terms]
    for section in ("## Intended use", "## Training data", "## Training procedure", "## Evaluation",
                    "## Limitations", "## Use", "## Files"):
        assert section in body, section
    if data and data["kind"] == "images":
        assert "holiday-photos" in body and "face" not in body.split("## Intended use")[0]


def test_the_procedure_says_how_the_weights_were_trained():
    _, body = parts(model_card_markdown(card_for({"kind": "synthetic", "name": "s"})))
    procedure = body.split("## Training procedure")[1].split("##")[0]
    assert "300 steps of batch 32" in procedure and "adamw at learning rate 0.002" in procedure
    assert "9600 images seen" in procedure and "EMA (decay 0.999)" in procedure
