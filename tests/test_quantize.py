"""Reduced-precision CPU graphs: the exact ConvTranspose rewrite, int8 graphs that pass their budget before they are
written and load by explicit choice, a graph over budget that is never written."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from vae.serving.quantize import BUDGET, FIDELITY_BUDGET, PhaseConvTranspose, phase_decomposed


@pytest.mark.parametrize("cin, cout, side", [(3, 5, 4), (8, 16, 7), (16, 3, 1)])
def test_the_phase_rewrite_equals_the_transposed_convolution(cin, cout, side):
    torch.manual_seed(cin + cout)
    convt = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
    x = torch.randn(2, cin, side, side)
    with torch.no_grad():
        want, got = convt(x), PhaseConvTranspose(convt)(x)
    assert got.shape == want.shape == (2, cout, 2 * side, 2 * side)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_rewritten_model_decodes_like_the_model(trained_run):
    from vae.core.checkpoint import load_trained

    model = load_trained(trained_run)[0]
    rewritten = phase_decomposed(model)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in rewritten.modules())
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())  # the original is untouched
    z = torch.randn(5, model.latent_dim)
    with torch.no_grad():
        torch.testing.assert_close(rewritten.decode_mean(z), model.decode_mean(z), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def int8_export(trained_run, tmp_path_factory):
    from vae.serving.export import export

    out = tmp_path_factory.mktemp("int8") / "model"
    return out, export(trained_run, out, version="int8-1", precisions=("int8",))


def test_int8_graphs_are_validated_recorded_and_loaded_by_choice(int8_export):
    from vae_runtime import Decoder, Encoder

    out, card = int8_export
    report = card["validation"]["int8"]
    for graph in ("decoder", "encoder"):
        assert report[graph]["passed"] in ("agreement", "fidelity")
        budget = BUDGET if report[graph]["passed"] == "agreement" else FIDELITY_BUDGET
        assert report[graph]["mean_abs"] <= budget["mean_abs"] and report[graph]["max_abs"] <= budget["max_abs"]
        assert report[graph]["recon_increase"] <= FIDELITY_BUDGET["recon_increase"] or budget is BUDGET
    assert report["recon_error_float32"] > 0
    sets = report["decoder"]["by_input"]  # judged by the worse set, not their pooled average
    assert set(sets) == {"prior_draws", "codes"}
    assert report["decoder"]["mean_abs"] == max(e["mean_abs"] for e in sets.values())
    assert report["decoder"]["max_abs"] == max(e["max_abs"] for e in sets.values())
    assert set(report["encoder"]["by_input"]) == {"codes", "posterior_samples"}  # logvar is held to it too
    assert np.isfinite(report["encoder"]["logvar_max_abs"])
    # held-out images first, topped up from the next splits to 128 (half calibrate, half validate)
    assert re.search(r"last 60 images .* first 60 \(images from test \d+, valid \d+, train \d+, in that order\)",
                     report["calibration"]), report["calibration"]
    assert {"decoder.int8.onnx", "encoder.int8.onnx"} <= set(card["files"]) <= set(card["sha256"])
    nodes = onnx.load(str(out / "decoder.int8.onnx")).graph.node
    ops = {node.op_type for node in nodes}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "ConvTranspose" not in ops
    assert "DepthToSpace" not in ops  # the phases are interleaved channels last, by transposes ...
    producer = {name: n.op_type for n in nodes for name in n.output}
    consumers = {name: [n.op_type for n in nodes if name in n.input] for n0 in nodes for name in n0.output}
    moves = [n for n in nodes if n.op_type == "Transpose"]
    assert len(moves) >= 4  # to channels last, the interleave, back: per upsampling
    for node in moves:  # ... that stay in int8: a dequantized input, a quantized output
        assert producer[node.input[0]] == "DequantizeLinear" and consumers[node.output[0]] == ["QuantizeLinear"]
    float32, int8 = Decoder(out), Decoder(out, precision="int8")  # never chosen silently
    assert int8.path.endswith("decoder.int8.onnx") and int8.card()["precision"] == "int8"
    prior = np.random.default_rng(3).standard_normal((64, float32.latent_dim)).astype(np.float32)  # the export's
    differences = np.abs(int8.decode(prior).astype(np.float64) - float32.decode(prior))
    assert differences.mean() == pytest.approx(sets["prior_draws"]["mean_abs"], rel=1e-4)
    assert differences.max() == pytest.approx(sets["prior_draws"]["max_abs"], rel=1e-4)
    a, b = float32.sample(32, seed=4), int8.sample(32, seed=4)
    assert 0 < np.abs(a - b).mean() <= FIDELITY_BUDGET["mean_abs"] and np.abs(a - b).max() <= FIDELITY_BUDGET["max_abs"]
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    mu, mu8 = Encoder(out).encode(images)[0], Encoder(out, precision="int8").encode(images)[0]
    assert mu8.shape == mu.shape and np.abs(mu8 - mu).max() < 0.5


def test_each_input_set_must_meet_the_budget_on_its_own():
    """Accurate codes must not average away prior draws over the budget (what `Decoder.sample` shows)."""
    from vae.serving.quantize import _verdict, _worst

    over, fine = {"mean_abs": 4.06 / 255, "max_abs": 20 / 255}, {"mean_abs": 1.56 / 255, "max_abs": 13 / 255}
    errors = {**_worst(prior_draws=over, codes=fine), "recon_increase": 0.005}
    assert errors["mean_abs"] == over["mean_abs"] and errors["max_abs"] == over["max_abs"]
    assert (over["mean_abs"] + fine["mean_abs"]) / 2 <= FIDELITY_BUDGET["mean_abs"] < errors["mean_abs"]
    assert _verdict(errors) is None
    assert _verdict({**_worst(prior_draws=fine, codes=fine), "recon_increase": 0.005}) == "fidelity"


def test_the_most_held_out_images_are_the_ones_judged(trained_run, monkeypatch):
    """Images come test first, then valid and train: the first 64 (at most half) validate and the rest calibrate,
    so a small test split is judged rather than spent on calibration."""
    from vae.core.checkpoint import load_trained
    from vae.serving import quantize

    calibrated = []

    def record(model, folder, images):
        calibrated.append(images)
        raise RuntimeError("stop here")

    monkeypatch.setattr(quantize, "build_int8_graphs", record)
    images = np.stack([np.full((3, 16, 16), i / 40, np.float32) for i in range(33)])  # image i holds i / 40
    with pytest.raises(RuntimeError, match="stop here"):
        quantize.write_int8(load_trained(trained_run)[0], None, images, session=None)
    assert [round(float(x[0, 0, 0]) * 40) for x in calibrated[0]] == list(range(16, 33))  # 16 judged


def test_int8_needs_enough_images(trained_run, tmp_path):
    """A few images can neither calibrate nor validate: refused, nothing written."""
    from vae.core.checkpoint import load_trained
    from vae.serving.export import ExportError, export
    from vae.serving.quantize import write_int8

    export(trained_run, tmp_path / "model")
    folder = tmp_path / "model"
    model = load_trained(trained_run)[0]
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ExportError, match="int8: needs at least 16 images .* the shards have 15"):
        write_int8(model, folder, np.zeros((15, 3, 16, 16), np.float32), session=None)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_nan_in_any_input_set_meets_no_budget():
    from vae.serving.quantize import _verdict, _worst

    fine, nan = {"mean_abs": 0.1 / 255, "max_abs": 1 / 255}, {"mean_abs": float("nan"), "max_abs": float("nan")}
    for sets in ({"codes": fine, "posterior_samples": nan}, {"codes": nan, "posterior_samples": fine}):
        errors = {**_worst(**sets), "recon_increase": 0.0}
        assert np.isnan(errors["mean_abs"]) and _verdict(errors) is None
    assert _verdict({**_worst(codes=fine), "recon_increase": float("nan")}) is None


def test_an_int8_encoder_with_a_broken_logvar_is_not_written(trained_run, tmp_path, monkeypatch):
    """Only mu was once validated: an int8 encoder whose logvar is NaN shipped."""
    from vae.serving import quantize
    from vae.serving.export import ExportError, export

    build = quantize.build_int8_graphs

    def with_nan_logvar(model, folder, images):
        build(model, folder, images)
        graph = onnx.load(str(folder / "encoder.int8.onnx"))
        for node in graph.graph.node:
            node.output[:] = ["logvar_raw" if name == "logvar" else name for name in node.output]
        nan = onnx.helper.make_tensor("nan", onnx.TensorProto.FLOAT, [], [float("nan")])
        graph.graph.node.extend([onnx.helper.make_node("Constant", [], ["nan_value"], value=nan),
                                 onnx.helper.make_node("Add", ["logvar_raw", "nan_value"], ["logvar"])])
        onnx.save(graph, str(folder / "encoder.int8.onnx"))

    monkeypatch.setattr(quantize, "build_int8_graphs", with_nan_logvar)
    with pytest.raises(ExportError, match="encoder.int8.onnx: differs from the float32 graph by mean nan"):
        export(trained_run, tmp_path / "model", precisions=("int8",))
    assert not (tmp_path / "model").exists()


def test_a_graph_over_its_budget_is_not_written(trained_run, tmp_path, monkeypatch):
    from vae.serving import quantize
    from vae.serving.export import ExportError, export

    monkeypatch.setitem(quantize.BUDGET, "max_abs", 1e-9)
    monkeypatch.setitem(quantize.FIDELITY_BUDGET, "recon_increase", -1.0)  # no graph reconstructs better than this
    with pytest.raises(ExportError, match=r"int8.onnx: differs from the float32 graph by .* not written"):
        export(trained_run, tmp_path / "model", precisions=("int8",))
    assert not (tmp_path / "model").exists()


def test_a_graph_over_the_agreement_budget_ships_under_the_stated_fidelity_budget(trained_run, tmp_path,
                                                                                    monkeypatch):
    """8-bit activations through a trained decoder miss 1/255; the stated budget (how well held-out images are
    reconstructed) decides, and the report and the human-readable card say which budget each graph met."""
    from vae.serving import quantize
    from vae.serving.export import export

    monkeypatch.setitem(quantize.BUDGET, "max_abs", 1e-9)
    card = export(trained_run, tmp_path / "model", precisions=("int8",))
    report = card["validation"]["int8"]
    for graph in ("decoder", "encoder"):
        assert report[graph]["passed"] == "fidelity"
        assert report[graph]["recon_increase"] <= FIDELITY_BUDGET["recon_increase"]
    readme = (tmp_path / "model" / "README.md").read_text()
    assert "fidelity budget" in readme and "decoder.int8.onnx" in readme


def test_reconstruction_increase_is_measured_against_the_real_images():
    from vae.serving.quantize import _recon_error

    x = np.full((2, 3, 4, 4), 0.5, np.float32)
    assert _recon_error(x + 0.1, x) == pytest.approx(0.1, abs=1e-7)
    assert _recon_error(np.where(np.arange(4) % 2 == 0, 0.3, 0.7).astype(np.float32) * np.ones_like(x), x) == \
        pytest.approx(0.2, abs=1e-7)


def test_an_unoffered_precision_is_one_line(trained_run, tmp_path, capsys):
    from vae.cli import main

    assert main(["export", "--run", str(trained_run), "--out", str(tmp_path / "m"), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--precision 'bf16': not offered" in err and "no bf16 convolution" in err


@pytest.mark.parametrize("op", ["Conv", "MatMul"])
def test_onnxruntime_cpu_has_no_bf16_kernel_for_the_decoders_ops(op):
    """Why no bf16 graph is offered: a bf16 Conv or MatMul does not load on the CPU provider. If a new
    onnxruntime loads it, this fails: measure a bf16 graph against the int8 ones before offering it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    shape, wshape, out = ([1, 4, 8, 8], [8, 4, 3, 3], [1, 8, 6, 6]) if op == "Conv" else ([8, 16], [16, 8], [8, 8])
    w = numpy_helper.from_array(np.ones(wshape, np.float32), "w")
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("Cast", ["w"], ["wb"], to=TensorProto.BFLOAT16),
             helper.make_node(op, ["xb", "wb"], ["yb"]),
             helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    onnx.checker.check_model(model)  # valid ONNX: opset 22 admits bf16 for both ops
    with pytest.raises(Exception, match="Could not find an implementation"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_vae_sample_and_encode_take_the_int8_graphs_by_name(int8_export, synth_source, tmp_path, capsys):
    from vae.cli import main

    out, _ = int8_export
    images = sorted((synth_source / "img_align_celeba").iterdir())[:6]
    folder = tmp_path / "images"
    folder.mkdir()
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    for precision, name in ((None, "float32"), ("int8", "int8")):
        extra = ["--precision", precision] if precision else []
        assert main(["encode", "--model", str(out), "--images", str(folder), "--out", str(tmp_path / f"{name}.npz"),
                     *extra]) == 0
        assert main(["sample", "--model", str(out), "--n", "4", "--out", str(tmp_path / f"{name}.png"), *extra]) == 0
    with np.load(tmp_path / "float32.npz") as a, np.load(tmp_path / "int8.npz") as b:
        assert a["keys"].tolist() == b["keys"].tolist()
        assert 0 < np.abs(a["mu"] - b["mu"]).max() < 0.5  # the int8 graph ran: close, not identical
    assert (tmp_path / "int8.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["encode", "--model", str(out / "encoder.onnx"), "--images", str(folder), "--out",
                 str(tmp_path / "x.npz"), "--precision", "int4"]) == 2

