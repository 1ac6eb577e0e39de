"""Typed, validated run configuration: YAML file + `--set dotted.key=value` overrides -> `Config`.

Defaults live here and only here. Every problem in a file is reported at once, each with its
dotted key, the file and line where it stands, and a suggestion for misspelled keys.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunConfig(_Section):
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    """Run name: the run folder is `out_dir/name`."""
    out_dir: str = "runs"
    """Folder that holds one sub-folder per run."""
    seed: int = Field(0, ge=0)
    """Seed for initialisation, shuffling, augmentation and dropout (reproducible on CPU); the split
    has its own seed, data.split_seed."""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_PATTERN.match(v):
            raise ValueError("must be one of auto, cpu, cuda, cuda:N, mps")
        return v


class DataConfig(_Section):
    root: str = "data/toy"
    """Folder the image paths in the labels file are relative to."""
    labels: str = "labels.csv"
    """Labels CSV, relative to `root` (or absolute)."""
    image_column: str = "image"
    """Column with the image path, relative to `root`."""
    target_column: str = "target"
    """Column with the numeric target."""
    split_column: str | None = "split"
    """Optional column with train/val/calibration/test; when absent from the file each image is
    assigned by a stable hash of its path (see splits.py)."""
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Fraction of images for validation (epoch selection, early stopping, std scale) when the split is random."""
    calibration_fraction: float = Field(0.10, ge=0.0, lt=1.0)
    """Fraction of images that only calibrate the intervals, when the split is random."""
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Fraction of images for the test set when the split is random."""
    split_seed: int = Field(0, ge=0)
    """Seed of the random split; keep it fixed across ensemble members so they share their splits."""
    image_size: int | None = Field(None, ge=16, le=1024)
    """Side of the square network input in pixels; default: the backbone's own."""
    target_transform: Literal["none", "log"] = "none"
    """`log` makes the model work on log(target) (positive targets whose spread grows with size)."""
    on_bad_image: Literal["error", "skip"] = "error"
    """What to do with an image that cannot be decoded: stop, or skip it (listed in skipped.txt)."""
    flip: bool = True
    """Train-time horizontal mirror images. Unsafe for targets that change under a mirror image:
    angles, left/right positions, handedness."""
    shift: bool = True
    """Train-time shifts by up to 1/16 of the side, border pixels repeated into the gap. Unsafe for
    targets that are absolute positions in the image."""
    cache: Literal["none", "memory", "disk"] = "none"
    """Keep decoded, resized images across epochs: in shared memory, or on disk across runs."""
    cache_dir: str | None = None
    """Folder of the disk cache (default: ~/.cache/mdn-cli/decoded)."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes; auto picks from the CPU cores available."""

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("must be 'auto' or a whole number >= 0")

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.calibration_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "data.val_fraction + data.calibration_fraction + data.test_fraction must be below 1 "
                "so that some images are left to train on"
            )
        return self


class ModelConfig(_Section):
    backbone: str = "resnet18"
    """Backbone name (see README for the list)."""
    pretrained: bool | str = True
    """true: ImageNet weights (download), false: random init, or a path to a local state_dict file."""
    components: int = Field(3, ge=1, le=32)
    """Number of Gaussians K in the mixture."""
    freeze_backbone: bool = False
    """Train only the MDN head."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout before the MDN head."""
    sigma_min: float = Field(1.0e-3, gt=0.0)
    """Floor on each component's std, in standardised target units."""


class TrainConfig(_Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3.0e-4, gt=0.0, le=1.0)
    """Peak learning rate of AdamW (reached after the warm-up)."""
    weight_decay: float = Field(1.0e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    """Linear warm-up length; cosine decay to zero after it."""
    grad_clip: float | None = Field(5.0, gt=0.0)
    """Max global gradient norm (null disables clipping)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on CUDA GPUs with native bf16, fp16 with a gradient scaler on older ones
    (V100, T4); fp32 on CPU and MPS. The MDN head and the loss always run in fp32."""
    compile: bool = False
    """torch.compile the model (worth it on GPUs for long runs); falls back to eager with a warning."""
    early_stopping_patience: int | None = Field(5, ge=1)
    """Stop after this many epochs without a better val NLL (null disables)."""
    unfreeze_after: int | None = Field(None, ge=0)
    """Train the head alone (on cached backbone features) for this many epochs, then the whole network."""
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0)
    """The backbone's learning rate is lr times this (pretrained weights want a gentler update)."""
    extend_lr_scale: float = Field(0.3, gt=0.0, le=1.0)
    """Raising train.epochs on --resume adds a warm restart: a short warm-up to lr times this, then
    cosine decay to zero over the added epochs."""
    calibration: Literal["none", "scale", "conformal"] = "conformal"
    """After training: scale = one factor on all component stds fitted on the val split;
    conformal = that, then interval levels fitted on the calibration split (a coverage
    guarantee); none = off."""


class Config(_Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `dotted.key=value` overrides and validate everything at once."""
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config file ({e})") from None
        raw, lines = _parse_yaml(text, source)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        lines[key] = 0
    return _validate(raw, source, lines)


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (run, data, model, train) at the top level")
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines)
    return raw, lines


def _collect_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    """Map every dotted key to its 1-based line in the file, so errors can point at it."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key + ".", out)


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, for example --set train.epochs=3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _validate(raw: dict[str, Any], source: str, lines: dict[str, int]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err, source, lines) for err in e.errors()]
    n = len(problems)
    header = f"{source}: {n} problem{'s' if n > 1 else ''} in the config"
    raise ConfigError(header + "\n" + "\n".join(f"  {p}" for p in problems))


def _describe(err: dict[str, Any], source: str, lines: dict[str, int]) -> str:
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    # Union types add a loc part naming the branch (e.g. 'int', 'literal['auto']'); keep real keys.
    loc = [p for p in loc if not re.match(r"^(int|str|bool|float|literal\[.*\]|function-.*|none)$", p)]
    key = ".".join(loc)
    line = lines.get(key)
    where = f"{source}:{line}: " if line else ("--set " if line == 0 else "")
    if err["type"] == "extra_forbidden":
        section = ".".join(loc[:-1])
        known = _known_keys(section)
        guess = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6) or [
            k for k in known if loc[-1].startswith(k + "_") or k.startswith(loc[-1])
        ][:1]
        hint = f", did you mean {'.'.join([*loc[:-1], guess[0]])}?" if guess else f" (valid keys: {', '.join(known)})"
        return f"{where}{key}: unknown key{hint}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return f"{where}{key or '(top level)'}: {msg}"


def _known_keys(section: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, in section order, for the run folder."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
