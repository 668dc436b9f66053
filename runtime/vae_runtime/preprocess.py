"""Images as the models were trained on them: decode, convert to RGB, center crop, antialiased resize, to uint8
[size, size, 3]. The one implementation: sharding (`pipeline.shard`, `pipeline.images`) and
`Encoder.encode_images` both call it, so an app's images reach the model with the bytes the shards hold.

`preprocess(data, crop, size)` takes the bytes of an image file, `crop_resize(pixels, crop, size)` uint8 pixels
[H, W, 3]; both raise `SkipImage` with a reason. Conversions where meaningful: grayscale, palette, CMYK and 16-bit
to RGB; alpha composited on white; an EXIF orientation applied. A smaller image than the crop is cropped to its
largest centred square; below `size` it is refused.

Pillow is the runtime's optional `images` extra (`pip install "vae-runtime[images]"`), imported here alone and
only on first use (`pillow()`): without it these functions raise one line saying how to install it.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np

from vae_runtime.errors import RuntimeModelError, one_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")  # what we decode

MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs with a clear reason (Pillow's own default is lower)


class SkipImage(Exception):
    """The input cannot be used; the message is the reason (sharding records it in the manifest)."""


def pillow():
    """PIL's `Image` and `ImageOps` modules, with the decompression-bomb limit set; one line when Pillow is missing."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise RuntimeModelError('images: preprocessing needs Pillow, which is not installed '
                                '(pip install "vae-runtime[images]")') from None
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    return Image, ImageOps


def _to_rgb(img):
    Image, _ = pillow()
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


def decode(data: bytes):
    """Bytes of an image file -> an RGB PIL image, upright as a viewer shows it (its first frame)."""
    Image, ImageOps = pillow()
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
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", one_line(err))  # the same on every run
        raise SkipImage(f"not a readable image: {reason}") from None
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    try:
        img = ImageOps.exif_transpose(img)  # upright as a viewer shows it (an EXIF orientation tag)
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels decoded, so keep them as stored
        pass
    return _to_rgb(img)


def _crop_resize(img, crop: int, size: int) -> np.ndarray:
    """An RGB PIL image -> uint8 [size, size, 3]: its centred square of side `crop` (0: the largest), resized."""
    Image, _ = pillow()
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


def preprocess(data: bytes, crop: int, size: int) -> np.ndarray:
    """Bytes of an image file -> uint8 [size, size, 3] (center crop `crop`, resize to `size`)."""
    return _crop_resize(decode(data), crop, size)


def crop_resize(pixels: np.ndarray, crop: int, size: int) -> np.ndarray:
    """uint8 RGB pixels [H, W, 3] -> uint8 [size, size, 3], as `preprocess` does after decoding: an image already
    [size, size, 3] comes back unchanged."""
    Image, _ = pillow()
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise SkipImage(f"expected uint8 RGB pixels [H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    return _crop_resize(Image.fromarray(np.ascontiguousarray(pixels), "RGB"), crop, size)
