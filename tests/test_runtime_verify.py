"""The runtime verifies what it runs: every file a graph reads (ONNX external weights) is hashed at export and at
publication and checked like the graph before a session opens; a graph reads nothing outside its folder; the sizes
a model declares are bounded and must match its graph before anything is sized from them; a run has a timeout."""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from vae_runtime.digest import sha256_file
from vae_runtime.errors import BadInput
from exported_model import exported_once
from vae.cli import main
from vae_runtime import Champion, Decoder, RunTimeout, RuntimeModelError
from vae_runtime import registry as reg
from vae.serving import promotion, versions
from vae_runtime.graph_files import referenced_files

DATA = "decoder.onnx.data"


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return exported_once(trained_run, tmp_path_factory)


@pytest.fixture(scope="module")
def external(trained_run, tmp_path_factory):
    """A real export of the tiny run whose decoder keeps its weights in `decoder.onnx.data` (saved so right
    after its metadata is set): export's own hashing, validation and card, with an external weights file."""
    import vae.serving.export as export_module
    from vae.serving.graphs import set_metadata

    def set_metadata_then_externalize(path, metadata):
        set_metadata(path, metadata)
        if path.name == "decoder.onnx":
            onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=DATA, size_threshold=1024)  # weights out, small shape constants in

    patch = pytest.MonkeyPatch()
    patch.setattr(export_module, "set_metadata", set_metadata_then_externalize)
    try:
        out = tmp_path_factory.mktemp("external")
        card = export_module.export(trained_run, out, version="external-1")
    finally:
        patch.undo()
    return out.resolve(), card


def one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def evidence(nll):
    return {"nll_bpd": nll, "elbo_bpd": 1.0, "k": 8, "split": "test", "split_fingerprint": "f" * 64,
            "image_size": 16}


def publish(registry, out, card, version="v1", leave_out=()):
    files = {name: out / name for name in [*card["files"], "model.json"] if name not in leave_out}
    versions.register(registry, version, files)
    promotion.promote(registry, version, evidence(5.0))


def decoder_model(nodes, latent_dim: int, initializers=(), size: int = 16) -> onnx.ModelProto:
    """A graph with the decoder's interface and metadata: z [N, latent_dim] -> x_mean [N, 3, size, size]."""
    graph = helper.make_graph(nodes, "decoder",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", latent_dim])],
                              [helper.make_tensor_value_info("x_mean", TensorProto.FLOAT, ["N", 3, size, size])],
                              list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"contract_version": "1", "latent_dim": str(latent_dim), "image_size": str(size),
                                   "channels": "3"})
    return model


def images_from(source: str) -> list[onnx.NodeProto]:
    """Nodes making x_mean [N, 3, 16, 16] from any [N, k] tensor `source` (its row sums, spread out)."""
    return [helper.make_node("ReduceSum", [source, "axis1"], ["sums"], keepdims=1),
            helper.make_node("Reshape", ["sums", "column"], ["column4"]),
            helper.make_node("Expand", ["column4", "image_shape"], ["spread"]),
            helper.make_node("Sigmoid", ["spread"], ["x_mean"])]


IMAGE_CONSTANTS = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
                   numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "column"),
                   numpy_helper.from_array(np.array([1, 3, 16, 16], np.int64), "image_shape")]


def looping_decoder(trips: int = 2**62) -> onnx.ModelProto:
    """A decoder whose graph adds 1 to z `trips` times in a Loop before making its images: hostile by design."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    loop = helper.make_node("Loop", ["trips", "keep_going", "z"], ["acc"], body=body)
    counters = [helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
                helper.make_tensor("keep_going", TensorProto.BOOL, [], [True])]
    return decoder_model([loop, *images_from("acc")], 4, [*counters, *IMAGE_CONSTANTS])


def scale_largest_weights(folder) -> None:
    """The decoder's largest float tensor in `folder`'s DATA file, times 1.5: same size, other weights."""
    graph = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    tensor = max((t for t in graph.graph.initializer if t.data_type == TensorProto.FLOAT),
                 key=lambda t: int(np.prod(t.dims)))
    where = {entry.key: entry.value for entry in tensor.external_data}
    start, length = int(where.get("offset", 0)), int(where["length"])
    data = bytearray((folder / DATA).read_bytes())
    data[start:start + length] = (np.frombuffer(bytes(data[start:start + length]), np.float32) * 1.5).tobytes()
    (folder / DATA).write_bytes(bytes(data))


def external_tensor(name: str, location: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.ones(4, np.float32), name)
    set_external_data(tensor, location=location)
    tensor.ClearField("raw_data")
    return tensor


def test_export_and_publishing_hash_the_weights_file_a_graph_reads(external, exported, tmp_path):
    out, card = external
    assert referenced_files(out / "decoder.onnx") == [DATA] and (out / DATA).stat().st_size > 1000
    assert DATA in card["files"] and card["sha256"][DATA] == sha256_file(out / DATA)
    want = Decoder(exported[0]).sample(3, seed=1)  # the same weights, held inside the graph
    np.testing.assert_array_equal(Decoder(out).sample(3, seed=1), want)

    publish(tmp_path / "registry", out, card)
    assert reg.read_version_record(tmp_path / "registry", "v1")["files"][DATA] == card["sha256"][DATA]
    np.testing.assert_array_equal(Decoder(tmp_path / "registry").sample(3, seed=1), want)
    publish("memory://verify-external", out, card)  # a remote champion: both files cached, side by side
    champion = Champion("memory://verify-external", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(champion.decoder().sample(3, seed=1), want)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("decoder.onnx*")) == ["decoder.onnx", DATA]
    with pytest.raises(reg.RegistryError, match=f"decoder.onnx keeps weights in {DATA}, which is not among the"):
        publish(tmp_path / "registry", out, card, version="v2", leave_out=(DATA,))


def test_a_replaced_weights_file_beside_a_pinned_graph_is_refused_in_one_line(external, tmp_path, capsys):
    out, card = external
    copy = tmp_path / "model"
    shutil.copytree(out, copy)
    scale_largest_weights(copy)
    assert not np.array_equal(Decoder(copy / "decoder.onnx").sample(2), Decoder(out).sample(2))  # it would matter
    with pytest.raises(RuntimeModelError, match=f"{DATA}: sha256 differs from model.json's .*weights of decoder.onnx"):
        Decoder(copy)
    assert main(["sample", "--model", str(copy), "--n", "4", "--out", str(tmp_path / "g.png")]) == 2
    one_line(capsys, str(copy / DATA), "sha256 differs")
    assert not (tmp_path / "g.png").exists()

    older = json.loads((out / "model.json").read_text())
    del older["sha256"][DATA]
    (copy / "model.json").write_text(json.dumps(older))
    with pytest.raises(RuntimeModelError, match=f"keeps weights in {DATA}, for which model.json lists no sha256"):
        Decoder(copy)

    registry = tmp_path / "registry"
    publish(registry, out, card)
    shutil.copyfile(copy / DATA, registry / "train-vae" / "versions" / "v1" / DATA)
    with pytest.raises(RuntimeModelError, match="sha256 differs from the registry's version record"):
        Champion(registry).decoder()


@pytest.mark.parametrize("location", ["../w.bin", "/etc/hostname", "sub/w.bin", ""])
def test_a_graph_reading_weights_outside_its_folder_is_refused(external, tmp_path, location):
    out, _ = external
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    shutil.copyfile(out / DATA, tmp_path / "w.bin")  # the real weights, reachable: refused all the same
    shutil.copyfile(out / DATA, folder / "sub" / "w.bin")
    onnx.save(graph, str(folder / "decoder.onnx"))
    with pytest.raises(RuntimeModelError, match=f"keeps weights in {location!r}, not a file beside it"):
        Decoder(folder / "decoder.onnx")  # even a bare graph, loaded without a card


def test_external_weights_are_found_wherever_a_graph_can_hold_a_tensor(tmp_path):
    body = helper.make_graph([helper.make_node("Identity", ["c"], ["c2"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("c2", TensorProto.BOOL, [])],
                             [external_tensor("in_body", "body.bin")])
    sparse = helper.make_sparse_tensor(external_tensor("values", "sparse.bin"),
                                       numpy_helper.from_array(np.array([0], np.int64), "indices"), [4])
    function = helper.make_function("local", "f", ["x"], ["y"], [
        helper.make_node("Constant", [], ["y"], value=external_tensor("in_function", "function.bin"))],
        [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "c"], [], body=body),
         helper.make_node("Constant", [], ["k"], value=external_tensor("in_attribute", "attribute.bin")),
         helper.make_node("f", ["k"], ["y"], domain="local")],
        "g", [helper.make_tensor_value_info("n", TensorProto.INT64, []),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [external_tensor("initializer", "initializer.bin")], sparse_initializer=[sparse])
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 17),
                                                                          helper.make_opsetid("local", 1)])
    onnx.save(model, str(tmp_path / "g.onnx"))
    assert referenced_files(tmp_path / "g.onnx") == ["attribute.bin", "body.bin", "function.bin", "initializer.bin",
                                                     "sparse.bin"]
    model.graph.node[0].attribute[0].g.initializer[0].external_data[0].value = "../up.bin"  # inside the Loop's body
    onnx.save(model, str(tmp_path / "g.onnx"))
    with pytest.raises(BadInput, match="keeps weights in '../up.bin', not a file beside it"):
        referenced_files(tmp_path / "g.onnx")
    (tmp_path / "cut.onnx").write_bytes((tmp_path / "g.onnx").read_bytes()[:-3])  # a message cut short
    with pytest.raises(BadInput, match="not an ONNX graph"):
        referenced_files(tmp_path / "cut.onnx")


def test_a_card_declaring_a_huge_latent_dim_is_one_line_before_anything_is_allocated(exported, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(exported[0].resolve(), copy)
    card = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**card, "latent_dim": 2**24}))
    assert main(["sample", "--model", str(copy), "--n", "64", "--out", str(tmp_path / "a.png")]) == 2
    one_line(capsys, f"model folder {copy}", "model.json declares latent_dim 16777216", "decoder.onnx has 4")

    # a graph and a card that agree on 2**24 (64 such latents would take 8 GiB): bounded, whatever they agree on
    huge = tmp_path / "huge"
    huge.mkdir()
    slice_ = helper.make_node("Slice", ["z", "zero", "pixels", "axis1"], ["first"])
    onnx.save(decoder_model([slice_, *images_from("first")], 2**24, [
        *IMAGE_CONSTANTS, numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([768], np.int64), "pixels")]), str(huge / "decoder.onnx"))
    (huge / "model.json").write_text(json.dumps({**card, "latent_dim": 2**24,
                                                 "sha256": {"decoder.onnx": sha256_file(huge / "decoder.onnx")}}))
    tracemalloc.start()
    started = time.monotonic()
    try:
        code = main(["sample", "--model", str(huge), "--n", "64", "--out", str(tmp_path / "b.png")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and time.monotonic() - started < 10 and peak < 64 * 2**20
    one_line(capsys, str(huge / "decoder.onnx"), "latent_dim 16777216, outside [1, 65536]")


@pytest.mark.parametrize("key, value, shown", [("image_size", 32, "image_size 32"), ("channels", 1, "channels 1"),
                                               ("latent_dim", 5, "latent_dim 5")])
def test_a_card_whose_sizes_disagree_with_its_graph_is_refused(exported, tmp_path, key, value, shown):
    copy = tmp_path / "model"
    shutil.copytree(exported[0].resolve(), copy)
    card = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**card, key: value}))
    with pytest.raises(RuntimeModelError, match=f"model folder {copy}: model.json declares {shown}, its graph"):
        Decoder(copy)


def test_a_graph_that_loops_for_ever_ends_at_its_timeout_in_one_line(tmp_path, capsys):
    onnx.save(looping_decoder(), str(tmp_path / "decoder.onnx"))
    decoder = Decoder(tmp_path / "decoder.onnx", timeout=1)
    started = time.monotonic()
    with pytest.raises(RunTimeout, match=r"took longer than the 1 s timeout and was ended"):
        decoder.decode(np.zeros((2, 4), np.float32))
    assert 0.9 < time.monotonic() - started < 5
    onnx.save(looping_decoder(trips=3), str(tmp_path / "short.onnx"))  # the same graph, looping 3 times, runs
    np.testing.assert_allclose(Decoder(tmp_path / "short.onnx", timeout=1).decode(np.zeros((1, 4))),
                               np.full((1, 3, 16, 16), 1 / (1 + np.exp(-12.0))), rtol=1e-6)

    started = time.monotonic()
    assert main(["sample", "--model", str(tmp_path / "decoder.onnx"), "--n", "4", "--timeout", "1",
                 "--out", str(tmp_path / "g.png")]) == 1  # a failed run: a slow machine is not bad input
    assert time.monotonic() - started < 5
    one_line(capsys, "vae: failed:", "1 s timeout", "raise the timeout")
    for timeout in (0, -1, float("nan"), True, "1"):
        with pytest.raises(RuntimeModelError, match="timeout: expected seconds"):
            Decoder(tmp_path / "decoder.onnx", timeout=timeout)
    assert main(["sample", "--model", str(tmp_path / "decoder.onnx"), "--timeout", "0", "--out", "x.png"]) == 2
    assert "expected seconds in (0, 604800]" in capsys.readouterr().err


def test_batches_are_bounded(exported):
    decoder = Decoder(exported[0])
    with pytest.raises(RuntimeModelError, match="batch_size: expected an integer >= 1 and <= 65536"):
        decoder.sample(2, batch_size=65537)
    with pytest.raises(RuntimeModelError, match="z: 65537 latents in one call, over 65536"):
        decoder.decode(np.zeros((65537, 4), np.float32))


def test_records_written_before_weights_files_were_hashed_still_load(exported, tmp_path):
    """Today's export writes graphs that hold their weights: its card hashes the graphs alone and its version
    record lists them alone. Both load as they are, with no warning."""
    out, card = exported
    assert sorted(card["sha256"]) == sorted(card["files"])
    assert all(referenced_files(out / name) == [] for name in card["files"])
    registry = tmp_path / "registry"
    versions.register(registry, "v1", {n: out / n for n in ("decoder.onnx", "encoder.onnx", "model.json")})
    promotion.promote(registry, "v1", evidence(5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = Decoder(out).sample(2, seed=4)
        np.testing.assert_array_equal(Decoder(registry).sample(2, seed=4), want)
