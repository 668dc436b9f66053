"""The models: a convolutional VAE and a top-down hierarchical VAE (one group per resolution, or VDVAE-style
many per resolution with `model.layout`), built from shared blocks, all presenting the interface the objectives
need (`vae.models.protocol.VAEModel`). `build_model(cfg)` picks one by `cfg.kind` and `cfg.layout`."""

from __future__ import annotations

from vae.core.config import ModelConfig
from vae.models.conv import ConvVAE
from vae.models.hierarchical import HierarchicalVAE
from vae.models.protocol import VAEModel
from vae.models.vdvae import VDVAE


def build_model(cfg: ModelConfig) -> VAEModel:
    """The model `cfg.kind` names; both kinds present the same interface to objectives, training and export."""
    if cfg.kind == "hierarchical" and cfg.layout.strip():
        return VDVAE(cfg)  # many groups per resolution, from model.layout
    kinds = {"conv": ConvVAE, "hierarchical": HierarchicalVAE}
    return kinds[cfg.kind](cfg)
