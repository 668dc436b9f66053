"""Reduced-precision CPU graphs: `decoder.int8.onnx` and `encoder.int8.onnx`, statically quantized and validated
against the float32 graphs before they are written.

int8 is what these CPUs (AVX512-VNNI, AMX-INT8) and onnxruntime's CPU provider make fast: QDQ convolutions run
as integer kernels. onnxruntime has no int8 ConvTranspose, so the decoder is first rewritten exactly: each
ConvTranspose2d(kernel 4, stride 2, padding 1) becomes a 3x3 convolution emitting the four output phases and a
channels-last interleave of them (`phase_decomposed`); the float32 results agree to rounding.
onnxruntime's CPU provider has no bf16 convolution or matrix-product kernels (a bf16 `Conv` or `MatMul`
does not load), so no bf16 graph is offered.

Calibration (activation ranges): codes of real held-out images (the encoder's mu) and draws from the prior for the
decoder, the images themselves for the encoder. Validation, on other draws and other held-out images: the decoder
on 64 prior draws and 64 codes of held-out images (each set within the budget), the encoder on 64 held-out images
seen through the float32 decoder, so the budget is in pixels: their codes (mu) decoded, and one posterior sample
each (mu + exp(logvar / 2) * eps, the same eps for both graphs) decoded, so logvar is held to the budget too.
Any non-finite output fails. Each graph meets BUDGET (agreement with the float32 graph) or else FIDELITY_BUDGET
(held-out images reconstructed nearly as well as by the float32 graphs), else the export fails and nothing is
written; the report says which.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from vae_runtime.atomic import naming
from vae_runtime.vocabulary import graph_name
from vae.serving.model_card import budgets_text

# the graphs read and written here, named by the vocabulary (`vae_runtime.vocabulary`)
DECODER, ENCODER = graph_name("decoder"), graph_name("encoder")
DECODER8, ENCODER8 = graph_name("decoder", "int8"), graph_name("encoder", "int8")
BUDGET = {"mean_abs": 1 / 255, "max_abs": 8 / 255}  # agreement with the float32 graphs, on decoded images in [0, 1]
# The stated budget for a graph that misses BUDGET, as 8-bit activations through a trained decoder do by a little
# (the models in docs/onnx.md): what an app sees of the model is how well it renders faces, so the int8 graph may
# not reconstruct held-out images with more than 2% more error (mean absolute, against the real images) than the
# float32 graphs, and must still agree with them within 4/255 on average and 64/255 everywhere (no broken region).
FIDELITY_BUDGET = {"recon_increase": 0.02, "mean_abs": 4 / 255, "max_abs": 64 / 255}


class PhaseConvTranspose(nn.Module):
    """ConvTranspose2d(k=4, s=2, p=1) as Conv2d(3x3, padding 1) to 4x the channels, then the four phases
    interleaved into the doubled grid.

    Output pixel (2m + a, 2n + b) of the transposed convolution reads input rows m-1, m (a = 0: kernel rows 3, 1)
    or m, m+1 (a = 1: kernel rows 2, 0), and the same for columns: one 3x3 window around (m, n) holds all four.
    The convolution emits phase (a, b) of channel c as channel (2a + b) * C + c, so that, channels last, the
    interleave moves whole runs of channels ([N, H, W, a, b, C] -> [N, H, a, W, b, C]); onnxruntime runs the
    int8 convolutions channels last, so the transposes to and from channels first cancel around it. (A
    PixelShuffle, DepthToSpace in the graph, interleaves single values of a channels-first layout: several
    times slower in int8.)"""

    TAPS = {0: {0: 3, 1: 1}, 1: {1: 2, 2: 0}}  # phase -> {3x3 window row: transposed-kernel row}

    def __init__(self, convt: nn.ConvTranspose2d):
        super().__init__()
        cin, cout = convt.in_channels, convt.out_channels
        self.conv = nn.Conv2d(cin, 4 * cout, 3, padding=1, bias=convt.bias is not None)
        weight = torch.zeros(2, 2, cout, cin, 3, 3, dtype=convt.weight.dtype)  # phase (a, b), then channel
        source = convt.weight.detach()  # [cin, cout, 4, 4]
        for a, rows in self.TAPS.items():
            for b, cols in self.TAPS.items():
                for r, ky in rows.items():
                    for s, kx in cols.items():
                        weight[a, b, :, :, r, s] = source[:, :, ky, kx].T
        with torch.no_grad():
            self.conv.weight.copy_(weight.reshape(4 * cout, cin, 3, 3))
            if convt.bias is not None:
                self.conv.bias.copy_(convt.bias.detach().repeat(4))
        self.channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        h, w, c = y.shape[2], y.shape[3], self.channels
        y = y.permute(0, 2, 3, 1).reshape(-1, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(-1, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


def decomposable(module: nn.Module) -> bool:
    return (isinstance(module, nn.ConvTranspose2d) and module.kernel_size == (4, 4) and module.stride == (2, 2)
            and module.padding == (1, 1) and module.output_padding == (0, 0) and module.groups == 1
            and module.dilation == (1, 1))


def phase_decomposed(model: nn.Module) -> nn.Module:
    """A copy of `model` with every ConvTranspose2d(4, 2, 1) replaced by its PhaseConvTranspose."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if decomposable(child):
                setattr(parent, name, PhaseConvTranspose(child))
    return model


def _reader(name: str, arrays: list[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader  # lazy: onnxruntime's quantizer, int8 exports only

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: a} for a in arrays])

        def get_next(self):
            return next(self.items, None)

    return Reader()


# the layers, their SiLU activations and residual sums, and the phase interleave's moves (exact in int8)
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm", "Add", "Mul", "Sigmoid", "Transpose", "Reshape"]


def quantize_graph(source: Path, target: Path, input_name: str, calibration: list[np.ndarray]) -> None:
    """Static int8 QDQ quantization of the convolutions and matrix products and of the SiLU activations and
    residual sums between them (kept in int8, they spare a dequantize/quantize pair per layer): per-channel int8
    weights, uint8 activations (what VNNI cores run well). The head stays float32: the last convolution or
    product (the likelihood's parameters, the posterior) and everything after it (the likelihood's mean), where
    rounding shows most."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        with naming(prepared):  # a full disk names the file being written
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        nodes = onnx.load(str(prepared)).graph.node  # in topological order
        arithmetic = [i for i, n in enumerate(nodes) if n.op_type in ("Conv", "MatMul", "Gemm")]
        last = [n.name for n in nodes[arithmetic[-1]:]] if arithmetic else []  # the head and what follows it
        with naming(target):
            quantize_static(str(prepared), str(target), _reader(input_name, calibration),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=last,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def _errors(got: np.ndarray, want: np.ndarray) -> dict:
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}


def _worst(**sets: dict) -> dict:
    """The differences of each input set (`by_input`), judged by the worst: a budget holds for every set, so the
    accurate codes of held-out images cannot average away the prior draws' larger differences. A NaN in any set
    is the worst (np.max propagates it; Python's max would drop it)."""
    return {"mean_abs": float(np.max([e["mean_abs"] for e in sets.values()])),
            "max_abs": float(np.max([e["max_abs"] for e in sets.values()])), "by_input": sets}


def _verdict(errors: dict) -> str | None:
    """Which budget `errors` meet: "agreement" (BUDGET), "fidelity" (FIDELITY_BUDGET) or None (also when any
    figure is not finite: a NaN output meets no budget)."""
    if not all(np.isfinite(errors[key]) for key in ("mean_abs", "max_abs", "recon_increase")):
        return None
    if errors["mean_abs"] <= BUDGET["mean_abs"] and errors["max_abs"] <= BUDGET["max_abs"]:
        return "agreement"
    if (errors["recon_increase"] <= FIDELITY_BUDGET["recon_increase"]
            and errors["mean_abs"] <= FIDELITY_BUDGET["mean_abs"] and errors["max_abs"] <= FIDELITY_BUDGET["max_abs"]):
        return "fidelity"
    return None


def _recon_error(images: np.ndarray, x: np.ndarray) -> float:
    return float(np.abs(images.astype(np.float64) - x.astype(np.float64)).mean())


def build_int8_graphs(model: nn.Module, folder: Path, images: np.ndarray) -> None:
    """Quantize: `decoder.int8.onnx` from the phase-decomposed decoder, calibrated on the codes of `images` and
    256 prior draws, and `encoder.int8.onnx` from `folder/encoder.onnx`, calibrated on `images` (no validation
    here: `write_int8` validates)."""
    from vae.serving.graphs import DecoderGraph, export_onnx  # lazy: graphs imports this module (a cycle)

    d = model.latent_dim
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(images))[0].numpy()
    prior = np.random.default_rng(2).standard_normal((256, d)).astype(np.float32)
    calibration = [np.ascontiguousarray(batch) for batch in
                   (*np.array_split(codes, max(1, len(codes) // 16)), *np.array_split(prior, 16))]
    with tempfile.TemporaryDirectory() as tmp:
        phased = Path(tmp) / "decoder.phase.onnx"
        export_onnx(DecoderGraph(phase_decomposed(model).eval()), torch.randn(2, d), "z", ["x_mean"], phased)
        quantize_graph(phased, folder / DECODER8, "z", calibration)
    quantize_graph(folder / ENCODER, folder / ENCODER8, "x",
                   [np.ascontiguousarray(b) for b in np.array_split(images, max(1, len(images) // 16))])


def _decode(decoder, z: np.ndarray) -> np.ndarray:
    return decoder.run(["x_mean"], {"z": z})[0]


def _posterior_decoded(decoder, mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """mu + exp(logvar / 2) * eps decoded by `decoder`; all NaN where any of it is not finite (no budget holds: an
    infinite code could decode to finite, saturated images)."""
    with np.errstate(all="ignore"):
        z = (mu + np.exp(logvar / 2) * eps).astype(np.float32)
    return _decode(decoder, z if np.isfinite(z).all() else np.full_like(z, np.nan))


MIN_IMAGES = 16  # some validate, the rest calibrate: fewer says little about either
VALIDATION_IMAGES = 64  # judged (the most held-out); every other image given calibrates


def write_int8(model: nn.Module, folder: Path, images: np.ndarray, session, source: str = "held-out images") -> dict:
    """Write `decoder.int8.onnx` and `encoder.int8.onnx` into `folder`, beside its validated float32 graphs, and
    return their validation report; raise ExportError (nothing written) when either misses both budgets.

    `session(path)` opens a graph the way the runtime does; `images` are float32 [N, 3, H, W], held-out where
    the shards have enough, most held-out first (`source` says from which splits): the first VALIDATION_IMAGES
    (at most half) validate, with the prior draws, and all the others calibrate. Calibrating on few images leaves
    activation ranges that other images exceed (docs/onnx.md): give several hundred."""
    from vae.serving.graphs import ExportError  # lazy: graphs imports this module (a cycle)

    if len(images) < MIN_IMAGES:
        raise ExportError(f"int8: needs at least {MIN_IMAGES} images (some calibrate, the others validate); "
                          f"the shards have {len(images)}")
    d, judged = model.latent_dim, min(VALIDATION_IMAGES, len(images) // 2)
    held, calibration = images[:judged], images[judged:]
    build_int8_graphs(model, folder, calibration)
    decoder, decoder8 = session(folder / DECODER), session(folder / DECODER8)
    encoder, encoder8 = session(folder / ENCODER), session(folder / ENCODER8)

    x = np.ascontiguousarray(held[np.arange(64) % len(held)], dtype=np.float32)
    (mu, logvar), (mu8, logvar8) = encoder.run(["mu", "logvar"], {"x": x}), encoder8.run(["mu", "logvar"], {"x": x})
    prior = np.random.default_rng(3).standard_normal((64, d)).astype(np.float32)
    eps = np.random.default_rng(4).standard_normal(mu.shape).astype(np.float32)
    images, images_int8_decoder = _decode(decoder, mu), _decode(decoder8, mu)
    images_int8_encoder = _decode(decoder, mu8)
    sampled = [_posterior_decoded(decoder, m, lv, eps) for m, lv in ((mu, logvar), (mu8, logvar8))]
    reference = _recon_error(images, x)
    decoded = {**_worst(prior_draws=_errors(_decode(decoder8, prior), _decode(decoder, prior)),
                        codes=_errors(images_int8_decoder, images)),
               "recon_increase": _recon_error(images_int8_decoder, x) / reference - 1}
    encoded = {**_worst(codes=_errors(images_int8_encoder, images),
                        posterior_samples=_errors(sampled[1], sampled[0])),
               "recon_increase": _recon_error(images_int8_encoder, x) / reference - 1,
               "mu_max_abs": float(np.abs(mu8 - mu).max()), "logvar_max_abs": float(np.abs(logvar8 - logvar).max())}
    seen = f"{len(held)} images" + (" (repeated to 64)" if len(held) < 64 else "")
    report = {"budget": BUDGET, "fidelity_budget": FIDELITY_BUDGET, "recon_error_float32": reference,
              "decoder": {**decoded, "inputs": f"64 prior draws; the codes of {seen}, each set within the budget"},
              "encoder": {**encoded, "inputs": f"{seen}: their codes and one posterior sample each, decoded by "
                                               "decoder.onnx, each set within the budget"},
              "calibration": f"codes of the last {len(calibration)} images + 256 prior draws; those images for the "
                             f"encoder; validated on the first {len(held)} (images from {source}, in that order)",
              "decoder_rewrite": "ConvTranspose2d(4, 2, 1) -> Conv2d(3x3) + channels-last phase interleave "
                                 "(exact in float32)"}
    for name, key in ((DECODER8, "decoder"), (ENCODER8, "encoder")):
        errors = report[key]
        errors["passed"] = _verdict(errors)
        if errors["passed"] is None:
            for graph in (DECODER8, ENCODER8):
                (folder / graph).unlink(missing_ok=True)
            raise ExportError(f"{name}: differs from the float32 graph by mean {errors['mean_abs'] * 255:.2f}/255, "
                              f"max {errors['max_abs'] * 255:.1f}/255, and reconstructs held-out images with "
                              f"{errors['recon_increase']:+.1%} error (budgets: "
                              f"{budgets_text(BUDGET, FIDELITY_BUDGET)}): not written")
    return report
