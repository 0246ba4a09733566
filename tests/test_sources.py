"""cvarch.sources: torchvision weights names are loaded by torch.hub (hash-checked, from its cache when the
file is there), with clear errors when the file is missing offline. Cvarch checkpoints and state-dict files as
sources are tested through the strategies in test_transfer.py."""

from __future__ import annotations

import email.message
import io
import urllib.error

import pytest
import torch
import torchvision

from cvarch.sources import load_source


def test_a_missing_torchvision_weights_file_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(
        FileNotFoundError, match=r"resnet18-f37072fd\.pth is not in the torch hub cache.*put "
    ):
        load_source("IMAGENET1K_V1", arch="resnet18", download=False)

    def offline(request):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)  # torch.hub's own download, without a network
    with pytest.raises(
        FileNotFoundError,
        match=r"cannot be downloaded \(<urlopen error no network>\); put https://download\.pytorch",
    ):
        load_source("ResNet18_Weights.IMAGENET1K_V1", download=True)
    with pytest.raises(ValueError, match=r"not a torchvision weights name for transfer\.arch='resnet20'"):
        load_source("IMAGENET1K_V1", arch="resnet20")


def test_a_downloaded_torchvision_file_whose_hash_differs_is_refused(tmp_path, monkeypatch):
    """torch.hub checks the download against the sha256 prefix in the file name (``-f37072fd``)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tampered = io.BytesIO()
    torch.save(torchvision.models.resnet18().state_dict(), tampered)

    class Served(io.BytesIO):
        def info(self) -> email.message.Message:
            return email.message.Message()  # no Content-Length

    monkeypatch.setattr(torch.hub, "urlopen", lambda request: Served(tampered.getvalue()))
    with pytest.raises(RuntimeError, match=r'invalid hash value \(expected "f37072fd"'):
        load_source("IMAGENET1K_V1", arch="resnet18")
    assert not list((tmp_path / "torch").rglob("*.pth"))  # nothing was cached
