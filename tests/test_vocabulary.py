"""One vocabulary for the exported graphs: kinds and precisions, the one function that makes a graph's file name and
its inverse, the older spellings read as today's names, and unknown names refused in one line."""

from __future__ import annotations

import pytest

from vae_runtime.errors import BadInput, RuntimeModelError
from vae_runtime.vocabulary import (KINDS, PRECISIONS, graph_name, graph_names, metadata_name, parse_graph_name,
                                    precision_name, precision_names)


def test_a_graph_file_name_is_made_and_read_back_by_the_vocabulary():
    assert graph_name("decoder") == graph_name("decoder", "fp32") == "decoder.onnx"
    assert graph_name("decoder", "fp16") == "decoder.fp16.onnx" and graph_name("encoder", "int8") == "encoder.int8.onnx"
    for kind in KINDS:
        for precision in PRECISIONS:
            assert parse_graph_name(graph_name(kind, precision)) == (kind, precision)


def test_names_that_are_not_graphs_of_the_vocabulary_read_as_none():
    for name in ("model.json", "decoder.onnx.data", "decoder.bf16.onnx", "decoder.float16.onnx", "vae.onnx",
                 "decoder", "decoder.fp32.onnx", None):
        assert parse_graph_name(name) is None, name


def test_older_spellings_read_as_todays_names():
    assert precision_name(None) == precision_name("float32") == precision_name("fp32") == "fp32"
    assert precision_name("float16") == "fp16"
    assert graph_name("decoder", "float32") == "decoder.onnx"
    assert graph_name("decoder", "float16") == "decoder.fp16.onnx"
    # the graphs' metadata_props say ONNX's element-type words, and those read back as the vocabulary's names
    assert [metadata_name(p) for p in PRECISIONS] == ["float32", "float16", "int8"]
    assert all(precision_name(metadata_name(p)) == p for p in PRECISIONS)


def test_the_graphs_an_export_writes_follow_the_precisions_asked_for():
    assert graph_names() == ["encoder.onnx", "decoder.onnx"]
    assert graph_names(["int8", "float16", "fp32", "int8"]) == [
        "encoder.onnx", "decoder.onnx", "decoder.fp16.onnx", "encoder.int8.onnx", "decoder.int8.onnx"]
    assert precision_names("int8") == ("int8",) and precision_names(None) == () and precision_names(["fp32"]) == ()


@pytest.mark.parametrize("value", ["int4", "FP16", "", 16, ["fp16"]])
def test_an_unknown_precision_is_one_line_naming_it_and_the_known_ones(value):
    with pytest.raises(BadInput) as caught:
        precision_name(value)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"precision {value!r}: not offered")
    assert "the precisions: fp32, fp16, int8; float32 is read as fp32, float16 is read as fp16" in message


def test_the_caller_names_the_input_and_picks_its_error_type():
    with pytest.raises(RuntimeModelError, match=r"^--precision 'bf16': not offered \(.*\); onnxruntime's CPU "
                                                r"provider has no bf16 convolution"):
        precision_names(["fp16", "bf16"], RuntimeModelError, "--precision")
    with pytest.raises(RuntimeModelError, match=r"^graph kind 'vae': expected one of encoder, decoder$"):
        graph_name("vae", error=RuntimeModelError)
    with pytest.raises(RuntimeModelError, match=r"^precision 'half': not offered"):
        graph_name("decoder", "half", RuntimeModelError)
