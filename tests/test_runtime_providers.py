"""The runtime takes any onnxruntime provider and session options in onnxruntime's own forms, and encodes images of
any size, or image files, with the preprocessing the model's shards had, byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import REPO
from exported_model import exported_once
from vae_runtime.preprocess import preprocess
from vae.cli import main
from vae.serving import promotion, versions
from vae_runtime import Champion, Decoder, Encoder, RuntimeModelError


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return exported_once(trained_run, tmp_path_factory)[0]


def one_thread() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


def test_providers_and_session_options_pass_through_and_take_precedence(exported):
    decoder = Decoder(exported, providers=["CPUExecutionProvider"], sess_options=one_thread(), threads=3)
    assert decoder.provider == "CPUExecutionProvider"
    assert decoder.session.get_session_options().intra_op_num_threads == 1  # the app's options, not threads=3
    assert Decoder(exported, threads=3).session.get_session_options().intra_op_num_threads == 3  # without them
    np.testing.assert_array_equal(decoder.sample(3, seed=4), Decoder(exported).sample(3, seed=4))
    encoder = Encoder(exported, providers=[("CPUExecutionProvider", {})], sess_options=one_thread())
    assert encoder.provider == "CPUExecutionProvider"
    assert encoder.session.get_session_options().intra_op_num_threads == 1


def test_a_champion_passes_them_through(exported, tmp_path):
    registry = tmp_path / "registry"
    versions.register(registry, "v1", {p.name: p for p in exported.iterdir()})
    assert promotion.promote(registry, "v1", {"nll_bpd": 5.0, "elbo_bpd": 1.0, "k": 8, "split": "test",
                                              "split_fingerprint": "f" * 64, "image_size": 16})["promoted"]
    champion = Champion(registry, cache_dir=tmp_path / "cache")
    for model in (champion.decoder(providers=["CPUExecutionProvider"], sess_options=one_thread()),
                  champion.encoder(providers=["CPUExecutionProvider"], sess_options=one_thread())):
        assert model.champion_version == "v1" and model.provider == "CPUExecutionProvider"
        assert model.session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("providers, needle", [
    (["NoSuchExecutionProvider"], "providers: onnxruntime {} here has no 'NoSuchExecutionProvider' (it has "),
    ("CPUExecutionProvider", "providers: expected a non-empty list of onnxruntime provider names"),
    ([], "providers: expected a non-empty list"),
    ([("CPUExecutionProvider", "threads=1")], "providers: ('CPUExecutionProvider', 'threads=1') is neither"),
])
def test_a_provider_onnxruntime_lacks_or_a_malformed_list_is_one_line(exported, providers, needle):
    with pytest.raises(RuntimeModelError) as err:
        Decoder(exported, providers=providers)
    assert needle.format(ort.__version__) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_session_options_of_another_kind_are_refused(exported):
    with pytest.raises(RuntimeModelError, match=r"^sess_options: expected an onnxruntime.SessionOptions, got dict$"):
        Encoder(exported, sess_options={"intra_op_num_threads": 1})


def test_vae_sample_takes_a_provider_and_refuses_one_onnxruntime_lacks(exported, tmp_path, capsys):
    def sample(provider):
        return main(["sample", "--model", str(exported), "--n", "4", "--out", str(tmp_path / "grid.png"),
                     "--provider", provider])

    assert sample("CPUExecutionProvider") == 0
    assert "provider CPUExecutionProvider" in capsys.readouterr().out
    assert sample("NoSuchExecutionProvider") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vae: error: providers: ") and "Traceback" not in err
    assert "has no 'NoSuchExecutionProvider'" in err


def write_images(folder) -> list:
    """Image files of several sizes and kinds, each needing a crop and a resize: an RGB PNG, a JPEG, and a PNG with
    alpha (composited on white as sharding does)."""
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w), mode in (("wide.png", (170, 200), "RGB"), ("photo.jpg", (160, 150), "RGB"),
                               ("alpha.png", (40, 33), "RGBA")):
        pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(folder / name)
        paths.append(folder / name)
    return paths


def test_image_files_reach_the_model_as_the_shards_hold_them(exported, tmp_path):
    encoder = Encoder(exported)
    size, crop = encoder.image_size, encoder.crop
    paths = write_images(tmp_path)
    sharded = np.stack([preprocess(path.read_bytes(), crop, size) for path in paths])  # the pipeline's bytes
    pixels = encoder.preprocess([str(paths[0]), paths[1], paths[2]])
    assert pixels.dtype == np.uint8 and pixels.shape == (3, size, size, 3)
    np.testing.assert_array_equal(pixels, sharded)
    mu, logvar = encoder.encode_images(paths, batch_size=2)
    want_mu, want_logvar = encoder.encode(sharded)
    np.testing.assert_array_equal(mu, want_mu)
    np.testing.assert_array_equal(logvar, want_logvar)
    np.testing.assert_array_equal(encoder.encode_images(str(paths[1]))[0], want_mu[1:2])  # one path alone


def test_arrays_and_paths_give_the_same_codes(exported, tmp_path):
    encoder = Encoder(exported)
    paths = write_images(tmp_path)[:2]  # the RGB ones: their decoded pixels are the arrays
    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    from_paths = encoder.encode_images(paths)[0]
    np.testing.assert_array_equal(encoder.encode_images(arrays)[0], from_paths)  # a list of sizes
    np.testing.assert_array_equal(encoder.encode_images(np.stack([arrays[0]] * 2))[0],
                                  np.stack([from_paths[0]] * 2))  # one [N, H, W, 3] array
    ready = encoder.preprocess(paths)  # images already the model's size pass unchanged
    np.testing.assert_array_equal(encoder.preprocess(ready), ready)
    np.testing.assert_array_equal(encoder.encode_images(ready)[0], encoder.encode(ready)[0])


def test_an_unusable_image_is_one_line_naming_it(exported, tmp_path):
    encoder = Encoder(exported)
    good = write_images(tmp_path)[0]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    (tmp_path / "notes.png").write_bytes(b"not an image")
    cases = [([good, tmp_path / "tiny.png"],
              rf"^images\[1\] {tmp_path}/tiny.png: too small: 8x8, needs at least 16x16$"),
             ([tmp_path / "notes.png"], rf"^images\[0\] {tmp_path}/notes.png: not a readable image: "),
             ([tmp_path / "missing.png"], rf"^images\[0\] {tmp_path}/missing.png: cannot be read \(FileNotFoundError"),
             ([np.zeros((20, 20), np.uint8)],
              r"^images\[0\]: expected uint8 RGB pixels \[H, W, 3\], got uint8 \[20, 20\]$"),
             ([np.zeros((20, 20, 3), np.float32)], r"^images\[0\]: expected uint8 RGB pixels"),
             (np.zeros((20, 20, 3), np.uint8), r"^images: expected uint8 \[N, H, W, 3\] or a list"),
             ([], r"^images: expected at least one image, got none$")]
    for images, pattern in cases:
        with pytest.raises(RuntimeModelError, match=pattern):
            encoder.encode_images(images)
    with pytest.raises(RuntimeModelError, match=r"^crop: expected an integer >= 0"):
        encoder.encode_images([good], crop=-1)


def test_without_pillow_the_runtime_loads_and_preprocessing_is_one_line(exported, tmp_path):
    blocker = tmp_path / "block-pil"
    (blocker / "PIL").mkdir(parents=True)
    (blocker / "PIL" / "__init__.py").write_text("raise ImportError('Pillow is blocked in this test')\n")
    code = ("import sys\nimport numpy as np\nfrom vae_runtime import Encoder, RuntimeModelError\n"
            "encoder = Encoder(sys.argv[1])\n"
            "mu, _ = encoder.encode(np.zeros((1, 16, 16, 3), np.uint8))\n"
            "try:\n    encoder.encode_images(np.zeros((1, 16, 16, 3), np.uint8))\n"
            "except RuntimeModelError as err:\n    print(err)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", code, str(exported)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'images: preprocessing needs Pillow, which is not installed ' \
                                  '(pip install "vae-runtime[images]")'
