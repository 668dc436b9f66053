"""Export: the contract's names, dynamic batch, metadata, EMA weights, onnxruntime parity with PyTorch, no
random op, nothing written when validation fails, and the float16 decoder validated against float32."""

import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vae_runtime.digest import sha256_file
from vae_runtime.errors import BadInput
from exported_model import exported_once
from vae.core.checkpoint import load_trained
from vae.serving.export import FP16_DECODER, FP16_TOLERANCE, TOLERANCE, ExportError, export, random_ops, validate_fp16
from vae_runtime import Decoder, Encoder


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return exported_once(trained_run, tmp_path_factory)


def test_contract_names_shapes_and_metadata(exported):
    out, card = exported
    enc = onnx.load(str(out / "encoder.onnx"))
    dec = onnx.load(str(out / "decoder.onnx"))
    assert [i.name for i in enc.graph.input] == ["x"] and [o.name for o in enc.graph.output] == ["mu", "logvar"]
    assert [i.name for i in dec.graph.input] == ["z"] and [o.name for o in dec.graph.output] == ["x_mean"]
    for graph in (enc, dec):
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch
        for value in [*graph.graph.input, *graph.graph.output]:
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name
            assert value.type.tensor_type.shape.dim[0].dim_param, value.name  # outputs follow the batch
        meta = {p.key: p.value for p in graph.metadata_props}
        for key in ("latent_dim", "image_size", "channels", "likelihood", "version", "created", "config_hash",
                    "metrics", "contract_version"):
            assert key in meta, key
        assert meta["latent_dim"] == "4" and meta["image_size"] == "16" and meta["version"] == "test-1"
        assert meta["channels"] == "3" and meta["precision"] == "float32" and meta["weights"] == "ema"
        assert json.loads(meta["preprocessing"])["crop"] == 148
    model_json = json.loads((out / "model.json").read_text())
    assert model_json["latent_dim"] == 4 and model_json["metrics"] == card["metrics"]
    assert model_json["files"] == ["encoder.onnx", "decoder.onnx", FP16_DECODER]
    assert set(model_json["validation"]["max_abs_diff"]) == {"1", "7", "64"}
    assert not list(out.glob("*.data")) and not list(out.glob(".*"))  # weights inside, no leftovers


def test_batch_is_dynamic(exported):
    out, _ = exported
    decoder, encoder = Decoder(out / "decoder.onnx"), Encoder(out / "encoder.onnx")
    for n in (1, 3, 70):
        assert decoder.decode(np.zeros((n, 4), np.float32)).shape == (n, 3, 16, 16)
        assert encoder.encode(np.zeros((n, 3, 16, 16), np.float32))[0].shape == (n, 4)


def test_no_random_op_in_any_graph(exported):
    out, _ = exported
    for name in ("encoder.onnx", "decoder.onnx", FP16_DECODER):
        assert random_ops(out / name) == set(), name
    z = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    decoder = Decoder(out / "decoder.onnx")
    assert np.array_equal(decoder.decode(z), decoder.decode(z))  # deterministic: the noise is the caller's


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
    np.testing.assert_allclose(Decoder(out / "decoder.onnx").decode(z), want_x, atol=TOLERANCE, rtol=0)
    mu, logvar = Encoder(out / "encoder.onnx").encode(x)
    np.testing.assert_allclose(mu, want_mu, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logvar, want_logvar, atol=TOLERANCE, rtol=0)


def test_export_holds_the_ema_weights_not_the_raw_ones(exported, trained_run):
    out, card = exported
    ema, _, step = load_trained(trained_run, ema=True)
    raw, _, _ = load_trained(trained_run, ema=False)
    z = np.random.default_rng(7).standard_normal((16, 4)).astype(np.float32)
    x = np.random.default_rng(8).random((16, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want_ema, want_raw = (m.decode_mean(torch.from_numpy(z)).numpy() for m in (ema, raw))
        mu_ema, mu_raw = (m.encode(torch.from_numpy(x))[0].numpy() for m in (ema, raw))
    assert np.abs(want_ema - want_raw).max() > 10 * TOLERANCE  # the premise: the two really differ here
    assert np.abs(mu_ema - mu_raw).max() > 10 * TOLERANCE
    got = Decoder(out / "decoder.onnx").decode(z)
    np.testing.assert_allclose(got, want_ema, atol=TOLERANCE, rtol=0)
    assert np.abs(got - want_raw).max() > 10 * TOLERANCE
    np.testing.assert_allclose(Encoder(out / "encoder.onnx").encode(x)[0], mu_ema, atol=TOLERANCE, rtol=0)
    assert card["weights"] == "ema" and card["step"] == step


def test_failed_validation_writes_nothing(trained_run, tmp_path, monkeypatch):
    import vae.serving.export as export_module

    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # nothing can pass
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="disagrees"):
        export(trained_run, out)
    assert not out.exists() and not out.is_symlink()
    assert [p.name for p in tmp_path.iterdir()] == [".out.export.lock"]  # no staging folder is left


def test_fp16_decoder_keeps_the_float32_interface_and_matches_float32(exported):
    out, card = exported
    graph = onnx.load(str(out / FP16_DECODER))
    assert [i.name for i in graph.graph.input] == ["z"] and [o.name for o in graph.graph.output] == ["x_mean"]
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    weights = [t for t in graph.graph.initializer if len(t.dims) > 1]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["precision"] == "float16" and meta["contract_version"] == "1"
    report = card["validation"]["fp16_decoder"]
    assert report["tolerance"] == FP16_TOLERANCE
    # onnxruntime 1.32's CPU provider runs this float16 graph, so the check ran here (not skipped):
    assert report["validated"] is True and report["max_abs_diff"] <= FP16_TOLERANCE
    z = np.random.default_rng(3).standard_normal((9, 4)).astype(np.float32)
    half = Decoder(out / FP16_DECODER).decode(z)
    assert half.dtype == np.float32
    assert np.abs(half - Decoder(out / "decoder.onnx").decode(z)).max() <= FP16_TOLERANCE


def test_fp16_decoder_is_the_float32_graph_with_casts_at_its_ends(exported):
    """Same ops as decoder.onnx but two Casts (z in, the likelihood's parameters out): no float16-only ops
    such as the sequence ops and CastLikes that an earlier form had, which a GPU provider may leave on the CPU."""
    out, _ = exported
    ops32 = Counter(n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node)
    ops16 = Counter(n.op_type for n in onnx.load(str(out / FP16_DECODER)).graph.node)
    assert ops16 - ops32 == Counter({"Cast": 2})
    assert not ops32 - ops16


def test_fp16_validation_skips_with_a_clear_message_where_onnxruntime_cannot_run_it(exported, tmp_path,
                                                                                   monkeypatch):
    import vae.serving.export as export_module

    out, _ = exported
    for name in ("decoder.onnx", FP16_DECODER):
        shutil.copy(out / name, tmp_path / name)
    real_session = export_module._session

    def no_float16(path, device="cpu"):
        if path.name == FP16_DECODER:
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation "
                               "for Conv(11) node with name 'conv' (float16)")
        return real_session(path)

    monkeypatch.setattr(export_module, "_session", no_float16)
    with pytest.warns(RuntimeWarning, match="validation skipped.*cannot run float16 on (the CPU|CUDA or the CPU) here"):
        report = validate_fp16(tmp_path, latent_dim=4)
    assert report["validated"] is False and "NOT_IMPLEMENTED" in report["skipped"]


def test_fp16_validation_asks_for_cuda_and_reports_the_provider_that_actually_ran(exported, tmp_path,
                                                                                  monkeypatch):
    import onnxruntime as ort

    import vae.serving.export as export_module

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present: it may really run the graph on a GPU")
    out, _ = exported
    for name in ("decoder.onnx", FP16_DECODER):
        shutil.copy(out / name, tmp_path / name)
    asked = []
    real_session = export_module._session
    monkeypatch.setattr(export_module, "_session", lambda path, device="cpu": asked.append((path.name, device))
                        or real_session(path, device))
    # an onnxruntime that lists CUDA but cannot start it (no GPU here) falls back to the CPU without raising
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = validate_fp16(tmp_path, latent_dim=4)
    assert (FP16_DECODER, "cuda") in asked and ("decoder.onnx", "cpu") in asked
    assert report["validated"] is True and report["provider"] == "CPUExecutionProvider"


def test_fp16_decoder_that_disagrees_fails_the_export_check(exported, tmp_path, monkeypatch):
    import vae.serving.export as export_module

    out, _ = exported
    for name in ("decoder.onnx", FP16_DECODER):
        shutil.copy(out / name, tmp_path / name)
    monkeypatch.setattr(export_module, "FP16_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="decoder.fp16.onnx: differs from decoder.onnx"):
        validate_fp16(tmp_path, latent_dim=4)


def test_reexport_switches_the_whole_folder_and_drops_a_stale_fp16_decoder(trained_run, tmp_path, capsys):
    from vae.cli import main

    out = tmp_path / "model"
    assert main(["export", "--run", str(trained_run), "--out", str(out), "--fp16"]) == 0
    assert FP16_DECODER in {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert re.search(r"decoder\.fp16\.onnx: max abs diff from decoder\.onnx \S+ \(tolerance 1e-02, on "
                     r"(CPU|CUDA)ExecutionProvider\)", printed), printed
    first = out.resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["export", "--run", str(trained_run), "--out", str(out)]) == 0
    # switched whole; the replaced export stays for readers that resolved the link before the switch ...
    assert out.is_symlink() and out.resolve() != first and (first / "decoder.onnx").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "decoder.onnx", "encoder.onnx", "metrics.json",
                                                     "model.json", "samples.png"]
    assert "EMA weights" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".model.export.lock", out.resolve().name, "model",
                                                                 first.name])
    second = out.resolve()
    assert main(["export", "--run", str(trained_run), "--out", str(out)]) == 0  # ... until the next export
    assert not first.exists() and second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".model.export.lock", out.resolve().name, "model",
                                                                 second.name])


def test_export_refuses_a_real_folder_that_holds_files(trained_run, tmp_path, capsys):
    from vae.cli import main

    out = tmp_path / "model"
    out.mkdir()
    (out / "decoder.onnx").write_bytes(b"someone else's graph")
    assert main(["export", "--run", str(trained_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a non-empty folder, not a link" in err and len(err.strip().splitlines()) == 1
    assert (out / "decoder.onnx").read_bytes() == b"someone else's graph"


def test_mixture_decoder_exports_its_expected_image(tmp_path):
    """logistic_mixture's x_mean (the mixture's expected colour, channels coupled) survives export."""
    from vae.core.config import load_config
    from vae.models import build_model
    from vae.serving.export import export_graphs

    cfg = load_config(None, ["model.image_size=16", "model.channels=[8,16]", "model.latent_dim=6",
                             "model.likelihood=logistic_mixture", "model.mixtures=4"]).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    export_graphs(model, tmp_path)
    assert random_ops(tmp_path / "decoder.onnx") == set()
    z = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32) * 3
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["x_mean"], {"z": z})[0]
    with torch.no_grad():
        want = model.decode_mean(torch.from_numpy(z)).numpy()
    assert want.std() > 0.01  # a real image, not a constant
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_nan_outputs_never_pass_the_export_gate(trained_run, tmp_path):
    """A NaN beside a finite difference once lost to Python's max: a NaN logvar passed and was published."""
    from vae.serving.export import _max_abs_diff, export_graphs, validate

    assert np.isnan(_max_abs_diff([np.zeros(2), np.full(2, np.nan)], (torch.zeros(2), torch.zeros(2))))
    model = load_trained(trained_run, ema=True)[0]
    with torch.no_grad():
        model.to_posterior.bias[model.latent_dim:] = float("nan")  # the logvar half of the posterior head
    export_graphs(model, tmp_path)
    images = np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)
    with pytest.raises(ExportError, match="outputs are not finite"):
        validate(tmp_path, model, images)


def test_a_run_whose_metrics_are_not_finite_is_not_exported(trained_run, tmp_path, monkeypatch):
    from vae.serving import export as export_module

    real = export_module.current_metrics
    monkeypatch.setattr(export_module, "current_metrics",
                        lambda *args: {**real(*args), "nll_bpd": float("nan")})
    with pytest.raises(ExportError, match=r"metrics are not finite .*nll_bpd nan"):
        export(trained_run, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_validation_shards_must_match_the_model_and_its_preprocessing(trained_run, synth_source, tmp_path, capsys):
    from pipeline.shard import shard
    from vae.cli import main

    shard(synth_source, tmp_path / "crop0", size=16, crop=0, maxcount=60, progress=False)
    shard(synth_source, tmp_path / "size8", size=8, maxcount=60, progress=False)
    for shards, message in (("crop0", "preprocessed with crop 0; the run trained on crop 148"), ("size8", "images of 8x8")):
        code = main(["export", "--run", str(trained_run), "--out", str(tmp_path / "m"), "--shards",
                     str(tmp_path / shards)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "m").exists()


def test_a_retried_flow_export_reuses_the_export_of_its_version(trained_run, tmp_path):
    """A retried flow run re-exporting would make new bytes (the card's `created`), which a version half-registered
    on object storage refuses; the retry reuses the export when it holds this version of these weights, whole."""
    from flows.train_vae import export_model
    from vae.serving.export import existing_export

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export", ".export*"))
    first = Path(export_model.fn(str(run), "v-1"))
    card = (first / "model.json").read_bytes()
    assert Path(export_model.fn(str(run), "v-1")) == first and (first / "model.json").read_bytes() == card
    assert existing_export(run / "export", run, "v-1") is not None
    assert existing_export(run / "export", run, "v-2") is None  # another version
    assert existing_export(run / "export", run, "v-1", precisions=("fp16",)) is None  # a graph it lacks
    assert existing_export(run / "export", run, "v-1", precisions=("int8",)) is None
    (first / "decoder.onnx").write_bytes(b"damaged")
    assert existing_export(run / "export", run, "v-1") is None
    again = Path(export_model.fn(str(run), "v-1"))
    assert json.loads((again / "model.json").read_text())["sha256"]["decoder.onnx"] == sha256_file(
        again / "decoder.onnx")


def test_a_retry_exports_again_over_a_card_whose_fields_are_damaged(tmp_path):
    from vae.serving.export import existing_export

    card = tmp_path / "model.json"
    for damaged in ({"version": "v-1", "sha256": ["encoder.onnx", "decoder.onnx"]}, ["v-1"], "[" * 20_000):
        card.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
        assert existing_export(tmp_path, tmp_path, "v-1") is None


def test_the_runs_own_preprocessing_decides_even_where_its_shards_cannot_be_read(trained_run, tiny_shards):
    """Checkpoints record the preprocessing they trained on (tests/test_run.py: even where the run's shards cannot
    be read here); only a run from before that record, whose shards cannot be read, takes the given shards'."""
    from vae.core.run import Run
    from vae.serving.export import _same_preprocessing

    recorded = Run(trained_run).preprocessing
    assert recorded == json.loads((tiny_shards / "manifest.json").read_text())["preprocessing"]
    with pytest.raises(BadInput, match="preprocessed with crop 0; the run trained on crop 148"):
        _same_preprocessing(recorded, "crop0-shards", {**recorded, "crop": 0})
    found = {"crop": 0, "size": 16}
    with pytest.warns(RuntimeWarning, match="preprocessing is unknown here"):
        assert _same_preprocessing(None, str(tiny_shards), found) == found
