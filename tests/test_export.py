"""Export: the contract's names, dynamic batch, metadata, onnxruntime parity with PyTorch, no random op,
nothing written when validation fails; the runtime works without torch."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from vae.checkpoint import load_trained
from vae.export import ExportError, export, random_ops
from vae.runtime import Decoder, Encoder, RuntimeModelError, interpolate


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    card = export(trained_run, out, version="test-1")
    return out, card


def test_contract_names_shapes_and_metadata(exported):
    out, card = exported
    enc = onnx.load(str(out / "encoder.onnx"))
    dec = onnx.load(str(out / "decoder.onnx"))
    assert [i.name for i in enc.graph.input] == ["x"] and [o.name for o in enc.graph.output] == ["mu", "logvar"]
    assert [i.name for i in dec.graph.input] == ["z"] and [o.name for o in dec.graph.output] == ["x_mean"]
    for graph in (enc, dec):
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch
        assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        meta = {p.key: p.value for p in graph.metadata_props}
        for key in ("latent_dim", "image_size", "channels", "likelihood", "version", "created", "config_hash",
                    "metrics", "contract_version"):
            assert key in meta, key
        assert meta["latent_dim"] == "4" and meta["image_size"] == "16" and meta["version"] == "test-1"
    model_json = json.loads((out / "model.json").read_text())
    assert model_json["latent_dim"] == 4 and model_json["metrics"] == card["metrics"]
    assert not list(out.glob("*.data")) and not list(out.glob(".*"))  # weights inside, no leftovers


def test_no_random_op_in_either_graph(exported):
    out, _ = exported
    assert random_ops(out / "encoder.onnx") == set() and random_ops(out / "decoder.onnx") == set()


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_pytorch(exported, trained_run, batch):
    out, _ = exported
    model, _, _ = load_trained(trained_run)
    rng = np.random.default_rng(batch)
    z = rng.standard_normal((batch, 4)).astype(np.float32)
    x = rng.random((batch, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want_x = model.decode_mean(torch.from_numpy(z)).numpy()
        want_mu, want_logvar = (t.numpy() for t in model.encode(torch.from_numpy(x)))
    np.testing.assert_allclose(Decoder(out / "decoder.onnx").decode(z), want_x, atol=1e-4, rtol=0)
    mu, logvar = Encoder(out / "encoder.onnx").encode(x)
    np.testing.assert_allclose(mu, want_mu, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, want_logvar, atol=1e-4, rtol=0)


def test_failed_validation_writes_nothing(trained_run, tmp_path, monkeypatch):
    import vae.export as export_module

    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # nothing can pass
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="disagrees"):
        export(trained_run, out)
    assert not out.exists() or not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir()] in ([], ["out"])


def test_runtime_sampling_is_seeded_and_validates_input(exported):
    out, _ = exported
    decoder = Decoder(out / "decoder.onnx")
    assert decoder.provider == "CPUExecutionProvider"
    a, b, c = decoder.sample(6, seed=1), decoder.sample(6, seed=1), decoder.sample(6, seed=2)
    assert a.shape == (6, 3, 16, 16) and np.array_equal(a, b) and not np.array_equal(a, c)
    encoder = Encoder(out / "encoder.onnx")
    u8 = (np.random.default_rng(0).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    mu_u8, _ = encoder.encode(u8)
    mu_f, _ = encoder.encode(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    np.testing.assert_allclose(mu_u8, mu_f, atol=1e-6)
    with pytest.raises(RuntimeModelError, match="images"):
        encoder.encode(np.zeros((2, 3, 16, 16), np.float32) + 2)
    with pytest.raises(RuntimeModelError, match=r"\[N, 16, 16, 3\]"):
        encoder.encode(np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(RuntimeModelError, match="z: expected shape"):
        decoder.decode(np.zeros((2, 5), np.float32))
    assert interpolate(np.zeros(4), np.ones(4), 5)[2].tolist() == [0.5] * 4


def test_runtime_refuses_unknown_contract(exported, tmp_path):
    out, _ = exported
    graph = onnx.load(str(out / "decoder.onnx"))
    for prop in graph.metadata_props:
        if prop.key == "contract_version":
            prop.value = "99"
    onnx.save(graph, str(tmp_path / "decoder.onnx"))
    with pytest.raises(RuntimeModelError, match="unknown contract version '99'"):
        Decoder(tmp_path / "decoder.onnx")


def test_cuda_request_that_falls_back_warns(exported):
    out, _ = exported
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider present")
    with pytest.warns(RuntimeWarning, match="CUDA was requested"):
        decoder = Decoder(out / "decoder.onnx", device="cuda")
    assert decoder.provider == "CPUExecutionProvider"


def test_runtime_and_vae_sample_work_where_torch_cannot_be_imported(exported, tmp_path):
    out, _ = exported
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    code = ("import sys; from vae.cli import main; rc = main(['sample', '--model', sys.argv[1], '--n', '4', "
            "'--out', sys.argv[2]]); assert 'torch' not in sys.modules or sys.modules['torch'] is None; sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.getcwd()]))
    result = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "g.png")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
