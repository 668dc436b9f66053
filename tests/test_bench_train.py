"""bench/train.py's share of the device's peak (`bench/benchkit.py`): the arithmetic, the GPU table, and which
peak each device and precision is compared with (the GPU path checked without a GPU)."""

import pytest
import torch

from conftest import load_bench

bench_train = load_bench("train")  # puts bench/ on the path first
import benchkit  # noqa: E402


def test_share_of_peak_is_training_flops_times_rate_over_each_peak():
    # 3 GFLOP per image at 100 images/s is 300 GFLOP/s: half of 600, a thousandth of 300 TFLOP/s; unknown: None
    assert benchkit.share_of_peak(3.0, 100.0, {"gemm_fp32": 600.0, "table": 300e3, "unknown": None}) == {
        "gemm_fp32": 0.5, "table": 0.001, "unknown": None}


def test_flop_figures_take_training_as_three_forwards():
    work = {"forward_gflop_per_image": 2.0, "train_gflop_per_image_3x_forward": 6.0}
    peaks = {"device": "NVIDIA H100 80GB HBM3", "gflops": {"gpu_table_bf16_dense": 989e3, "gemm_bf16": 600e3}}
    figures = benchkit.flop_figures(work, 5000.0, peaks)
    assert figures["achieved_gflops"] == 30000.0  # 6 GFLOP x 5,000 images/s
    assert figures["share_of_peak"] == {"gpu_table_bf16_dense": pytest.approx(30e3 / 989e3, rel=1e-3),
                                        "gemm_bf16": 0.05}
    assert figures["peak_device"] == "NVIDIA H100 80GB HBM3" and figures["peak_gflops"] is peaks["gflops"]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 SXM5 80GB", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 NVL", None), ("NVIDIA RTX A1000", None), ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_bf16_peak_by_name(name, tflops):
    assert benchkit.gpu_bf16_dense_tflops(name) == tflops


def test_the_cpu_compares_each_precision_with_its_own_measured_gemm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(benchkit, "gemm_gflops", lambda threads=2: 100.0 + threads)
    monkeypatch.setattr(benchkit, "torch_gemm_gflops", lambda dtype, device: {"bfloat16": 50.0}[dtype])
    assert benchkit.peak_gflops("float32", threads=2) == {"device": "cpu", "gflops": {"gemm_fp32": 102.0}}
    assert benchkit.peak_gflops("bf16") == {"device": "cpu", "gflops": {"gemm_bf16": 50.0}}


def test_a_gpu_gives_the_table_peak_and_a_measured_bf16_gemm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA Lent GPU")
    monkeypatch.setattr(benchkit, "torch_gemm_gflops", lambda dtype, device, **kw: 400e3)
    assert benchkit.peak_gflops("float32") == {"device": "NVIDIA Lent GPU",
                                               "gflops": {"gpu_table_bf16_dense": None, "gemm_bf16": 400e3}}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    assert benchkit.peak_gflops("bf16")["gflops"]["gpu_table_bf16_dense"] == 989e3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_measured_gemm_rate_is_positive_on_the_cpu(dtype):
    assert benchkit.torch_gemm_gflops(dtype, "cpu", n=128, reps=2) > 0
