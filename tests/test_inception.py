"""The FID Inception network: its architecture is pytorch-fid's FID variant, and a weights file is loaded only
after every check passes, each failure being one line that names the file.

No test has the published weights (these machines cannot download them): a randomly initialised network of the
same architecture stands in, saved the way the published file is (a state dict), and the sha256-prefix rule is
exercised by pointing SHA256_PREFIX at the stand-in's digest.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.nn.functional as F

from vae_runtime.errors import BadInput
from vae.evaluation import inception
from vae.evaluation.features import ENV_WEIGHTS, resolve_weights
from vae.evaluation.inception import (
    INCEPTION_FILE,
    SHA256_PREFIX,
    TEST_ANY_HASH_ENV,
    InceptionFeatures,
    InceptionWeightsError,
    build_fid_inception,
    check_weights,
    load_inception,
)


def _random_net(seed: int = 0) -> torch.nn.Module:
    """The architecture with variance-preserving random weights and random BatchNorm statistics, so features
    are far from zero and differ between inputs (PyTorch's default initialisation shrinks them to nothing)."""
    torch.manual_seed(seed)
    net = build_fid_inception()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.8, 1.2)
            module.weight.data.uniform_(0.8, 1.2)
    return net.eval()


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(the in-memory network, the file holding its state dict as the published file does)."""
    net = _random_net()
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture
def any_hash(monkeypatch):
    monkeypatch.setenv(TEST_ANY_HASH_ENV, "1")


def _reference_features(net, images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's recipe, spelled out: bilinear resize to 299 without corner alignment, [0,1] -> [-1,1],
    the network up to Mixed_7c, global average pool."""
    x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(net, name)(x)
    return x.mean(dim=(2, 3))


def _refused(path, fragment: str) -> str:
    with pytest.raises(InceptionWeightsError) as caught:
        check_weights(path)
    message = str(caught.value)
    assert isinstance(caught.value, BadInput)
    assert "\n" not in message and "\r" not in message, message
    assert repr(str(path)) in message, message  # quoted, so a path with a line break stays on one line
    assert fragment in message, message
    return message


# --- the end-to-end path -------------------------------------------------------------------------------------

def test_loaded_features_equal_the_in_memory_network(stand_in, any_hash):
    net, path = stand_in
    model = load_inception(path)
    assert isinstance(model, InceptionFeatures) and not model.training
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.identity == {"name": "inception-v3-fid (pt_inception-2015-12-05)", "sha256": digest,
                              "verified": digest.startswith(SHA256_PREFIX)}
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 48)  # any size: the network sees 299x299
    features = model(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    expected = _reference_features(net, images)
    assert expected.abs().mean() > 1e-2  # the comparison below is not one of near-zero numbers
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(features[0], features[1])  # the features depend on the image
    model.train()  # refused silently: BatchNorm must keep the file's statistics
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_identity_is_verified_when_the_sha256_has_the_prefix(stand_in, monkeypatch):
    _, path = stand_in
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.delenv(TEST_ANY_HASH_ENV, raising=False)
    monkeypatch.setattr(inception, "SHA256_PREFIX", digest[:8])
    assert check_weights(path) == {"name": "inception-v3-fid (pt_inception-2015-12-05)", "sha256": digest,
                                   "verified": True}


def test_test_switch_records_unverified(stand_in, any_hash):
    _, path = stand_in
    assert not hashlib.sha256(path.read_bytes()).hexdigest().startswith(SHA256_PREFIX)
    assert check_weights(path)["verified"] is False


# --- refusals ------------------------------------------------------------------------------------------------

def test_other_sha256_is_refused_without_the_switch(stand_in, monkeypatch):
    _, path = stand_in
    monkeypatch.delenv(TEST_ANY_HASH_ENV, raising=False)
    message = _refused(path, SHA256_PREFIX)
    assert "sha256" in message and "pytorch-fid" in message
    monkeypatch.setenv(TEST_ANY_HASH_ENV, "yes")  # only "1" switches the check off
    _refused(path, SHA256_PREFIX)


def test_truncated_file_is_refused(stand_in, tmp_path, any_hash):
    _, path = stand_in
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(cut, "does not load")


def test_random_bytes_are_refused(tmp_path, any_hash):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(os.urandom(4096))
    _refused(noise, "does not load")


def test_not_a_state_dict_is_refused(tmp_path, any_hash):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    _refused(path, "not a state dict")


def test_state_dict_missing_a_key_is_refused(stand_in, tmp_path, any_hash):
    net, _ = stand_in
    state = net.state_dict()
    del state["Mixed_6c.branch7x7dbl_4.conv.weight"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    _refused(path, "Mixed_6c.branch7x7dbl_4.conv.weight")


def test_state_dict_with_an_extra_key_is_refused(stand_in, tmp_path, any_hash):
    net, _ = stand_in
    state = dict(net.state_dict())
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # torchvision's layout with aux logits is not the file's
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    _refused(path, "AuxLogits.fc.weight")


def test_state_dict_with_a_wrong_shape_is_refused(stand_in, tmp_path, any_hash):
    net, _ = stand_in
    state = dict(net.state_dict())
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet classifier, not the FID graph's
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    _refused(path, "fc.weight [1000, 2048] instead of [1008, 2048]")


def test_pickled_code_is_refused(tmp_path, any_hash):
    path = tmp_path / "code.pth"
    torch.save({"fc.weight": torch.zeros(1), "note": os.path.join}, path)  # a function: needs a full unpickle
    _refused(path, "does not load")


def test_directory_is_refused(tmp_path, any_hash):
    _refused(tmp_path, "is a directory")


def test_missing_path_is_refused(tmp_path, any_hash):
    message = _refused(tmp_path / "nowhere" / INCEPTION_FILE, "no such file")
    assert "https://github.com/mseitzer/pytorch-fid/releases" in message


def test_fifo_is_refused(tmp_path, any_hash):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused(fifo, "not a regular file")  # and not read: reading a FIFO without a writer would block


def test_over_cap_file_is_refused_before_hashing(stand_in, monkeypatch, any_hash):
    _, path = stand_in
    monkeypatch.setattr(inception, "MAX_WEIGHTS_BYTES", 1024)
    monkeypatch.setattr(inception, "hashlib", None)  # any hashing would fail on None
    _refused(path, "more than the 1024")


def test_unreadable_file_is_refused(stand_in, monkeypatch, any_hash):
    _, path = stand_in

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # chmod 0 proves nothing when the tests run as root: the refusal to open is simulated instead
    monkeypatch.setattr(inception, "open", denied, raising=False)
    _refused(path, "cannot be read (PermissionError")


def test_newline_in_the_path_stays_one_line(tmp_path, any_hash):
    _refused(tmp_path / "two\nlines.pth", "no such file")


# --- where the path comes from -------------------------------------------------------------------------------

def test_resolve_weights_precedence(monkeypatch):
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    assert resolve_weights(None) is None
    assert resolve_weights("", "") is None
    assert resolve_weights(None, "cfg.pth") == "cfg.pth"
    monkeypatch.setenv(ENV_WEIGHTS, "env.pth")
    assert resolve_weights(None, "cfg.pth") == "env.pth"
    assert resolve_weights("flag.pth", "cfg.pth") == "flag.pth"
    assert resolve_weights("", "cfg.pth") == "env.pth"  # an empty flag is no flag
    monkeypatch.setenv(ENV_WEIGHTS, "")
    assert resolve_weights(None, "cfg.pth") == "cfg.pth"  # nor is an empty variable
    assert resolve_weights(None, "") is None


# --- the architecture is the FID variant, in the file's layout ---------------------------------------------

def _pool_branch(block, x: torch.Tensor, channels: int) -> torch.Tensor:
    with torch.no_grad():
        return block(x)[:, -channels:]  # torchvision blocks concatenate the pool branch last


@pytest.mark.parametrize("name", ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                                  "Mixed_6e", "Mixed_7b"])
def test_pool_branches_average_real_pixels_only(stand_in, name):
    net, _ = stand_in
    block = getattr(net, name)
    conv_in = block.branch_pool.conv.in_channels
    channels = block.branch_pool.conv.out_channels
    torch.manual_seed(2)
    x = torch.rand(1, conv_in, 5, 5) + 1  # positive: counting the zero padding would lower the border
    got = _pool_branch(block, x, channels)
    with torch.no_grad():
        tf = block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        torchvision_way = block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
    torch.testing.assert_close(got, tf)
    assert not torch.allclose(got, torchvision_way, atol=1e-4)
    # a constant image stays constant at the border only when the padding is left out of the average
    with torch.no_grad():
        pooled = block.pool(torch.ones(1, conv_in, 5, 5))
    torch.testing.assert_close(pooled, torch.ones_like(pooled))


def test_last_block_max_pools(stand_in):
    net, _ = stand_in
    block = net.Mixed_7c
    torch.manual_seed(3)
    x = torch.randn(1, 2048, 4, 4)
    got = _pool_branch(block, x, 192)
    with torch.no_grad():
        maxed = block.branch_pool(F.max_pool2d(x, 3, stride=1, padding=1))
        averaged = block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    torch.testing.assert_close(got, maxed)
    assert not torch.allclose(got, averaged, atol=1e-4)
    assert isinstance(block.pool, torch.nn.MaxPool2d)


def test_state_dict_layout_is_the_published_files():
    state = build_fid_inception().state_dict()
    # 94 conv+BatchNorm units (conv weight, BN weight, bias, running mean, running var, batch counter) + fc
    assert len(state) == 94 * 6 + 2
    assert not any(key.startswith("AuxLogits") for key in state)
    shapes = {
        "Conv2d_1a_3x3.conv.weight": [32, 3, 3, 3],
        "Conv2d_4a_3x3.conv.weight": [192, 80, 3, 3],
        "Mixed_5b.branch_pool.conv.weight": [32, 192, 1, 1],
        "Mixed_5d.branch_pool.conv.weight": [64, 288, 1, 1],
        "Mixed_6b.branch7x7_1.conv.weight": [128, 768, 1, 1],
        "Mixed_6e.branch7x7dbl_5.conv.weight": [192, 192, 1, 7],
        "Mixed_7b.branch_pool.conv.weight": [192, 1280, 1, 1],
        "Mixed_7c.branch3x3dbl_3b.conv.weight": [384, 384, 3, 1],
        "Mixed_7c.branch_pool.conv.weight": [192, 2048, 1, 1],
        "Mixed_7c.branch_pool.bn.running_var": [192],
        "fc.weight": [1008, 2048],
        "fc.bias": [1008],
    }
    for key, shape in shapes.items():
        assert list(state[key].shape) == shape, key
    # torchvision's Inception3 has 27,161,264 parameters; less the aux classifier (3,326,696) and 8 more classes
    assert sum(p.numel() for p in build_fid_inception().parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
