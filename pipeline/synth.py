"""Synthetic face data set in CelebA's on-disk layout (no download).

This module owns the stand-in for CelebA used by ``make demo`` and the tests.
:func:`synthesize` draws ``n`` cartoon faces with Pillow whose 40 binary labels
really drive the picture (hair colour, baldness, smile, open mouth, glasses,
beard, hat, pale skin, ...) and writes them exactly like the real distribution::

    out/img_align_celeba/000001.jpg ...  178x218 RGB JPEGs
    out/list_eval_partition.txt          "000001.jpg 0"  (0 train, 1 valid, 2 test)
    out/list_attr_celeba.txt             n, the 40 names, "000001.jpg -1  1 ..."
    out/identity_CelebA.txt              "000001.jpg 17"

The face fills the central 148x148 crop used for training. Images of one
identity share face geometry and skin tone. Every file is written atomically
and the output is a pure function of ``(n, seed)``: reruns are byte-identical.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vae_runtime.atomic import atomic_file, atomic_write_bytes
from pipeline.sources import DATASET_FILE
from vae_runtime.errors import BadInput
from vae_runtime.storage import remove_stale_temps

ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald",
    "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)
W, H = 178, 218  # CelebA's aligned image size
# Attributes drawn independently per image, with roughly CelebA's frequencies.
_INDEPENDENT = {
    "Arched_Eyebrows": .27, "Attractive": .51, "Bags_Under_Eyes": .20, "Bangs": .15,
    "Big_Lips": .24, "Big_Nose": .23, "Blurry": .05, "Bushy_Eyebrows": .14, "Chubby": .06,
    "Double_Chin": .05, "Eyeglasses": .13, "Narrow_Eyes": .12, "Oval_Face": .28,
    "Pointy_Nose": .28, "Rosy_Cheeks": .07, "Wearing_Hat": .05, "Wearing_Necklace": .12,
    "Young": .77,
}
# Hair colour label (None: no colour label, drawn auburn), probability, RGB.
_HAIR = (("Black_Hair", .27, (30, 24, 22)), ("Blond_Hair", .17, (226, 194, 120)),
         ("Brown_Hair", .22, (100, 62, 36)), ("Gray_Hair", .05, (180, 178, 174)),
         (None, .29, (170, 58, 24)))
_YY, _XX = np.mgrid[0:H, 0:W].astype(np.float32)
_YY, _XX = _YY / H - .5, _XX / W - .5


def _pick_hair(rng: np.random.Generator) -> int:
    return int(rng.choice(len(_HAIR), p=[h[1] for h in _HAIR]))


def _identity(rng: np.random.Generator) -> dict:
    """Per-identity traits: sex, skin tone, face geometry, natural hair."""
    t, pale = rng.random() ** 2.5, np.array([252, 232, 222]) - rng.uniform(0, 12, 3)
    return {"male": bool(rng.random() < .42), "pale": bool(rng.random() < .06),
            "skin": (1 - t) * np.array([232, 190, 158]) + t * np.array([118, 78, 52]),
            "pale_skin": pale, "rx": rng.uniform(46, 54),
            "ry": rng.uniform(60, 70), "eye_dx": rng.uniform(.36, .42),
            "eye_y": rng.uniform(-.17, -.09), "mouth_w": rng.uniform(.28, .36),
            "iris": [(70, 45, 25), (60, 100, 150), (70, 110, 70), (40, 30, 25)][rng.integers(4)],
            "hair": _pick_hair(rng), "long_m": bool(rng.random() < .08),
            "long_f": bool(rng.random() < .85)}


def _attributes(rng: np.random.Generator, idt: dict) -> dict:
    """Sample one image's 40 labels (as bools), consistent with its identity."""
    a = {k: bool(rng.random() < p) for k, p in _INDEPENDENT.items()}
    m = a["Male"] = idt["male"]
    a["Pale_Skin"] = idt["pale"]
    hair = idt["hair"] if rng.random() < .7 else _pick_hair(rng)
    bald = a["Bald"] = m and bool(rng.random() < .05)
    for i, (name, _, _) in enumerate(_HAIR):
        if name:
            a[name] = not bald and i == hair
    wave = rng.random()
    a["Wavy_Hair"], a["Straight_Hair"] = not bald and wave < .32, not bald and .32 <= wave < .53
    a["Bangs"] &= not bald
    a["Receding_Hairline"] = not bald and bool(rng.random() < (.14 if m else .04))
    beard = m and bool(rng.random() < .36)
    a["No_Beard"] = not beard
    a["Goatee"] = beard and bool(rng.random() < .35)
    a["Sideburns"] = beard and bool(rng.random() < .3)
    a["Mustache"] = m and bool(rng.random() < (.3 if beard else .03))
    a["5_o_Clock_Shadow"] = m and not beard and bool(rng.random() < .25)
    a["Wearing_Lipstick"] = not m and bool(rng.random() < .8)
    a["Heavy_Makeup"] = not m and bool(rng.random() < .65)
    a["Wearing_Earrings"] = not m and bool(rng.random() < .32)
    a["Wearing_Necktie"] = m and bool(rng.random() < .16)
    a["Smiling"] = bool(rng.random() < .48)
    a["Mouth_Slightly_Open"] = bool(rng.random() < (.7 if a["Smiling"] else .25))
    a["High_Cheekbones"] = bool(rng.random() < (.8 if a["Smiling"] else .1))
    return a


def _rgb(c, f: float = 1.0) -> tuple[int, int, int]:
    """Colour ``c`` scaled by ``f``, clipped to a valid RGB triple."""
    return tuple(int(min(255, max(0, round(v * f)))) for v in c)


def _mix(c1, c2, t: float) -> tuple[int, int, int]:
    return _rgb([(1 - t) * u + t * v for u, v in zip(c1, c2)])


def _hair_outline(cx, hcy, hrx, hry, bottom, wavy, straight) -> list[tuple[float, float]]:
    """Closed outline of the hair mass: a dome over the head, sides down to ``bottom``."""
    pts = []
    for k in range(37):  # dome, left to right over the top
        th = math.pi + math.pi * k / 36
        r = 1 + (.035 * math.sin(12 * th) if wavy else 0)
        pts.append((cx + hrx * r * math.cos(th), hcy + hry * r * math.sin(th)))
    side = [hcy + (bottom - hcy) * k / 8 for k in range(1, 9)]
    flare = 0 if straight else 6
    for sx, ys in ((1, side), (-1, side[::-1])):
        for y in ys:
            dx = 4 * math.sin(y / 5) if wavy else 0
            pts.append((cx + sx * (hrx + flare * (y - hcy) / max(1, bottom - hcy)) + dx, y))
    return pts


@dataclass
class _Face:
    """One face being drawn: the canvas, the random stream, its labels and identity, and its geometry."""
    d: ImageDraw.ImageDraw
    rng: np.random.Generator
    a: dict
    idt: dict
    cx: float
    cy: float
    rx: float
    ry: float
    skin: tuple
    hair: tuple
    dark: tuple
    hcy: float = 0.0  # the centre of the hair's dome
    ey: float = 0.0  # the eyes' height


def _draw(rng: np.random.Generator, idt: dict, a: dict) -> Image.Image:
    """Render one face for labels ``a``; all randomness comes from ``rng``, drawn in a fixed order."""
    s = rng.uniform(.96, 1.04)
    cx, cy = 89 + rng.normal(0, 2), 115 + rng.normal(0, 2)
    rx = idt["rx"] * s * (1.08 if a["Chubby"] else .95 if a["Oval_Face"] else 1) * (
        1.03 if a["Male"] else 1)
    ry = idt["ry"] * s * (1.04 if a["Oval_Face"] else 1)
    # Background: a smooth linear gradient between two random colours.
    c0, c1, ang = rng.uniform(40, 230, 3), rng.uniform(40, 230, 3), rng.uniform(0, 2 * math.pi)
    t = np.clip(_XX * math.cos(ang) + _YY * math.sin(ang) + .5, 0, 1)[..., None]
    img = Image.fromarray((c0 + t * (c1 - c0)).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    skin = _rgb(idt["pale_skin" if a["Pale_Skin"] else "skin"] + rng.normal(0, 4, 3))
    hair_rgb = next(c for name, _, c in _HAIR if name is None or a[name])
    hair = _rgb(np.array(hair_rgb) + rng.normal(0, 8, 3))
    dark = _mix(hair, (40, 30, 25), .6)  # beard / eyebrow colour
    f = _Face(d, rng, a, idt, cx, cy, rx, ry, skin, hair, dark)
    for part in (_body_and_back_hair, _face_and_facial_hair, _hairline, _eyes, _nose_and_mouth, _accessories):
        part(f)
    return img.filter(ImageFilter.GaussianBlur(2.2 if a["Blurry"] else .6))


def _body_and_back_hair(f: _Face) -> None:
    """Clothes, neck, back hair and ears."""
    d, rng, a, idt, cx, cy, rx, ry, skin, hair = f.d, f.rng, f.a, f.idt, f.cx, f.cy, f.rx, f.ry, f.skin, f.hair
    cloth = _rgb(rng.uniform(20, 235, 3))
    d.ellipse((cx - 1.9 * rx, cy + 1.25 * ry, cx + 1.9 * rx, cy + 3.2 * ry), fill=cloth)
    d.rectangle((cx - .42 * rx, cy + .5 * ry, cx + .42 * rx, cy + 1.4 * ry), fill=_rgb(skin, .86))
    if a["Wearing_Necktie"]:
        d.polygon([(cx - 6, cy + 1.3 * ry), (cx + 6, cy + 1.3 * ry), (cx, cy + 1.7 * ry)],
                  fill=_rgb(rng.uniform(20, 200, 3)))
    if a["Wearing_Necklace"]:
        d.arc((cx - .42 * rx, cy + .9 * ry, cx + .42 * rx, cy + 1.25 * ry), 20, 160,
              fill=(235, 215, 120), width=2)
    hcy = cy - .1 * ry
    if not a["Bald"]:
        bottom = cy + (1.3 if idt["long_m" if a["Male"] else "long_f"] else .05) * ry
        d.polygon(_hair_outline(cx, hcy, 1.16 * rx, 1.08 * ry, bottom, a["Wavy_Hair"],
                                a["Straight_Hair"]), fill=hair)
    ey = cy + idt["eye_y"] * ry
    for sx in (-1, 1):
        d.ellipse((cx + sx * rx - 7, ey - 8, cx + sx * rx + 7, ey + 14), fill=skin)
        if a["Wearing_Earrings"]:
            d.ellipse((cx + sx * rx - 3, ey + 14, cx + sx * rx + 3, ey + 20), fill=(240, 200, 60))
    f.hcy, f.ey = hcy, ey


def _face_and_facial_hair(f: _Face) -> None:
    """The face, beards and stubble, sideburns, a double chin."""
    d, a, cx, cy, rx, ry, skin, dark = f.d, f.a, f.cx, f.cy, f.rx, f.ry, f.skin, f.dark
    ey = f.ey
    face = (cx - rx, cy - ry, cx + rx, cy + ry)
    d.ellipse(face, fill=skin)
    # Facial hair: a darker jaw region for beards, a lighter shade for stubble.
    if not a["No_Beard"]:
        d.chord(face, 12, 168, fill=dark)
    elif a["5_o_Clock_Shadow"]:
        d.chord(face, 15, 165, fill=_mix(skin, dark, .22))
    if a["Sideburns"]:
        for sx in (-1, 1):
            x0, x1 = sorted((cx + sx * rx * .97, cx + sx * rx * .8))
            d.rectangle((x0, ey, x1, cy + .35 * ry), fill=dark)
    if a["Double_Chin"]:
        d.arc((cx - .4 * rx, cy + .75 * ry, cx + .4 * rx, cy + 1.05 * ry), 20, 160,
              fill=_rgb(skin, .75), width=2)


def _hairline(f: _Face) -> None:
    """Hair over the forehead (a chord of the dome, cut at the hairline), or a bald scalp's shine."""
    d, a, cx, cy, rx, ry, skin, hair = f.d, f.a, f.cx, f.cy, f.rx, f.ry, f.skin, f.hair
    hcy = f.hcy
    # Hair over the forehead: a chord of the dome, cut at the hairline.
    if not a["Bald"]:
        hl = cy - (.36 if a["Bangs"] else .78 if a["Receding_Hairline"] else .6) * ry
        sa = math.degrees(math.asin(max(-1, min(1, (hcy - hl) / (1.02 * ry)))))
        d.chord((cx - 1.04 * rx, hcy - 1.02 * ry, cx + 1.04 * rx, hcy + 1.02 * ry),
                180 + sa, 360 - sa, fill=hair)
    else:
        shine = _rgb(skin, 1.12)  # highlight on the bald scalp
        d.ellipse((cx - .35 * rx, cy - .95 * ry, cx + .1 * rx, cy - .75 * ry), fill=shine)


def _eyes(f: _Face) -> None:
    """Eyes, eyebrows, cheeks."""
    d, a, idt, cx, cy, rx, ry, skin, dark = f.d, f.a, f.idt, f.cx, f.cy, f.rx, f.ry, f.skin, f.dark
    ey = f.ey
    # Eyes, eyebrows, cheeks.
    eh = 3 if a["Narrow_Eyes"] else 5
    brow_w = (5 if a["Bushy_Eyebrows"] else 2) + a["Male"]
    for sx in (-1, 1):
        ex = cx + sx * idt["eye_dx"] * rx
        if a["Heavy_Makeup"]:
            d.ellipse((ex - 11, ey - 9, ex + 11, ey + 3), fill=_mix(skin, (90, 50, 110), .45))
        if a["Bags_Under_Eyes"]:
            d.arc((ex - 9, ey - 2, ex + 9, ey + eh + 5), 20, 160, fill=_rgb(skin, .7), width=2)
        d.ellipse((ex - 9, ey - eh, ex + 9, ey + eh), fill=(245, 245, 240))
        d.ellipse((ex - 4, ey - 4, ex + 4, ey + 4), fill=idt["iris"])
        d.ellipse((ex - 2, ey - 2, ex + 2, ey + 2), fill=(10, 10, 10))
        lift = 4 if a["Arched_Eyebrows"] else 1
        by = ey - 12
        d.line([(ex - sx * 11, by + 2), (ex, by - lift), (ex + sx * 11, by + 2)],
               fill=dark, width=brow_w, joint="curve")
        if not a["Young"]:
            d.line([(ex + sx * 12, ey - 1), (ex + sx * 16, ey + 2)], fill=_rgb(skin, .75))
        if a["Rosy_Cheeks"] or a["High_Cheekbones"]:
            blush = _mix(skin, (235, 90, 100), .45 if a["Rosy_Cheeks"] else .12)
            d.ellipse((ex - 9, cy + .15 * ry, ex + 9, cy + .3 * ry + 6), fill=blush)


def _nose_and_mouth(f: _Face) -> None:
    """The nose; the mouth: flat line or upward arc, optionally open; lipstick makes it red."""
    d, a, idt, cx, cy, rx, ry, skin, dark = f.d, f.a, f.idt, f.cx, f.cy, f.rx, f.ry, f.skin, f.dark
    ey = f.ey
    # Nose.
    ny, nw = cy + .24 * ry, 8 if a["Big_Nose"] else 5
    d.line([(cx, ey + 2), (cx - 3, ny - (0 if a["Pointy_Nose"] else 3)), (cx, ny)],
           fill=_rgb(skin, .72), width=2)
    for sx in (-1, 1):
        d.ellipse((cx + sx * nw - 2, ny - 2, cx + sx * nw + 2, ny + 1), fill=_rgb(skin, .6))
    # Mouth: flat line or upward arc, optionally open; lipstick makes it red.
    my, mw = cy + .5 * ry, idt["mouth_w"] * rx
    lip = (190, 25, 45) if a["Wearing_Lipstick"] else _rgb(np.array(skin) * (.68, .42, .42))
    lw, gape = 5 if a["Big_Lips"] else 3, (70, 15, 20)
    if a["Mustache"]:
        d.line([(cx - mw * .9, my - 7), (cx + mw * .9, my - 7)], fill=dark, width=6)
    if a["Goatee"]:
        d.ellipse((cx - 9, my + 5, cx + 9, my + 22), fill=dark)
    if a["Smiling"] and a["Mouth_Slightly_Open"]:
        d.chord((cx - mw, my - 12, cx + mw, my + 10), 0, 180, fill=gape, outline=lip, width=lw)
        d.line([(cx - mw * .7, my + 1), (cx + mw * .7, my + 1)], fill=(245, 245, 240), width=3)
    elif a["Smiling"]:
        d.arc((cx - mw, my - 16, cx + mw, my + 6), 15, 165, fill=lip, width=lw + 1)
    elif a["Mouth_Slightly_Open"]:
        d.ellipse((cx - .55 * mw, my - 5, cx + .55 * mw, my + 6), fill=gape, outline=lip,
                  width=lw - 1)
    else:
        d.line([(cx - .85 * mw, my), (cx + .85 * mw, my)], fill=lip, width=lw)


def _accessories(f: _Face) -> None:
    """Glasses (frames, sometimes tinted, a bridge and temples) and a hat (crown and brim)."""
    d, rng, a, idt, cx, cy, rx, ry = f.d, f.rng, f.a, f.idt, f.cx, f.cy, f.rx, f.ry
    ey = f.ey
    # Glasses: frames (sometimes tinted) joined by a bridge, plus temples.
    if a["Eyeglasses"]:
        frame, tint = _rgb(rng.uniform(10, 60, 3)), rng.random() < .25
        ex0, ex1 = cx - idt["eye_dx"] * rx, cx + idt["eye_dx"] * rx
        for ex in (ex0, ex1):
            d.rounded_rectangle((ex - 14, ey - 10, ex + 14, ey + 10), 6, outline=frame, width=3,
                                fill=(25, 25, 35) if tint else None)
        d.line([(ex0 + 14, ey - 3), (ex1 - 14, ey - 3)], fill=frame, width=3)
        d.line([(ex0 - 14, ey - 4), (cx - rx + 1, ey - 6)], fill=frame, width=3)
        d.line([(ex1 + 14, ey - 4), (cx + rx - 1, ey - 6)], fill=frame, width=3)
    # Hat: crown and brim over the top of the head.
    if a["Wearing_Hat"]:
        hat, brim = _rgb(rng.uniform(20, 230, 3)), cy - .66 * ry
        d.rounded_rectangle((cx - .95 * rx, cy - 1.2 * ry, cx + .95 * rx, brim + 7), 16, fill=hat)
        d.ellipse((cx - 1.4 * rx, brim - 6, cx + 1.4 * rx, brim + 8), fill=_rgb(hat, .75))


IN_PROGRESS = ".synthesizing"  # in the folder while `synthesize` writes it
MAX_N = 999_999  # file names have six digits, as CelebA's (000001.jpg ... 202599.jpg)
LISTS = ("list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt")
# What the data are, for shards and model cards (`pipeline.sources.DATASET_FILE`): in CelebA's layout, not CelebA
DATASET_RECORD = {"kind": "synthetic", "name": "vae-synthetic-faces",
                  "description": "synthetic faces drawn by `vae data synth` (no person's image), in CelebA's layout"}


class _Shuffle:
    """A seeded permutation of ``range(n)`` computed one index at a time: no table, so memory does not grow
    with n. A few rounds of bijections of the integers below the next power of two (an odd multiplier and an
    offset, then the high bits folded into the low ones), repeated until the value falls below n: a bijection
    of ``range(n)`` as well (cycle walking)."""

    def __init__(self, n: int, rng: np.random.Generator, rounds: int = 4):
        self.n, self.bits = n, max(1, (n - 1).bit_length())
        self.mask = (1 << self.bits) - 1
        self.keys = [(int(rng.integers(self.mask + 1)) | 1, int(rng.integers(self.mask + 1))) for _ in range(rounds)]

    def _mix(self, x: int) -> int:
        for a, c in self.keys:
            x = (x * a + c) & self.mask
            x ^= x >> (self.bits // 2 + 1)
        return x

    def __call__(self, i: int) -> int:
        x = self._mix(i)
        while x >= self.n:
            x = self._mix(x)
        return x


def synthesize(out: str | os.PathLike, n: int, seed: int = 0) -> dict:
    """Write n synthetic faces in CelebA's layout under out; return a summary dict.

    The summary is ``{"n": n, "out": str(out), "splits": {"train": a, "valid": b,
    "test": c}}``. Splits are about 80/10/10 (each non-empty when ``n >= 10``),
    identities are ``1..max(1, n // 20)``, each given to n // 20 or so images. Same ``(n, seed)`` => same bytes.
    n is at most MAX_N. Each image and its line in each list are written before the next image is drawn (the
    lists stream into temporary files, renamed at the end), so memory does not grow with n. While it writes,
    ``IN_PROGRESS`` marks the folder (a set cut short by a kill is written again, not taken for a data set).
    """
    if not 1 <= n <= MAX_N:
        raise BadInput(f"n: must be in [1, {MAX_N}] (six-digit file names, as CelebA's), got {n}")
    root = Path(out)
    img_dir = root / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / IN_PROGRESS).touch()
    remove_stale_temps(str(root), LISTS.__contains__)  # what a killed run left
    remove_stale_temps(str(img_dir), lambda name: name.endswith(".jpg"))
    plan = np.random.default_rng([seed, 0])
    identity_of, split_of = _Shuffle(n, plan), _Shuffle(n, plan)
    n_identities = max(1, n // 20)
    n_val = n_test = round(n * .1)
    first_valid, first_test = n - n_val - n_test, n - n_test
    counts = [0, 0, 0]
    # binary files: a line is copied into the file's buffer at once (a text file keeps its pending lines)
    with (atomic_file(root / LISTS[0]) as partition, atomic_file(root / LISTS[1]) as attr_list,
          atomic_file(root / LISTS[2]) as identity_list):
        attr_list.write(f"{n}\n{' '.join(ATTRIBUTES)}\n".encode())
        for i in range(n):
            name, ident, order = f"{i + 1:06d}.jpg", identity_of(i) % n_identities + 1, split_of(i)
            split = 0 if order < first_valid else 1 if order < first_test else 2
            idt = _identity(np.random.default_rng([seed, 1, ident]))  # the same traits for each of its images
            rng = np.random.default_rng([seed, 2, i])
            a = _attributes(rng, idt)
            buf = io.BytesIO()
            _draw(rng, idt, a).save(buf, "JPEG", quality=90)
            atomic_write_bytes(img_dir / name, buf.getvalue())
            partition.write(f"{name} {split}\n".encode())
            attr_list.write(f"{name} {' '.join(f'{1 if a[k] else -1:2d}' for k in ATTRIBUTES)}\n".encode())
            identity_list.write(f"{name} {ident}\n".encode())
            counts[split] += 1
    atomic_write_bytes(root / DATASET_FILE, json.dumps({**DATASET_RECORD, "n": n, "seed": seed}).encode())
    (root / IN_PROGRESS).unlink()
    return {"n": n, "out": str(out), "splits": {"train": counts[0], "valid": counts[1], "test": counts[2]}}
