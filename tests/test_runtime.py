"""The torch-free runtime (`vae_runtime`) and the commands built on it (`vae sample`, `vae encode`): seeded
sampling, input validation, providers, contract versions, preprocessing identical to the shards', no torch
anywhere, and the README's example for app developers run as written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from vae_runtime.grid import make_grid, write_png
from exported_model import exported_once
from vae.cli import main
from vae_runtime import Decoder, Encoder, RuntimeModelError, interpolate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return exported_once(trained_run, tmp_path_factory)


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def without_torch(tmp_path: Path, code: str, *args: str, cwd: Path | None = None):
    """Run `code` in a fresh interpreter in which `import torch` fails; it must not import torch either."""
    blocker = tmp_path / "block-torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    code += "\nassert 'torch' not in sys.modules or sys.modules['torch'] is None, 'torch was imported'\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))
    return subprocess.run([sys.executable, "-c", "import sys\n" + code, *args], env=env, cwd=cwd,
                          capture_output=True, text=True)


def test_sampling_is_seeded(exported):
    out, _ = exported
    decoder = Decoder(out / "decoder.onnx")
    assert decoder.provider == "CPUExecutionProvider"
    a, b, c = decoder.sample(6, seed=1), decoder.sample(6, seed=1), decoder.sample(6, seed=2)
    assert a.shape == (6, 3, 16, 16) and a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, c) and a.min() >= 0.0 and a.max() <= 1.0
    z = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    assert np.array_equal(decoder.decode(z), a)  # the documented noise: numpy's default_rng(seed)
    with pytest.raises(RuntimeModelError, match="n: expected an integer >= 1"):
        decoder.sample(0)


def test_decoder_rejects_bad_latents(exported):
    decoder = Decoder(exported[0] / "decoder.onnx")
    with pytest.raises(RuntimeModelError, match=r"z: expected shape \[N, 4\], got \[2, 5\]"):
        decoder.decode(np.zeros((2, 5), np.float32))
    with pytest.raises(RuntimeModelError, match="z: expected shape"):
        decoder.decode(np.zeros(4, np.float32))
    with pytest.raises(RuntimeModelError, match="z: expected floating point"):
        decoder.decode(np.zeros((2, 4), np.int64))
    with pytest.raises(RuntimeModelError, match="NaN or infinite"):
        decoder.decode(np.full((2, 4), np.nan, np.float32))
    with pytest.raises(RuntimeModelError, match="N = 0"):
        decoder.decode(np.zeros((0, 4), np.float32))
    assert decoder.decode(np.zeros((2, 4), np.float64)).dtype == np.float32  # float64 is cast, not refused


def test_encoder_takes_uint8_hwc_or_float_chw_and_says_what_is_wrong(exported):
    encoder = Encoder(exported[0] / "encoder.onnx")
    u8 = (np.random.default_rng(0).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    mu_u8, logvar_u8 = encoder.encode(u8)
    mu_f, logvar_f = encoder.encode(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert mu_u8.shape == logvar_u8.shape == (2, 4)
    np.testing.assert_allclose(mu_u8, mu_f, atol=1e-6)
    np.testing.assert_allclose(logvar_u8, logvar_f, atol=1e-6)
    cases = [
        (np.zeros((2, 3, 16, 16), np.float32) + 2, r"\[0, 1\], got \[2, 2\].*divide by 255"),
        (np.zeros((2, 3, 16, 16), np.float32) - 0.5, r"must lie in \[0, 1\]"),
        (np.full((1, 3, 16, 16), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((2, 3, 16, 16), np.uint8), r"\[N, 16, 16, 3\] \(HWC\).*looks like CHW"),
        (np.zeros((2, 16, 16, 3), np.float32), r"\[N, 3, 16, 16\] \(CHW\).*looks like HWC"),
        (np.zeros((16, 16, 3), np.uint8), r"uint8 input must be \[N, 16, 16, 3\]"),
        (np.zeros((2, 32, 32, 3), np.uint8), r"got \[2, 32, 32, 3\]"),
        (np.zeros((2, 16, 16, 3), np.int32), "expected uint8 HWC or float CHW, got dtype int32"),
        (np.zeros((0, 16, 16, 3), np.uint8), "N = 0"),
    ]
    for images, message in cases:
        with pytest.raises(RuntimeModelError, match=message):
            encoder.encode(images)


def test_interpolate_between_two_codes(exported):
    out, _ = exported
    line = interpolate(np.zeros(4), np.ones(4), 5)
    assert line.shape == (5, 4) and line.dtype == np.float32
    assert line[0].tolist() == [0.0] * 4 and line[2].tolist() == [0.5] * 4 and line[-1].tolist() == [1.0] * 4
    mu, _ = Encoder(out / "encoder.onnx").encode(np.zeros((2, 3, 16, 16), np.float32) + [[[[0.2]]], [[[0.8]]]])
    line = interpolate(mu[:1], mu[1:], 3)  # rows of encode's mu work too
    np.testing.assert_allclose(line[[0, -1]], mu, atol=1e-6)
    assert Decoder(out / "decoder.onnx").decode(line).shape == (3, 3, 16, 16)
    with pytest.raises(RuntimeModelError, match="steps: expected an integer >= 2"):
        interpolate(np.zeros(4), np.ones(4), 1)
    with pytest.raises(RuntimeModelError, match=r"same shape.*\[4\] and \[5\]"):
        interpolate(np.zeros(4), np.ones(5), 3)
    with pytest.raises(RuntimeModelError, match="same shape"):
        interpolate(np.zeros((2, 4)), np.ones((2, 4)), 3)


def test_runtime_refuses_unknown_contract_and_missing_files(exported, tmp_path):
    out, _ = exported
    graph = onnx.load(str(out / "decoder.onnx"))
    for prop in graph.metadata_props:
        if prop.key == "contract_version":
            prop.value = "99"
    onnx.save(graph, str(tmp_path / "decoder.onnx"))
    with pytest.raises(RuntimeModelError, match="unknown contract version '99'"):
        Decoder(tmp_path / "decoder.onnx")
    with pytest.raises(RuntimeModelError, match="file not found"):
        Decoder(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(RuntimeModelError, match="not an ONNX graph"):  # read for external weights first
        Decoder(tmp_path / "junk.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01")  # a protobuf message: ir_version 1 and no graph
    with pytest.raises(RuntimeModelError, match="onnxruntime cannot load it"):
        Decoder(tmp_path / "junk.onnx")
    with pytest.raises(RuntimeModelError, match="device 'tpu'"):
        Decoder(out / "decoder.onnx", device="tpu")
    for threads in (0, 2**31, True, 1.5):
        with pytest.raises(RuntimeModelError, match=r"threads: expected an integer in \[1, 1024\]"):
            Decoder(out / "decoder.onnx", threads=threads)
    assert Decoder(out / "decoder.onnx", threads=np.int64(1)).decode(np.zeros((1, 4))).shape == (1, 3, 16, 16)


def test_hostile_sizes_and_values_are_one_line_not_garbage_or_a_memory_error(exported):
    decoder = Decoder(exported[0] / "decoder.onnx")
    for batch_size in (-1, 0, 2.5, True):  # -1 once returned the uninitialised output buffer as images
        with pytest.raises(RuntimeModelError, match="batch_size: expected an integer >= 1"):
            decoder.sample(4, batch_size=batch_size)
    assert np.array_equal(decoder.sample(5, seed=3, batch_size=2), decoder.sample(5, seed=3))
    with pytest.raises(RuntimeModelError, match=r"n: 1000000000000 would need .* GiB.*ask in parts"):
        decoder.sample(10**12)
    with pytest.raises(RuntimeModelError, match=r"steps: 1000000000000 would need"):
        interpolate(np.zeros(4), np.ones(4), 10**12)
    for temperature in (True, -1, float("nan"), "1"):
        with pytest.raises(RuntimeModelError, match="temperature: expected a finite number > 0"):
            decoder.sample(2, temperature=temperature)
    assert np.array_equal(decoder.sample(2, temperature=np.float32(0.5)), decoder.sample(2, temperature=0.5))
    with pytest.raises(RuntimeModelError, match="beyond float32's range"):  # float64 that overflows float32
        decoder.decode(np.full((1, 4), 1e300))
    with pytest.raises(RuntimeModelError, match="z: not an array of latents"):
        decoder.decode([[0.0] * 4, [0.0]])


def _renamed_output(graph, old: str, new: str) -> None:
    for node in graph.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    for output in graph.graph.output:
        if output.name == old:
            output.name = new


def test_graphs_whose_outputs_disagree_with_their_metadata_are_refused_at_load(exported, tmp_path):
    out, _ = exported
    bigger = onnx.load(str(out / "decoder.onnx"))
    for prop in bigger.metadata_props:
        if prop.key == "image_size":
            prop.value = "32"  # the graph makes 16x16 images
    onnx.save(bigger, str(tmp_path / "bigger.onnx"))
    renamed = onnx.load(str(out / "decoder.onnx"))
    _renamed_output(renamed, "x_mean", "images")
    onnx.save(renamed, str(tmp_path / "renamed.onnx"))
    no_logvar = onnx.load(str(out / "encoder.onnx"))
    _renamed_output(no_logvar, "logvar", "log_variance")
    onnx.save(no_logvar, str(tmp_path / "no_logvar.onnx"))
    half_input = onnx.load(str(out / "decoder.onnx"))
    for node in half_input.graph.node:
        node.input[:] = ["z32" if name == "z" else name for name in node.input]
    half_input.graph.node.insert(0, onnx.helper.make_node("Cast", ["z"], ["z32"], to=onnx.TensorProto.FLOAT))
    half_input.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(half_input, str(tmp_path / "half_input.onnx"))
    cases = [(Decoder, "bigger", r"output x_mean is \[None, 3, 16, 16\] tensor\(float\), its metadata says "
                                 r"\[None, 3, 32, 32\]"),
             (Decoder, "renamed", "output x_mean is missing"), (Encoder, "no_logvar", "output logvar is missing"),
             (Decoder, "half_input", r"input z is \[None, 4\] tensor\(float16\)")]
    for kind, name, message in cases:
        with pytest.raises(RuntimeModelError, match=message):
            kind(tmp_path / f"{name}.onnx")


@pytest.mark.parametrize("card, message", [
    ({"sha256": "decoder.onnx"}, "sha256 is not a mapping"), ({"sha256": ["decoder.onnx"]}, "sha256 is not a mapping"),
    ({"sha256": {}}, "sha256 is not a mapping"), ({"sha256": {"decoder.onnx": 1}}, "sha256 is not a mapping"),
    (["decoder.onnx"], "not a model card")])
def test_a_damaged_card_is_refused_rather_than_trusted_or_a_traceback(exported, tmp_path, card, message):
    import json
    import shutil

    shutil.copy(exported[0] / "decoder.onnx", tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(card))
    with pytest.raises(RuntimeModelError, match=message):
        Decoder(tmp_path)


def test_a_registry_before_its_first_champion_says_so(tmp_path):
    (tmp_path / "train-vae" / "versions").mkdir(parents=True)
    with pytest.raises(RuntimeModelError, match="no champion yet"):
        Decoder(tmp_path)


def test_cuda_request_that_falls_back_warns(exported):
    out, _ = exported
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider present: the request is served, nothing falls back")
    for name in ("decoder.onnx", "decoder.fp16.onnx"):
        with pytest.warns(RuntimeWarning, match="CUDA was requested but onnxruntime runs it on CPUExecutionProvider"):
            decoder = Decoder(out / name, device="cuda")
        assert decoder.provider == "CPUExecutionProvider"


@pytest.mark.filterwarnings("ignore:Specified provider .CUDAExecutionProvider. is not in available")
def test_cuda_provider_that_is_listed_but_cannot_start_falls_back_with_a_warning(exported, monkeypatch):
    """onnxruntime-gpu without a usable GPU lists CUDA yet runs on the CPU: the runtime asks for CUDA (with its
    provider options) and reports the CPU, with the warning."""
    import onnxruntime

    from vae_runtime import sessions

    out, _ = exported
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider present: the request is served, nothing falls back")
    monkeypatch.setattr(sessions.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    asked = sessions.providers_for("cuda")
    assert asked[0][0] == "CUDAExecutionProvider" and asked[-1] == "CPUExecutionProvider"
    with pytest.warns(RuntimeWarning, match="CUDA was requested but onnxruntime runs it on CPUExecutionProvider"):
        decoder = Decoder(out / "decoder.onnx", device="cuda")
    assert decoder.provider == "CPUExecutionProvider"
    assert decoder.decode(np.zeros((2, decoder.latent_dim), np.float32)).shape[0] == 2


@pytest.mark.parametrize("version, nhwc", [("1.31.1", True), ("1.20.0", True), ("1.20rc1", True),
                                           ("2.0.0+cu13", True), ("1.19.2", False), ("1.9.0", False),
                                           ("dev", False)])
def test_nhwc_convolutions_are_asked_for_only_from_onnxruntime_1_20(version, nhwc):
    from vae_runtime import cuda_provider_options

    assert cuda_provider_options(version) == ({"prefer_nhwc": "1"} if nhwc else {})


def test_session_options_and_a_silent_cpu_request(exported, recwarn):
    import onnxruntime

    from vae_runtime import session_options

    options = session_options(2)
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    spinning = Decoder(exported[0] / "decoder.onnx", threads=2, spinning=True)
    z = np.zeros((2, 4), np.float32)
    decoder = Decoder(exported[0] / "decoder.onnx", threads=1)
    assert np.array_equal(spinning.decode(z), decoder.decode(z))
    assert decoder.provider == "CPUExecutionProvider" and decoder.session.get_providers() == ["CPUExecutionProvider"]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert decoder.card()["latent_dim"] == 4 and decoder.card()["version"] == "test-1"


def test_vae_sample_writes_a_seeded_png_and_exits_2_on_a_bad_model(exported, tmp_path, capsys):
    out, _ = exported
    assert main(["sample", "--model", str(out), "--n", "4", "--seed", "3", "--out", str(tmp_path / "a.png")]) == 0
    assert main(["sample", "--model", str(out / "decoder.onnx"), "--n", "4", "--seed", "3",
                 "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert "provider CPUExecutionProvider" in capsys.readouterr().out
    # --temperature scales the seeded prior draw: the grid of decode(0.5 * z) for the same z
    assert main(["sample", "--model", str(out), "--n", "4", "--seed", "3", "--temperature", "0.5",
                 "--out", str(tmp_path / "t.png")]) == 0
    decoder = Decoder(out / "decoder.onnx")
    z = np.random.default_rng(3).standard_normal((4, decoder.latent_dim)) * 0.5
    write_png(tmp_path / "want.png", make_grid(decoder.decode(z.astype(np.float32)), ncols=2))
    written = (tmp_path / "t.png").read_bytes()
    assert written == (tmp_path / "want.png").read_bytes() != (tmp_path / "a.png").read_bytes()
    one_line_error(capsys, main(["sample", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.png")]),
                   "file not found")
    assert not (tmp_path / "c.png").exists()


def test_vae_encode_preprocesses_like_the_shards(exported, synth_source, tiny_shards, tmp_path, capsys):
    from pipeline.loader import eval_loader

    out, _ = exported
    keys, pixels = [], []
    for batch_keys, batch, _ in eval_loader(str(tiny_shards), "test", 64):
        keys += list(batch_keys)
        pixels.append(batch.numpy().transpose(0, 2, 3, 1))  # uint8 HWC, as the shards hold them
    pixels = np.concatenate(pixels)
    images = tmp_path / "images"
    images.mkdir()
    for key in keys:
        (images / f"{key}.jpg").write_bytes((synth_source / "img_align_celeba" / f"{key}.jpg").read_bytes())
    (images / "notes.txt").write_text("not an image, not looked at")
    codes = tmp_path / "codes.npz"
    assert main(["encode", "--model", str(out), "--images", str(images), "--out", str(codes),
                 "--batch-size", "7"]) == 0
    assert "crop 148, size 16" in capsys.readouterr().out  # the shards' preprocessing, read from the model
    with np.load(codes) as npz:
        assert sorted(npz.files) == ["keys", "logvar", "mu"]
        got_keys, mu, logvar = npz["keys"].tolist(), npz["mu"], npz["logvar"]
    assert got_keys == sorted(keys) and mu.shape == logvar.shape == (len(keys), 4)
    want_mu, want_logvar = Encoder(out / "encoder.onnx").encode(pixels[np.argsort(keys)])
    np.testing.assert_allclose(mu, want_mu, atol=1e-6)
    np.testing.assert_allclose(logvar, want_logvar, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically, no leftovers

    single = tmp_path / "one.npz"
    assert main(["encode", "--model", str(out / "encoder.onnx"), "--images", str(images / f"{keys[0]}.jpg"),
                 "--out", str(single)]) == 0
    with np.load(single) as npz:
        assert npz["keys"].tolist() == [keys[0]]
        np.testing.assert_allclose(npz["mu"][0], mu[got_keys.index(keys[0])], atol=1e-6)


def test_vae_encode_skips_unreadable_images_and_exits_2_on_bad_input(exported, synth_source, tmp_path, capsys):
    out, _ = exported
    images = tmp_path / "images"
    images.mkdir()
    (images / "000001.jpg").write_bytes((synth_source / "img_align_celeba" / "000001.jpg").read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    assert main(["encode", "--model", str(out), "--images", str(images), "--out", str(tmp_path / "c.npz")]) == 0
    captured = capsys.readouterr()
    assert "1 images encoded, 1 skipped" in captured.out and "skipped" in captured.err
    with np.load(tmp_path / "c.npz") as npz:
        assert npz["keys"].tolist() == ["000001"]

    empty = tmp_path / "empty"
    empty.mkdir()
    bad = [
        (["--images", str(tmp_path / "nowhere")], "nowhere: does not exist"),
        (["--images", str(empty)], "no image files"),
        (["--images", str(images / "broken.jpg")], "no usable image; "),
        (["--images", str(images), "--crop", "-1"], "crop: expected >= 0"),
        (["--images", str(images), "--model", str(tmp_path)], f"model folder {tmp_path}: no encoder.onnx"),
    ]
    for args, message in bad:
        target = tmp_path / "bad.npz"
        argv = ["encode", "--model", str(out), "--out", str(target), *args]
        one_line_error(capsys, main(argv), message)
        assert not target.exists()
    one_line_error(capsys, main(["encode", "--model", str(out), "--images", str(images), "--out",
                                 str(tmp_path / "codes.txt")]), "expected a .npz")
    (images / "000001.png").write_bytes(b"")  # keys are file stems: a second one is skipped, as sharding does
    assert main(["encode", "--model", str(out), "--images", str(images), "--out", str(tmp_path / "d.npz")]) == 0
    assert "skipped 000001: duplicate key: 000001.png (kept 000001.jpg)" in capsys.readouterr().err
    with np.load(tmp_path / "d.npz") as npz:
        assert npz["keys"].tolist() == ["000001"]


def test_encode_has_help():
    result = subprocess.run([sys.executable, "-m", "vae.cli", "encode", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--images" in result.stdout and ".npz" in result.stdout


def test_runtime_and_commands_work_where_torch_cannot_be_imported(exported, synth_source, tmp_path):
    out, _ = exported
    code = """
import numpy as np
from vae.cli import main
from vae_runtime import Decoder, Encoder, interpolate
model, image, png, npz = sys.argv[1:5]
assert main(['sample', '--model', model, '--n', '4', '--out', png]) == 0
assert main(['encode', '--model', model, '--images', image, '--out', npz]) == 0
black, white = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)
mu, logvar = Encoder(model + '/encoder.onnx').encode(np.stack([black, white]))
frames = Decoder(model + '/decoder.onnx').decode(interpolate(mu[0], mu[1], 5))
half = Decoder(model + '/decoder.fp16.onnx').decode(interpolate(mu[0], mu[1], 5))
assert frames.shape == (5, 3, 16, 16) and np.abs(frames - half).max() <= 1e-2
"""
    result = without_torch(tmp_path, code, str(out), str(synth_source / "img_align_celeba" / "000002.jpg"),
                           str(tmp_path / "g.png"), str(tmp_path / "c.npz"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(tmp_path / "c.npz") as npz:
        assert npz["keys"].tolist() == ["000002"] and npz["mu"].shape == (1, 4)
