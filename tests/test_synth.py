"""Tests for pipeline.synth: CelebA layout, determinism, and attribute-driven pixels."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vae_runtime.errors import BadInput
from pipeline import synth
from pipeline.synth import ATTRIBUTES, synthesize


def _attrs(root) -> tuple[list[str], np.ndarray]:
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    rows = [ln.split() for ln in lines[2:]]
    return [r[0] for r in rows], np.array([[int(v) for v in r[1:]] for r in rows])


def _images(root, names) -> np.ndarray:
    """Images as float luminance arrays of shape (n, 218, 178)."""
    return np.stack([np.asarray(Image.open(root / "img_align_celeba" / m).convert("L"), np.float32)
                     for m in names])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth200")
    synthesize(root, 200, seed=7)
    names, attrs = _attrs(root)
    return attrs, _images(root, names)


def _col(attrs: np.ndarray, name: str) -> np.ndarray:
    return attrs[:, ATTRIBUTES.index(name)] == 1


def test_attribute_names_are_celeba_order():
    assert len(ATTRIBUTES) == 40 == len(set(ATTRIBUTES))
    assert ATTRIBUTES[:3] == ("5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive")
    assert ATTRIBUTES[20] == "Male" and ATTRIBUTES[31] == "Smiling" and ATTRIBUTES[-1] == "Young"


def test_layout(tmp_path):
    n = 40
    summary = synthesize(tmp_path, n, seed=3)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    assert sorted(p.name for p in (tmp_path / "img_align_celeba").iterdir()) == names
    for m in names[:5] + names[-2:]:
        with Image.open(tmp_path / "img_align_celeba" / m) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (178, 218))
    part = [ln.split() for ln in (tmp_path / "list_eval_partition.txt").read_text().splitlines()]
    assert [p[0] for p in part] == names
    splits = [int(p[1]) for p in part]
    assert set(splits) == {0, 1, 2}
    counts = {k: splits.count(v) for k, v in (("train", 0), ("valid", 1), ("test", 2))}
    assert summary == {"n": n, "out": str(tmp_path), "splits": counts}
    assert counts["train"] >= 30
    lines = (tmp_path / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[0] == str(n) and tuple(lines[1].split()) == ATTRIBUTES
    anames, attrs = _attrs(tmp_path)
    assert anames == names and attrs.shape == (n, 40) and set(np.unique(attrs)) <= {-1, 1}
    ident = [ln.split() for ln in (tmp_path / "identity_CelebA.txt").read_text().splitlines()]
    assert [r[0] for r in ident] == names
    assert {int(r[1]) for r in ident} == {1, 2}  # identities 1..n//20, all used
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("n", [1, 10, 11, 19])
def test_split_sizes(tmp_path, n):
    s = synthesize(tmp_path, n, seed=1)["splits"]
    assert sum(s.values()) == n and s["train"] >= 0.7 * n
    if n >= 10:
        assert min(s.values()) >= 1


def test_deterministic_and_seed_dependent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthesize(a, 25, seed=5)
    synthesize(b, 25, seed=5)
    synthesize(c, 25, seed=6)
    rel = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert rel == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for r in rel:
        assert (a / r).read_bytes() == (b / r).read_bytes(), r
    imgs = [f"img_align_celeba/{i:06d}.jpg" for i in range(1, 26)]
    assert sum((a / r).read_bytes() != (c / r).read_bytes() for r in imgs) == 25
    synthesize(a, 25, seed=5)  # rerun in place: still identical
    assert all((a / r).read_bytes() == (b / r).read_bytes() for r in rel)


@pytest.mark.parametrize("n", [0, -3, synth.MAX_N + 1, 10**9])
def test_bad_n_is_refused_before_anything_is_written(tmp_path, n):
    with pytest.raises(BadInput, match=rf"n: must be in \[1, 999999\] \(six-digit file names, as CelebA's\), got {n}"):
        synthesize(tmp_path / "out", n)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_huge_n_in_one_line(tmp_path, capsys):
    from vae.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "out"), "--n", "1000000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vae: error: n: must be in [1, 999999] (six-digit file names, as CelebA's), got 1000000000", err
    assert not (tmp_path / "out").exists()


def test_a_rerun_removes_what_a_killed_run_left(tmp_path):
    (tmp_path / "img_align_celeba").mkdir()
    left = [tmp_path / ".list_attr_celeba.txt.k1ll3d.tmp", tmp_path / "img_align_celeba" / ".000002.jpg.k1ll3d.tmp"]
    for path in [*left, tmp_path / ".notes.txt.k1ll3d.tmp"]:
        path.write_bytes(b"partial")
    synthesize(tmp_path, 3)
    assert not any(path.exists() for path in left)
    assert (tmp_path / ".notes.txt.k1ll3d.tmp").exists()  # not one of its files: left alone
    assert not (tmp_path / synth.IN_PROGRESS).exists()


def _held_at_last_image(module, out, n: int, monkeypatch) -> int:
    """Bytes that `module.synthesize` itself has allocated, and still holds, when it writes its last image."""
    import inspect
    import tracemalloc

    source, first = inspect.getsourcelines(module.synthesize)
    inside, held, real = range(first, first + len(source)), [], module.atomic_write_bytes

    def write(path, data):
        real(path, data)
        if path.name == f"{n:06d}.jpg":
            traces = tracemalloc.take_snapshot().traces
            held.append(sum(t.size for t in traces if t.traceback[0].filename == module.__file__
                            and t.traceback[0].lineno in inside))

    monkeypatch.setattr(module, "atomic_write_bytes", write)
    tracemalloc.start(1)
    try:
        module.synthesize(out, n, seed=2)
    finally:
        tracemalloc.stop()
    return held[0]


def test_memory_does_not_grow_with_n(tmp_path, monkeypatch):
    """Each image and its list lines are written as they are drawn: what `synthesize` holds while it draws its last
    image is the same for 200 images as for 20 (names, lines or index tables kept for the end would add hundreds
    of bytes per image)."""
    small, large = (_held_at_last_image(synth, tmp_path / str(n), n, monkeypatch) for n in (20, 200))
    assert large - small < 4096, (small, large)


def test_identities_are_balanced_and_splits_exact_for_any_n(tmp_path):
    """The permutations that assign identities and splits one index at a time are permutations of range(n)."""
    for n in (1, 2, 7, 20, 64, 65, 1000, 4097):
        shuffle = synth._Shuffle(n, np.random.default_rng(n))
        assert sorted(shuffle(i) for i in range(n)) == list(range(n)), n
    synthesize(tmp_path, 100, seed=4)
    ident = [int(ln.split()[1]) for ln in (tmp_path / "identity_CelebA.txt").read_text().splitlines()]
    assert sorted(set(ident)) == [1, 2, 3, 4, 5] and {ident.count(i) for i in range(1, 6)} == {20}
    assert ident != sorted(ident)  # spread over the data set, not in runs


def test_label_frequencies_roughly_celeba(big):
    attrs, _ = big
    freq = (attrs == 1).mean(0)
    f = dict(zip(ATTRIBUTES, freq))
    assert .3 < f["Smiling"] < .7 and .04 < f["Eyeglasses"] < .3 and .7 < f["No_Beard"] < .97
    male = _col(attrs, "Male")
    assert not (~_col(attrs, "No_Beard") & ~male).any()  # only men have beards
    hair = attrs[:, [ATTRIBUTES.index(k) for k in ("Black_Hair", "Blond_Hair", "Brown_Hair",
                                                  "Gray_Hair")]] == 1
    assert hair.sum(1).max() <= 1
    assert not (hair.any(1) & _col(attrs, "Bald")).any()


def test_eyeglasses_darken_eye_region(big):
    attrs, imgs = big
    glasses = _col(attrs, "Eyeglasses")
    assert 5 <= glasses.sum() <= 195
    dark = (imgs[:, 88:124, 40:138] < 70).mean((1, 2))
    assert dark[glasses].mean() > dark[~glasses].mean() + 0.08


def test_smiling_changes_mouth_region(big):
    """A smile (arc or open grin) puts more off-skin "ink" in the mouth box than a flat line."""
    attrs, imgs = big
    mouth = imgs[:, 135:168, 60:118]
    ink = (np.abs(mouth - np.median(mouth, (1, 2), keepdims=True)) > 30).mean((1, 2))
    shaved = _col(attrs, "No_Beard") & ~_col(attrs, "Mustache")
    smiling = _col(attrs, "Smiling")
    assert (shaved & smiling).sum() >= 20 and (shaved & ~smiling).sum() >= 20
    assert ink[shaved & smiling].mean() > 1.5 * ink[shaved & ~smiling].mean()
    attractive = _col(attrs, "Attractive")  # a pure label: must not move the statistic much
    assert ink[shaved & attractive].mean() < 1.3 * ink[shaved & ~attractive].mean()


def test_black_hair_darker_than_blond(big):
    attrs, imgs = big
    no_hat = ~_col(attrs, "Wearing_Hat")
    black, blond = _col(attrs, "Black_Hair") & no_hat, _col(attrs, "Blond_Hair") & no_hat
    assert black.sum() >= 5 and blond.sum() >= 5
    top = imgs[:, 46:62, 70:108].mean((1, 2))
    assert top[black].mean() + 80 < top[blond].mean()


@pytest.mark.parametrize("flip", ["Smiling", "Eyeglasses", "Male", "Bald", "Pale_Skin",
                                  "Wearing_Hat", "Mouth_Slightly_Open", "Black_Hair",
                                  "Blond_Hair", "Gray_Hair", "Wearing_Lipstick", "Bangs"])
def test_each_key_attribute_changes_the_picture(flip):
    """Render one face twice with identical randomness, toggling a single label."""
    idt = synth._identity(np.random.default_rng(0))
    base = {k: False for k in ATTRIBUTES} | {"No_Beard": True, "Young": True}
    on = base | {flip: True}
    img0 = np.asarray(synth._draw(np.random.default_rng(1), idt, base), np.float32)
    img1 = np.asarray(synth._draw(np.random.default_rng(1), idt, on), np.float32)
    crop = (slice(35, 183), slice(15, 163))  # the 148x148 centre crop
    changed = (np.abs(img1[crop] - img0[crop]).sum(-1) > 40).sum()
    assert changed >= 50, (flip, changed)  # even the smallest (lipstick) changes ~90 px


def test_beard_darkens_chin():
    idt = synth._identity(np.random.default_rng(2))
    man = {k: False for k in ATTRIBUTES} | {"Male": True, "No_Beard": True, "Young": True}
    shaved = np.asarray(synth._draw(np.random.default_rng(3), idt, man).convert("L"), np.float32)
    bearded = np.asarray(synth._draw(np.random.default_rng(3), idt, man | {"No_Beard": False})
                         .convert("L"), np.float32)
    assert bearded[160:178, 70:108].mean() < shaved[160:178, 70:108].mean() - 20
