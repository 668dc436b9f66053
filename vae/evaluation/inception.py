"""The FID Inception network: its architecture, the checks on the weights file the user supplies, and features.

FID is only comparable with published numbers when it uses the Inception network of the original TensorFlow
implementation: the weights `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's port of them) in the
network they were ported for. That network is torchvision's `Inception3` (1008 classes, no aux logits) with
TensorFlow's pooling: the pool branch of the A, C and first E blocks averages over real pixels only
(`count_include_pad=False`), and the last E block (Mixed_7c) max-pools in its pool branch. The features are the
2048-d global average pool after Mixed_7c (pool3), of images resized to 299x299 bilinearly and scaled to
[-1, 1].

These machines cannot download anything, so the file is never fetched: the user names it (CLI flag,
$VAE_INCEPTION_WEIGHTS or `eval.inception_weights`), and `check_weights` refuses anything but a readable file
whose sha256 begins with the digits in its published name and which loads strictly into this architecture.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)

from vae_runtime.errors import BadInput, one_line

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
SHA256_PREFIX = "6726825d"  # torch.hub's rule: the file's sha256 must begin with the hex digits in its name
MAX_WEIGHTS_BYTES = 256 * 1024 * 1024  # the genuine file is far smaller; a bigger one is refused before hashing
TEST_ANY_HASH_ENV = "VAE_TEST_INCEPTION_ANY_HASH"  # tests only: "1" lets a file with another sha256 through
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
IDENTITY_NAME = "inception-v3-fid (pt_inception-2015-12-05)"
NUM_CLASSES = 1008  # the TensorFlow graph's classifier: 1000 ImageNet classes and 8 unused ones
INPUT_SIZE = 299
FEATURE_DIM = 2048

_GET_IT = (f"get the genuine {INCEPTION_FILE} from the pytorch-fid project's GitHub release 'fid_weights' "
           f"({WEIGHTS_URL})")


class InceptionWeightsError(BadInput):
    """The Inception weights file is missing, unreadable, too big, not the published file or not loadable."""


# TensorFlow's average pool ignores the padding; torchvision's default counts it as zeros.
def _tf_avg_pool() -> nn.Module:
    return nn.AvgPool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FidInceptionA(InceptionA):
    """InceptionA whose pool branch averages over real pixels only. `pool` holds no state: the keys stay
    those of torchvision's block, which the weights file uses."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__(in_channels, pool_features)
        self.pool = _tf_avg_pool()

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(self.pool(x))]


class FidInceptionC(InceptionC):
    """InceptionC whose pool branch averages over real pixels only."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__(in_channels, channels_7x7)
        self.pool = _tf_avg_pool()

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(self.pool(x))]


class FidInceptionE(InceptionE):
    """InceptionE with the FID network's pool branch: `pool` averages over real pixels (Mixed_7b) or takes the
    maximum (Mixed_7c, as in the TensorFlow graph the weights come from)."""

    def __init__(self, in_channels: int, max_pool: bool = False) -> None:
        super().__init__(in_channels)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1) if max_pool else _tf_avg_pool()

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(self.pool(x))]


def build_fid_inception() -> Inception3:
    """The FID Inception network, randomly initialised (PyTorch's default initialisation), in eval mode; its
    state_dict keys and shapes are those of the weights file."""
    # torchvision's own initialisation draws a truncated normal for every weight: slow, and overwritten anyway
    net = Inception3(num_classes=NUM_CLASSES, aux_logits=False, transform_input=False, init_weights=False,
                     inception_blocks=[BasicConv2d, FidInceptionA, InceptionB, FidInceptionC, InceptionD,
                                       FidInceptionE, InceptionAux])
    net.Mixed_7c = FidInceptionE(2048, max_pool=True)
    return net.eval()


class InceptionFeatures(nn.Module):
    """pool3 features of the FID Inception network: forward(x float [N,3,H,W] in [0,1], any H, W) -> float32
    [N, 2048] on the network's device. Always in eval mode, without gradients."""

    def __init__(self, net: Inception3, identity: dict) -> None:
        super().__init__()
        self.net = net.eval()
        self.net.requires_grad_(False)
        self.identity = dict(identity)
        self._stages = [net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
                        net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2,
                        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
                        net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e,
                        net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, net.avgpool]
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatures:
        # batch statistics of generated images would change the features: the network only ever runs in eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionFeatures expects images [N, 3, H, W], got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"InceptionFeatures expects float images in [0, 1], got {x.dtype}")
        x = x.to(device=self.net.fc.weight.device, dtype=torch.float32)
        # as the FID reference prepares images: bilinear resize without corner alignment, then [0,1] -> [-1,1]
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for stage in self._stages:
            x = stage(x)
        return torch.flatten(x, 1)


def _error(path: Path, what: str, todo: str) -> InceptionWeightsError:
    text = f"Inception weights {str(path)!r}: {what}; {todo}"
    return InceptionWeightsError(" ".join(text.splitlines()))


def _read(path: Path) -> bytes:
    """The whole file, read once, so that the bytes hashed are the bytes loaded."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise _error(path, "no such file", f"check the path, or {_GET_IT}") from None
    except OSError as err:
        raise _error(path, f"cannot be examined ({one_line(err)})", "check the path and its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise _error(path, "is a directory, not a file", f"name the file itself ({INCEPTION_FILE})")
    # a FIFO or device would block or never end: only a regular file is read
    if not stat.S_ISREG(info.st_mode):
        raise _error(path, "is not a regular file", f"name the weights file itself ({INCEPTION_FILE})")
    if info.st_size > MAX_WEIGHTS_BYTES:
        raise _error(path, f"is {info.st_size} bytes, more than the {MAX_WEIGHTS_BYTES} allowed",
                     f"this is not {INCEPTION_FILE}; {_GET_IT}")
    try:
        with open(path, "rb") as f:
            # the file may have grown since it was examined: never read more than the cap allows
            data = f.read(MAX_WEIGHTS_BYTES + 1)
    except OSError as err:
        raise _error(path, f"cannot be read ({one_line(err)})", "make it readable by this user") from None
    if len(data) > MAX_WEIGHTS_BYTES:
        raise _error(path, f"is more than the {MAX_WEIGHTS_BYTES} bytes allowed",
                     f"this is not {INCEPTION_FILE}; {_GET_IT}")
    return data


def _shapes_summary(items: list[str]) -> str:
    shown = ", ".join(items[:3])
    return shown + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def _load_checked(path) -> tuple[Inception3, dict]:
    """check_weights' checks, and the network they built with the file's weights loaded."""
    path = Path(path).expanduser()
    data = _read(path)
    digest = hashlib.sha256(data).hexdigest()
    verified = digest.startswith(SHA256_PREFIX)
    if not verified and os.environ.get(TEST_ANY_HASH_ENV) != "1":
        raise _error(path, f"sha256 {digest[:16]}... does not begin with {SHA256_PREFIX}, as that of "
                     f"{INCEPTION_FILE} does", f"the file is another or a damaged one; {_GET_IT}")
    not_weights = f"this is not {INCEPTION_FILE}; {_GET_IT}"
    try:
        # weights_only: the file comes from outside, and a full unpickle could run any code it holds
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise _error(path, f"does not load as PyTorch weights ({one_line(err)})", not_weights) from None
    del data
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise _error(path, f"holds a {type(state).__name__}, not a state dict of tensors", not_weights)
    net = build_fid_inception()
    expected = net.state_dict()
    wrong = [f"{k} {list(v.shape)} instead of {list(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise _error(path, f"wrong shapes for the FID Inception network: {_shapes_summary(wrong)}", not_weights)
    # strict, but through the modules' own loading so that a file without BatchNorm's counters still loads
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing ({_shapes_summary(list(result.missing_keys))})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected "
                         f"({_shapes_summary(list(result.unexpected_keys))})")
        raise _error(path, f"keys do not match the FID Inception network: {', '.join(parts)}", not_weights)
    return net.eval(), {"name": IDENTITY_NAME, "sha256": digest, "verified": verified}


def check_weights(path) -> dict:
    """Checks before any evaluation: a readable regular file, not larger than the cap, whose sha256 begins with
    SHA256_PREFIX, and which loads (weights_only) strictly into the FID architecture. Returns its identity
    {"name", "sha256" (full hexdigest), "verified" (the sha256 has the published prefix)}; any failure raises
    InceptionWeightsError with one line naming the path, what is wrong and what to do."""
    return _load_checked(path)[1]


def load_inception(path, device: str | torch.device = "cpu") -> InceptionFeatures:
    """check_weights, then the network with those weights (read once), in eval mode on `device`."""
    net, identity = _load_checked(path)
    return InceptionFeatures(net, identity).to(device)
