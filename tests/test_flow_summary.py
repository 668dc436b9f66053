"""The run's summary artifact and metrics table: sample-quality figures beside bits/dim, the decision naming both
figures, and grids embedded as data URIs that fit (real CelebA grids are ~750 KB as PNG) and stay legible."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_runtime import registry as reg
from vae.serving import promotion

DATA_URI = re.compile(r"!\[([^\]]+)\]\(data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)\)")


def figure(value, stderr=0.001):
    return {"value": value, "stderr": stderr}


def figures(kid, precision=0.71, fid=None):
    return {"kid": figure(kid), "precision": figure(precision), "recall": figure(0.52), "density": figure(0.93),
            "coverage": figure(0.84), "swd": {**figure(2.5), "levels": [1.0, 2.0]}, "fid": fid}


def metrics_with_samples(fid: bool = False) -> dict:
    prior = {"0.8": {**figures(0.0123, fid=figure(41.5, 0.5) if fid else None),
                     "memorisation": {"nearest_train_rms": figure(0.1), "ratio_to_heldout": 1.02,
                                      "train_to_heldout": 0.98}},
             "1": {**figures(0.0201, precision=0.64, fid=figure(48.0, 0.6) if fid else None),
                   "memorisation": {"nearest_train_rms": figure(0.1), "ratio_to_heldout": 1.07}}}
    samples = {
        "format": 1, "primary": {"metric": "kid", "of": "prior", "temperature": 0.8, "value": 0.0123,
                                 "stderr": 0.0011},
        "measure": "0123456789abcdef", "temperatures": [0.8, 1.0], "n_heldout": 1000, "n_train": 1000,
        "n_generated": 1000,
        "features": {"random": {"name": "randconv-v1", "sha256": "a" * 64, "dims": 512},
                     "inception": {"name": "fid-inception", "sha256": "b" * 64} if fid else None},
        "fid_reason": None if fid else "no Inception weights given (vae eval --inception-weights PATH)",
        "floor": figures(0.0004, precision=0.75, fid=figure(3.1, 0.1) if fid else None), "prior": prior,
        "reconstructions": figures(0.0051, precision=0.68, fid=figure(20.0, 0.3) if fid else None),
        "heldout_nearest_train_rms": figure(0.1)}
    return {"nll_bpd": 4.91, "k": 1000, "elbo_bpd": 5.02, "n_images": 19962, "split": "test",
            "split_fingerprint": "f" * 64, "image_size": 64, "samples": samples,
            "images": {"reconstructions": "reconstructions.png", "samples-t0.8": "samples-t0.8.png",
                       "samples-t1": "samples-t1.png"}}


def noise_png(path: Path, size: int = 530, seed: int = 0) -> Path:
    """A grid of random noise: it compresses as badly as pictures do (a real 8x8 CelebA-64 grid is 530 px)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "PNG")
    return path


def embedded(markdown: str) -> dict[str, tuple[str, bytes]]:
    return {name: (mime, base64.b64decode(data)) for name, mime, data in DATA_URI.findall(markdown)}


def decoded(data: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(data))
    picture.load()  # the whole picture decodes, not only its header
    return picture


def result_of(champion_kid=0.0120):
    reason = promotion.decide({"nll_bpd": 4.95, "sample_primary": {"metric": "kid", "value": champion_kid,
                                                             "stderr": 0.0010, "measure": "0123456789abcdef"}},
                        promotion.evidence_of(metrics_with_samples()))[1]
    previous = {"version": "old", "nll_bpd": 4.95, "evidence": {
        "nll_bpd": 4.95, "sample_primary": {"metric": "kid", "value": champion_kid, "stderr": 0.0010,
                                            "temperature": 1.0, "measure": "0123456789abcdef"}}}
    return {"promoted": True, "reason": reason, "previous": previous, "reevaluated": None, "path": "/registry/v1"}


def test_a_celeba_sized_grid_is_embedded_small_wide_and_whole(tmp_path):
    from flows.train_vae import MAX_EMBEDDED_PICTURE, MAX_SUMMARY_BYTES, MIN_PICTURE_WIDTH, summary_markdown

    grid = noise_png(tmp_path / "samples-t0.8.png")
    assert grid.stat().st_size > 700_000  # what used to be named "too large to embed"
    markdown = summary_markdown("v1", metrics_with_samples(), result_of(),
                                [("samples-t0.8", grid, "prior samples at temperature 0.8")])
    pictures = embedded(markdown)
    assert list(pictures) == ["samples-t0.8"]
    mime, data = pictures["samples-t0.8"]
    picture = decoded(data)
    assert mime == "image/jpeg" and picture.format == "JPEG" and len(data) <= MAX_EMBEDDED_PICTURE
    assert picture.width >= MIN_PICTURE_WIDTH and picture.width == picture.height
    assert "too large to embed" not in markdown and len(markdown.encode()) <= MAX_SUMMARY_BYTES
    assert "\n*prior samples at temperature 0.8*\n" in markdown  # the caption under the picture


def test_every_grid_of_a_run_fits_in_one_artifact(tmp_path):
    """Two temperatures, reconstructions and the export's samples, each ~840 KB of PNG: all embedded, the whole
    summary under MAX_SUMMARY_BYTES, each picture at least 256 px wide; a small PNG is kept byte for byte."""
    from flows.train_vae import MAX_SUMMARY_BYTES, MIN_PICTURE_WIDTH, summary_markdown, summary_pictures

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    for i, name in enumerate(("reconstructions", "samples-t0.8", "samples-t1")):
        noise_png(run / "eval" / f"{name}.png", seed=i)
    export = noise_png(tmp_path / "export-samples.png", seed=9)
    metrics = metrics_with_samples()
    pictures = summary_pictures(run, export, metrics)
    assert [name for name, _, _ in pictures] == ["samples", "reconstructions", "samples-t0.8", "samples-t1"]
    markdown = summary_markdown("v1", metrics, result_of(), pictures)
    shown = embedded(markdown)
    assert list(shown) == ["samples", "reconstructions", "samples-t0.8", "samples-t1"]
    assert all(decoded(data).width >= MIN_PICTURE_WIDTH for _, data in shown.values())
    assert len(markdown.encode()) <= MAX_SUMMARY_BYTES
    # labelled: a caption under each, with its temperature; the best temperature is the primary figure's
    assert "*prior samples at temperature 0.8: the first 64 of the 1000 the sample metrics measured (the best " \
           "temperature: the primary figure)*" in markdown
    assert "*prior samples at temperature 1: the first 64 of the 1000 the sample metrics measured*" in markdown
    assert "*decoder.onnx, the exported graph, through onnxruntime" in markdown
    assert "*reconstructions: test images, each followed by its reconstruction" in markdown

    small = tmp_path / "small.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(small, "PNG")
    mime, data = embedded(summary_markdown("v1", metrics, result_of(), [("samples", small)]))["samples"]
    assert mime == "image/png" and data == small.read_bytes()  # fits: embedded as it is


def test_a_tiny_grid_is_enlarged_and_a_non_picture_is_named(tmp_path):
    from flows.train_vae import MIN_PICTURE_WIDTH, summary_markdown

    tiny = tmp_path / "tiny.png"  # the test model's 16 px faces: an 8x8 grid of 146 px
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (146, 146, 3), dtype=np.uint8)).save(tiny)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a picture" * 10)
    markdown = summary_markdown("v1", metrics_with_samples(), result_of(), [("samples", tiny), ("recon", broken)])
    mime, data = embedded(markdown)["samples"]
    picture = decoded(data)
    assert mime == "image/png" and picture.width == 2 * 146 >= MIN_PICTURE_WIDTH  # a whole factor: crisp pixels
    assert np.array_equal(np.asarray(picture)[::2, ::2], np.asarray(Image.open(tiny).convert("RGB")))
    assert "recon" not in embedded(markdown) and f"- recon: `{broken}`" in markdown


def test_the_summary_shows_the_sample_figures_beside_bits_and_the_decision_names_both():
    from flows.train_vae import summary_markdown

    markdown = summary_markdown("v1", metrics_with_samples(), result_of(), [])
    assert "- **promoted**: test nll_bpd 4.9100 beats the champion's 4.9500; KID 0.0123 ± 0.0011 vs champion's " \
           "0.012 ± 0.001, within 2 SE" in markdown
    assert "test nll_bpd **4.9100**" in markdown and "champion old: nll_bpd 4.95, KID 0.012 ± 0.001" in markdown
    assert "KID **0.0123 ± 0.0011** (prior samples at temperature 0.8, the best of 0.8, 1" in markdown
    assert "real-versus-real floor 0.0004 ± 0.001" in markdown and "randconv-v1" in markdown
    assert "- FID: not measured: no Inception weights given" in markdown
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in markdown.splitlines() if line.startswith("| ") and "---" not in line}
    assert table["figure"] == ["floor (held-out vs training)", "prior t=0.8 (best)", "prior t=1", "reconstructions"]
    assert table["kid"] == ["0.0004 ± 0.001", "0.0123 ± 0.001", "0.0201 ± 0.001", "0.0051 ± 0.001"]
    assert table["precision"] == ["0.75 ± 0.001", "0.71 ± 0.001", "0.64 ± 0.001", "0.68 ± 0.001"]
    assert {"recall", "density", "coverage", "swd", "fid"} <= set(table) and table["fid"] == ["–"] * 4
    assert table["nearest-training distance / held-out's"] == ["–", "1.02", "1.07", "–"]
    assert table["samples' nearest-training / nearest-held-out distance"] == ["–", "0.98", "–", "–"]

    markdown = summary_markdown("v1", metrics_with_samples(fid=True), result_of(), [])
    assert "- FID 41.5 ± 0.5 at temperature 0.8 (floor 3.1 ± 0.1)" in markdown and "not measured" not in markdown

    worse = summary_markdown("v1", metrics_with_samples(), {**result_of(0.0050), "promoted": False}, [])
    assert "- **not promoted**: test nll_bpd 4.9100 beats the champion's 4.9500 but KID 0.0123 ± 0.0011 vs " \
           "champion's 0.005 ± 0.001" in worse


def test_the_metrics_table_gains_flattened_sample_rows_and_old_metrics_still_work():
    from flows.train_vae import METRIC_ROWS, metric_rows, summary_markdown

    rows = {row["metric"]: row["value"] for row in metric_rows(metrics_with_samples())}
    assert rows["nll_bpd"] == 4.91 and rows["k"] == 1000
    assert rows["samples.primary.kid"] == 0.0123 and rows["samples.primary.kid_stderr"] == 0.0011
    assert rows["samples.primary.temperature"] == 0.8 and rows["samples.measure"] == "0123456789abcdef"
    assert rows["samples.floor.kid"] == 0.0004 and rows["samples.prior.kid"] == 0.0123
    assert rows["samples.prior.precision"] == 0.71 and rows["samples.prior.t1.kid"] == 0.0201
    assert rows["samples.reconstructions.swd"] == 2.5 and rows["samples.prior.memorisation_ratio"] == 1.02
    assert rows["samples.prior.memorisation_train_to_heldout"] == 0.98
    assert rows["samples.fid_reason"].startswith("no Inception weights") and "samples.prior.fid" not in rows
    with_fid = {row["metric"]: row["value"] for row in metric_rows(metrics_with_samples(fid=True))}
    assert with_fid["samples.prior.fid"] == 41.5 and "samples.fid_reason" not in with_fid

    old = {key: value for key, value in metrics_with_samples().items() if key not in ("samples", "images")}
    assert [row["metric"] for row in metric_rows(old)] == list(METRIC_ROWS)
    result = {"promoted": True, "reason": "no champion yet", "previous": None, "reevaluated": None, "path": "/r"}
    assert "- samples: no sample-quality figures in these metrics" in summary_markdown("v1", old, result, [])


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_a_bad_sample_tolerance_is_refused(value):
    with pytest.raises(reg.RegistryError, match="sample_tolerance"):
        promotion.check_tolerance(value)
