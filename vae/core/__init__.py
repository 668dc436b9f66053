"""The core: what every layer above builds on, plain PyTorch and testable on CPU in milliseconds: the
configuration, the objectives, a run folder and its checkpoints, and the process group's helpers."""
