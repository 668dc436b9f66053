"""Image preprocessing for sharding: decode, convert to RGB, center crop, antialiased resize.

`preprocess(data, crop, size)` returns a uint8 array [size, size, 3] or raises `SkipImage` with a reason. It is the
runtime's (`vae_runtime.preprocess`), so an app's `Encoder.encode_images` gives the model the bytes the shards hold;
that module says which conversions it makes and what it refuses.
"""

from __future__ import annotations

from vae_runtime.preprocess import SkipImage, preprocess  # noqa: F401  (the pipeline's names for them)
from vae_runtime.schemas import DEFAULT_CROP  # noqa: F401  (the crop sharding applies unless told)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")  # what we decode
