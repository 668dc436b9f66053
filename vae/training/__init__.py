"""Training with Accelerate: the loop (`train.py`), its steps, the EMA of the weights."""
