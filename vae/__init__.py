"""VAE models (vae/models), the core they build on (vae/core), training, evaluation, export and publication, and
the command line (vae/cli). The torch-free runtime is its own package, `vae_runtime` (runtime/)."""
