"""VAE model, objectives, training, evaluation, export and the torch-free runtime."""
