"""Prefect flows: `train-vae` chains shard, train, evaluate, export, validate and promote."""
