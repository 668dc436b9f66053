"""Image files as model inputs, preprocessed as the shards are: the step from a folder, a zip or one image file to
uint8 batches with their keys, which `vae encode` and `vae score` both take.

The images are listed by `pipeline.sources` (keys are file stems; duplicate keys and names a CelebA partition
leaves out are skipped with the listing's reasons), each is read under the `image` size cap and preprocessed by
`vae_runtime.preprocess`, as `vae data shard` does. An image that cannot be used is recorded as `{"key", "reason"}`
and left out; the rest go on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from vae_runtime.preprocess import SkipImage, preprocess
from pipeline.sources import Entry, open_source, read_image


def list_images(location: str) -> tuple[Callable[[str], bytes], list[Entry], list[dict]]:
    """(read an entry's bytes, the entries sorted by key, the files the listing leaves out) of a folder or zip of
    images (`pipeline.sources.open_source`, local or at a URL) or of one local image file."""
    if os.path.isfile(location) and not location.lower().endswith(".zip"):
        return read_image, [Entry(Path(location).stem, location, os.path.getsize(location))], []
    source = open_source(location)
    listing = source.listing()
    entries = sorted((e for split in listing.entries.values() for e in split), key=lambda e: e.key)
    return source.read, entries, list(listing.skipped)


def read_pixels(read: Callable[[str], bytes], name: str, crop: int, size: int) -> np.ndarray | str:
    """The image `name` as uint8 [size, size, 3] (center crop `crop`, resized to `size`), or the reason it cannot
    be used: over the `image` cap, not an image, too small, unreadable."""
    try:
        return preprocess(read(name), crop, size)
    except SkipImage as err:
        return str(err)
    except OSError as err:
        return f"unreadable: {err}"


def image_batches(location: str, crop: int, size: int, batch_size: int,
                  skipped: list[dict]) -> Iterator[tuple[list[str], np.ndarray]]:
    """(keys, uint8 [n, size, size, 3]) batches of the images at `location` in key order, at most `batch_size`
    each; every image left out is appended to `skipped` as {"key", "reason"}."""
    read, entries, left_out = list_images(location)
    skipped.extend(left_out)
    keys, pixels = [], []
    for entry in entries:
        image = read_pixels(read, entry.name, crop, size)
        if isinstance(image, str):
            skipped.append({"key": entry.key, "reason": image})
            continue
        keys.append(entry.key)
        pixels.append(image)
        if len(keys) == batch_size:
            yield keys, np.stack(pixels)
            keys, pixels = [], []
    if keys:
        yield keys, np.stack(pixels)
