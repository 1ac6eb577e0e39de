"""Backbone registry: every entry builds and runs, local weight files load, errors are clear."""

import pytest
import torch

from mdn_cli.backbones import OFFLINE_HELP, REGISTRY, get_backbone
from mdn_cli.errors import ModelError
from mdn_cli.model import MDNRegressor, ModelArgs


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_backbone_builds_and_runs(name):
    spec = get_backbone(name)
    model, dim = spec.build(False)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, dim)
    assert len(spec.mean) == len(spec.std) == 3 and spec.image_size >= 64


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ModelError) as e:
        get_backbone("resnet19")
    assert "resnet18" in str(e.value) and "convnext_tiny" in str(e.value) and "timm/<name>" in str(e.value)


def test_local_state_dict_is_loaded(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)  # a full classifier checkpoint, as users download them
    model, dim = get_backbone("resnet18").build(str(path))
    assert dim == 512
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.layer4[1].bn2.running_mean, reference.layer4[1].bn2.running_mean)
    # a wrapped, DataParallel-prefixed file works too
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, wrapped)
    model, _ = get_backbone("resnet18").build(str(wrapped))
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)


def test_local_weights_for_the_wrong_backbone_are_refused(tmp_path):
    import torchvision

    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match="does not fit this backbone"):
        get_backbone("resnet18").build(str(path))


@pytest.mark.parametrize("content", [b"", b"not a torch file", None])
def test_missing_or_garbage_weight_files(tmp_path, content):
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match="model.pretrained"):
        get_backbone("resnet18").build(str(path))


def test_offline_download_names_the_ways_out(monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(ModelError) as e:
        get_backbone("resnet18").build(True)
    message = str(e.value)
    assert "\n" not in message and OFFLINE_HELP in message
    assert "pretrained: false" in message and "efficientnet_lite0" in message


def test_timm_backbone_by_name():
    spec = get_backbone("timm/resnet10t")
    model, dim = spec.build(False)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, dim)
    with pytest.raises(ModelError, match="timm has no model"):
        get_backbone("timm/not_a_model")


def test_model_normalises_uint8_images_and_heads_are_valid():
    args = ModelArgs("resnet18", 4, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = MDNRegressor(args).eval()
    targets = torch.linspace(-2, 2, 101)
    model.head.init_spread(targets)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    logits, means, stds = model(images)
    assert logits.shape == means.shape == stds.shape == (3, 4)
    assert (stds > 0).all()
    # initial means spread over the target quantiles (no mode collapse at the start)
    assert means[0].sort().values.tolist() == pytest.approx([-1.5, -0.5, 0.5, 1.5], abs=0.3)
    torch.testing.assert_close(model.normalize(images), (images.float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize("name, nhwc", [("resnet18", True), ("mobilenet_v3_large", True), ("convnext_tiny", False)])
def test_cpu_runs_convolutions_in_the_layout_measured_faster(name, nhwc):
    """On a CPU, NHWC weights make oneDNN 1.1-1.9x faster for every backbone but convnext; the
    layout changes no prediction beyond float rounding."""
    from mdn_cli.runtime import select_runtime

    args = ModelArgs(backbone=name, components=2, image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(0)
    model = MDNRegressor(args, pretrained=False).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        before = model(images)
    prepared = select_runtime("cpu").prepare(model)
    convs = [m.weight for m in prepared.modules() if isinstance(m, torch.nn.Conv2d) and min(m.weight.shape[1:]) > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == nhwc for w in convs)
    with torch.no_grad():
        after = prepared(images)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
