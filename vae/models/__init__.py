"""The models: a convolutional VAE and a top-down hierarchical VAE, built from shared blocks, both presenting
the interface the objectives need (`vae.models.protocol.VAEModel`). `build_model(cfg)` picks one by `cfg.kind`."""

from __future__ import annotations

from vae.config import ModelConfig
from vae.models.protocol import VAEModel


def build_model(cfg: ModelConfig) -> VAEModel:
    """The model `cfg.kind` names; both kinds present the same interface to objectives, training and export."""
    from vae.models.conv import ConvVAE
    from vae.models.hierarchical import HierarchicalVAE

    kinds = {"conv": ConvVAE, "hierarchical": HierarchicalVAE}
    return kinds[cfg.kind](cfg)
