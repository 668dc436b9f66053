"""Image preprocessing for sharding: decode, convert to RGB, center crop, antialiased resize.

`preprocess(data, crop, size)` returns a uint8 array [size, size, 3] or raises `SkipImage` with a reason.
Conversions where meaningful: grayscale, palette, CMYK and 16-bit to RGB; alpha composited on white.
A smaller image than the crop is cropped to its largest centred square; below `size` it is skipped.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs with a clear skip reason

DEFAULT_CROP = 148  # CelebA's aligned faces: the centred square that holds the face (0: the largest square)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")  # what we decode


class SkipImage(Exception):
    """The input cannot be used; the message is the reason recorded in the manifest."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16 bits by their format, whatever their values
        return Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode == "I":  # 32-bit integers: 16-bit data when any value passes 255
        arr = np.asarray(img)
        high = arr.max(initial=0) > 255
        arr = np.clip(arr >> 8 if high else arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def preprocess(data: bytes, crop: int, size: int) -> np.ndarray:
    """Bytes of an image file -> uint8 [size, size, 3] (center crop `crop`, resize to `size`)."""
    if not data:
        raise SkipImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # decode now: truncated or corrupt data fails here
    except Image.DecompressionBombError as err:
        raise SkipImage(f"too large: {err}") from None
    except Exception as err:  # PIL raises many types for bad data
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", reason)  # the same on every run
        raise SkipImage(f"not a readable image: {reason}") from None
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    try:
        img = ImageOps.exif_transpose(img)  # upright as a viewer shows it (an EXIF orientation tag)
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels decoded, so keep them as stored
        pass
    img = _to_rgb(img)
    width, height = img.size
    side = min(crop, width, height) if crop > 0 else min(width, height)
    if side < size:
        raise SkipImage(f"too small: {width}x{height}, needs at least {size}x{size}")
    left = (width - side) // 2
    top = (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)  # PIL filters antialias when shrinking
    return np.asarray(img, dtype=np.uint8)
