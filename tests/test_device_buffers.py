"""Device buffers: the runtime binds the app's own memory (OrtValues, arrays with __array_interface__ on the CPU
provider, __cuda_array_interface__ on CUDA) and writes outputs in place; bad buffers are one-line errors; CUDA
graphs replay on fixed buffers. The CUDA half runs where onnxruntime-gpu and a GPU are present (bench/gpu_check.sh
runs this file on a lent GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from exported_model import exported_once
from vae_runtime import Decoder, Encoder, RuntimeModelError, providers_for


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return exported_once(trained_run, tmp_path_factory)[0]


def cuda_ready() -> bool:
    import onnxruntime as ort
    torch = pytest.importorskip("torch")
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def codes(n: int, latent_dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, latent_dim)).astype(np.float32)


def test_numpy_buffers_in_and_out_on_the_cpu_provider(exported):
    decoder = Decoder(exported)
    z = codes(5, decoder.latent_dim)
    out = np.full((5, 3, decoder.image_size, decoder.image_size), -1.0, np.float32)
    assert decoder.decode_on_device(z, out=out) is out
    np.testing.assert_array_equal(out, decoder.decode(z))  # written in place, all of it
    encoder = Encoder(exported)
    mu = np.zeros((5, decoder.latent_dim), np.float32)
    encoder.encode_on_device(out, out=mu)
    np.testing.assert_array_equal(mu, encoder.encode(out)[0])


def test_ortvalues_in_and_out(exported):
    import onnxruntime as ort

    decoder = Decoder(exported)
    z = codes(3, decoder.latent_dim, seed=1)
    images = decoder.decode_on_device(ort.OrtValue.ortvalue_from_numpy(z, "cpu", 0))
    assert isinstance(images, ort.OrtValue) and images.device_name().lower() == "cpu"
    np.testing.assert_array_equal(images.numpy(), decoder.decode(z))
    target = ort.OrtValue.ortvalue_from_shape_and_type([3, 3, decoder.image_size, decoder.image_size], np.float32)
    assert decoder.decode_on_device(ort.OrtValue.ortvalue_from_numpy(z), out=target) is target
    np.testing.assert_array_equal(target.numpy(), decoder.decode(z))


class FakeCudaArray:
    """What a CUDA tensor shows the runtime (no GPU needed to check that it is refused on the CPU provider)."""

    def __init__(self, shape):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (1 << 20, False),
                                         "version": 3, "strides": None}


@pytest.mark.parametrize("make, needle", [
    (lambda d: codes(2, d).astype(np.float64), "z: expected float32 (typestr '<f4'), got '<f8'"),
    (lambda d: np.asfortranarray(codes(3, d)), "z: expected a C-contiguous buffer"),
    (lambda d: codes(2, d + 1), "z: expected shape ['N', LATENT], got [2, LATENT1]"),
    (lambda d: codes(0, d), "z: expected a non-empty buffer"),
    (lambda d: FakeCudaArray((2, d)), "z: the buffer lives on cuda but the session runs on cpu (open the model "
                                      "with device='cuda' where onnxruntime-gpu and a GPU are present"),
    (lambda d: [[0.0] * d], "z: expected an OrtValue or an array with __cuda_array_interface__"),
])
def test_bad_input_buffers_are_one_line_errors(exported, make, needle):
    decoder = Decoder(exported)
    d = decoder.latent_dim
    needle = needle.replace("LATENT1", str(d + 1)).replace("LATENT", str(d))
    with pytest.raises(RuntimeModelError) as caught:
        decoder.decode_on_device(make(d))
    assert needle in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_bad_output_buffers_are_refused_before_anything_runs(exported):
    decoder = Decoder(exported)
    z, s = codes(2, decoder.latent_dim), decoder.image_size
    with pytest.raises(RuntimeModelError, match=rf"out: expected shape \[2, 3, {s}, {s}\], got \[3, 3, {s}, {s}\]"):
        decoder.decode_on_device(z, out=np.zeros((3, 3, s, s), np.float32))
    frozen = np.zeros((2, 3, s, s), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(RuntimeModelError, match="out: the buffer is read-only"):
        decoder.decode_on_device(z, out=frozen)


class GradTensor:
    """What a CUDA tensor that requires grad does when asked for its interface."""

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad.\nUse var.detach()")


def test_an_object_that_refuses_its_interface_is_named_with_its_reason(exported):
    decoder = Decoder(exported)
    with pytest.raises(RuntimeModelError) as caught:
        decoder.decode_on_device(GradTensor())
    message = str(caught.value)
    assert message == ("z: GradTensor offers no __cuda_array_interface__ (RuntimeError: Can't get "
                       "__cuda_array_interface__ on Variable that requires grad.)")


def test_a_buffer_on_another_gpu_is_refused():
    from vae_runtime.device_buffers import Buffer, DeviceBufferError, check

    check("z", Buffer("cuda", 1 << 20, (2, 4), None, index=0), "cuda", 0, (None, 4))  # the session's GPU
    check("z", Buffer("cuda", 1 << 20, (2, 4), None, index=None), "cuda", 1, (None, 4))  # it does not say
    with pytest.raises(DeviceBufferError, match="z: the buffer lives on GPU 1 but the session runs on GPU 0 "
                                                r"\(open the model with device_id=1\)"):
        check("z", Buffer("cuda", 1 << 20, (2, 4), None, index=1), "cuda", 0, (None, 4))


def test_stream_handles_are_checked(exported):
    with pytest.raises(RuntimeModelError, match="cuda_stream: expected a stream handle"):
        Decoder(exported, cuda_stream="0x7f")
    # onnxruntime reads a null stream as none: the default stream would silently lose the ordering promised
    with pytest.raises(RuntimeModelError, match="cuda_stream: 0 is the default stream, which onnxruntime takes "
                                                r"as no stream .*torch.cuda.Stream\(\).cuda_stream"):
        Decoder(exported, device="cuda", cuda_stream=0)
    decoder = Decoder(exported, cuda_stream=1)
    z = codes(1, decoder.latent_dim)
    with pytest.raises(RuntimeModelError, match="1 is CUDA's legacy default stream"):
        decoder.capture(z, np.zeros((1, 3, decoder.image_size, decoder.image_size), np.float32))


def test_options_after_threads_are_keywords(exported):
    with pytest.raises(TypeError):
        Decoder(exported, "cpu", 2, "int8")  # a precision given by position must not land in `spinning`


class Interface:
    """An object showing the runtime an __array_interface__ of its choosing."""

    def __init__(self, **face):
        self.__array_interface__ = {"version": 3, "typestr": "<f4", "strides": None, **face}


@pytest.mark.parametrize("face, needle", [
    ({"shape": (2, "LATENT")}, "gives no (address, read-only) pair as data (got NoneType)"),
    ({"shape": (2, "LATENT"), "data": memoryview(bytearray(8))}, "pair as data (got memoryview)"),  # allowed by NumPy
    ({"shape": ("two", "LATENT"), "data": (1 << 20, False)}, "gives no shape of sizes (got ('two', "),
])
def test_a_malformed_array_interface_is_one_line_naming_the_buffer(exported, face, needle):
    decoder = Decoder(exported)
    d = decoder.latent_dim
    face["shape"] = tuple(d if dim == "LATENT" else dim for dim in face["shape"])
    with pytest.raises(RuntimeModelError) as caught:
        decoder.decode_on_device(Interface(**face))
    message = str(caught.value)
    assert message.startswith("z: its __array_interface__ gives no ") and needle in message
    assert len(message.splitlines()) == 1


def test_an_empty_or_foreign_ortvalue_is_refused_naming_it(exported):
    import onnxruntime as ort

    decoder = Decoder(exported)
    s, d = decoder.image_size, decoder.latent_dim
    with pytest.raises(RuntimeModelError, match=r"z: expected a non-empty buffer, got shape \[0, "):
        decoder.decode_on_device(ort.OrtValue.ortvalue_from_numpy(codes(0, d)))
    empty_out = ort.OrtValue.ortvalue_from_numpy(np.zeros((0, 3, s, s), np.float32))
    with pytest.raises(RuntimeModelError, match="out: expected a non-empty buffer"):
        decoder.decode_on_device(codes(2, d), out=empty_out)
    other = Decoder(exported)  # an OrtValue made by another session binds to that session only
    if not hasattr(other.session, "create_ortvalue_from_shape_and_type"):
        pytest.skip("this onnxruntime has no session-scoped OrtValues")
    scoped = other.session.create_ortvalue_from_shape_and_type([2, 3, s, s], np.float32, "cpu", 0)
    with pytest.raises(RuntimeModelError) as caught:
        decoder.decode_on_device(codes(2, d), out=scoped)
    message = str(caught.value)
    assert message.startswith("out: onnxruntime cannot bind it (") and "ortvalue_from_numpy" in message


def test_cuda_graphs_need_the_cuda_provider(exported):
    decoder = Decoder(exported)
    z = codes(2, decoder.latent_dim)
    out = np.zeros((2, 3, decoder.image_size, decoder.image_size), np.float32)
    with pytest.raises(RuntimeModelError, match="CUDA graphs need onnxruntime-gpu's CUDA provider.*"
                                                "runs on CPUExecutionProvider"):
        decoder.capture(z, out)


def test_cuda_options_reach_the_provider(monkeypatch):
    from vae_runtime import sessions

    monkeypatch.setattr(sessions.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    name, options = providers_for("cuda", device_id=1, cuda_stream=1234, cuda_graph=True)[0]
    assert name == "CUDAExecutionProvider"
    assert options["device_id"] == "1" and options["user_compute_stream"] == "1234"
    assert options["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in providers_for("cuda")[0][1]
    assert "user_compute_stream" not in providers_for("cuda")[0][1]


@pytest.mark.parametrize("graph", ["decoder.onnx", "decoder.fp16.onnx"])
def test_cuda_tensors_in_and_out_and_captured_graphs(exported, graph):
    """On a GPU: torch CUDA tensors bound in place agree with the NumPy path, and two captured batch sizes on one
    model each replay on whatever their input buffer holds at the time."""
    if not cuda_ready():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    import torch

    stream = torch.cuda.Stream()
    decoder = Decoder(exported / graph, device="cuda", cuda_stream=stream.cuda_stream)
    assert decoder.provider == "CUDAExecutionProvider"
    s, d = decoder.image_size, decoder.latent_dim
    with torch.cuda.stream(stream):
        z = torch.from_numpy(codes(4, d, seed=2)).cuda()
        out = torch.full((4, 3, s, s), -1.0, device="cuda")
        decoder.decode_on_device(z, out=out)
        stream.synchronize()
        want = decoder.decode(z.cpu().numpy())
        np.testing.assert_allclose(out.cpu().numpy(), want, atol=1e-5)  # the same session: the same kernels
        graphs = {}
        for batch in (1, 4):
            zin = torch.zeros(batch, d, device="cuda")
            graphs[batch] = (zin, decoder.capture(zin, torch.empty(batch, 3, s, s, device="cuda")))
        for seed in (3, 4):
            for batch, (zin, captured) in graphs.items():
                fresh = codes(batch, d, seed=seed)
                zin.copy_(torch.from_numpy(fresh))
                images = captured.replay()
                stream.synchronize()
                # a second session (its own cuDNN choices); a stale or mixed-up graph is off by far more
                np.testing.assert_allclose(images.cpu().numpy(), decoder.decode(fresh), atol=2e-3)
        # ordering: onnxruntime runs after the work queued on the app's stream, with no synchronization between
        fresh = codes(4, d, seed=5)
        source = torch.from_numpy(fresh).cuda()
        stream.synchronize()
        torch.cuda._sleep(200_000_000)  # the stream is busy for a while ...
        z.copy_(source)  # ... before this lands in z
        decoder.decode_on_device(z, out=out)
        np.testing.assert_allclose(out.cpu().numpy(), decoder.decode(fresh), atol=1e-5)


def test_cuda_ortvalues_and_the_encoder_on_the_gpu(exported):
    if not cuda_ready():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    import onnxruntime as ort
    import torch

    decoder, encoder = Decoder(exported, device="cuda"), Encoder(exported, device="cuda")
    z = codes(3, decoder.latent_dim, seed=6)
    images = decoder.decode_on_device(ort.OrtValue.ortvalue_from_numpy(z, "cuda", 0))
    assert images.device_name().lower() == "cuda"
    np.testing.assert_allclose(images.numpy(), decoder.decode(z), atol=1e-5)
    mu = torch.empty(3, decoder.latent_dim, device="cuda")
    encoder.encode_on_device(images, out=mu)
    np.testing.assert_allclose(mu.cpu().numpy(), encoder.encode(images.numpy())[0], atol=1e-4)


def test_a_captured_graph_replays_only_on_the_thread_that_captured_it(exported):
    """onnxruntime keeps CUDA graphs per thread: another thread's replay would silently capture a second graph."""
    if not cuda_ready():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    import threading

    import torch

    decoder = Decoder(exported, device="cuda")
    s, d = decoder.image_size, decoder.latent_dim
    z, out = torch.zeros(2, d, device="cuda"), torch.empty(2, 3, s, s, device="cuda")
    graph = decoder.capture(z, out)
    z.copy_(torch.from_numpy(codes(2, d, seed=8)))
    graph.replay()
    np.testing.assert_allclose(out.cpu().numpy(), decoder.decode(codes(2, d, seed=8)), atol=2e-3)
    caught = []

    def elsewhere():
        try:
            graph.replay()
        except RuntimeModelError as err:
            caught.append(str(err))

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    assert len(caught) == 1 and "captured on another thread" in caught[0]
