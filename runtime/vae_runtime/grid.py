"""Image grids and PNG files with NumPy alone (no torch, no Pillow): used by evaluation and the runtime.

Images are uint8 [N, H, W, 3] or float [N, 3, H, W] in [0, 1]; `write_png` writes an 8-bit RGB PNG atomically.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from vae_runtime.atomic import atomic_write_bytes

__all__ = ["label", "make_grid", "png_bytes", "to_uint8_hwc", "write_png"]

def to_uint8_hwc(images: np.ndarray) -> np.ndarray:
    """float [N, 3, H, W] in [0, 1] (or uint8 [N, H, W, 3]) -> uint8 [N, H, W, 3]."""
    images = np.asarray(images)
    if images.dtype == np.uint8 and images.shape[-1] == 3:
        return images
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got shape {images.shape}")
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, ncols: int = 8, pad: int = 2) -> np.ndarray:
    """Tile images into one uint8 [H', W', 3] picture, `ncols` per row, with a white border."""
    images = to_uint8_hwc(images)
    n, h, w, _ = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


def label(picture: np.ndarray, text: str, height: int = 16) -> np.ndarray:
    """The picture with `text` written in black on a white strip above it (Pillow's built-in font). Pillow is
    imported here, not at the top: the torch-free runtime uses this module without it."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (picture.shape[1], height), "white")
    ImageDraw.Draw(strip).text((4, 2), text, fill="black")
    return np.concatenate([np.asarray(strip, dtype=np.uint8), picture], axis=0)


def png_bytes(picture: np.ndarray) -> bytes:
    picture = np.ascontiguousarray(picture, dtype=np.uint8)
    if picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"expected an RGB picture [H, W, 3], got shape {picture.shape}")
    h, w, _ = picture.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), picture.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) \
        + chunk(b"IEND", b"")


def write_png(path: str | os.PathLike, picture: np.ndarray) -> str:
    """Write an RGB picture as PNG, atomically (temporary file + rename)."""
    atomic_write_bytes(path, png_bytes(picture))
    return os.fspath(path)
