"""The run configuration's schema: every key, its type, its default and what it means.

Defaults live here and only here (yaml_file.py reads and checks a YAML file against it; planner.py
chooses values from a labels file and the machine)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

RUN_NAME_RULE = (
    "must be one folder name: 1 to 100 letters, digits, '_', '-' or '.', not starting with '.' or '-', "
    "for example toy-resnet18"
)
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{p}{i}" for p in ("COM", "LPT") for i in range(10))}


def _run_name(name: str) -> str:
    # The run folder is out_dir/name and `--overwrite` deletes it: a name that is '..', a path or
    # an option-like '-x' would point that at the user's own files.
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", name):
        raise ValueError(RUN_NAME_RULE)
    if name.endswith(".") or name.split(".")[0].upper() in _WINDOWS_DEVICES:
        raise ValueError("must be a folder name that works on every system: not ending with '.' and not a device name such as CON or NUL")
    return name


RunName = Annotated[str, AfterValidator(_run_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunConfig(_Section):
    name: RunName = "run"
    """Run name: the run folder is `out_dir/name`."""
    out_dir: str = "runs"
    """Folder that holds one sub-folder per run."""
    seed: int = Field(0, ge=0)
    """Seed for initialisation, shuffling, augmentation and dropout (reproducible on CPU); the split
    has its own seed, data.split_seed."""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps."""
    tensorboard: bool = False
    """Also write per-epoch scalars to run_dir/tensorboard/ (needs `pip install "mdn-cli[tensorboard]"`)."""

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
    target_name: str | None = None
    """What the target is, for tables, CSV columns and plots (default: the target column's name)."""
    target_unit: str = ""
    """The target's unit, shown beside numbers and on axes (for example lb, years)."""
    split_column: str | None = "split"
    """Optional column with train/val/calibration/test; when absent from the file each image is
    assigned by a stable hash of its path (see splits.py)."""
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Fraction of images for validation (epoch selection, early stopping, std scale) when the split is random."""
    calibration_fraction: float = Field(0.10, ge=0.0, lt=1.0)
    """Fraction of images that only calibrate the intervals, when the split is random."""
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Fraction of images for the test set when the split is random."""
    group_column: str | None = None
    """Optional column naming each image's group (sex, camera, site, breed...): with
    train.calibration: conformal, each group is calibrated on its own calibration images, so the
    coverage holds group by group; predictions then take the group (`mdn predict --group`)."""
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
    shards: str | None = None
    """A shard set to read instead of root and labels (`mdn shard` writes one): a folder, file://
    or s3:// URL (AWS_ENDPOINT_URL and the AWS credential variables for S3-compatible stores)."""
    shard_cache_dir: str | None = None
    """Where remote shards are kept once downloaded (default: ~/.cache/mdn-cli/shards)."""
    shard_cache_gb: float = Field(10.0, gt=0.0)
    """Most disk the shard cache may take, in GB: the least recently used shards go first."""
    shuffle_buffer: int = Field(1000, ge=1)
    """Training images mixed in memory while streaming shards (more: a better shuffle, more memory)."""

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("must be 'auto' or a whole number >= 0")

    @model_validator(mode="after")
    def _shard_cache(self) -> DataConfig:
        if self.shards and self.cache == "disk":
            raise ValueError("data.cache: disk keeps decoded image files; with data.shards the shard cache keeps the "
                             "shards on disk (data.shard_cache_dir): use data.cache: memory or none")
        return self

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
    (V100, T4); on CPUs fp32, but the backbone in bf16 for training steps and validation where the
    CPU has it natively (AVX512-BF16, AMX); fp32 on MPS. The MDN head and the loss always run in fp32."""
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
    calibration: str = "conformal"
    """After training (mdn_cli/calibration/): conformal = a std scale by predicted value and
    spread (val), then interval levels fitted within cells of both (and of data.group_column) on
    the calibration split, a coverage guarantee per cell; marginal = a constant std scale, then
    levels from all calibration images, a guarantee on average only; scale = the std scale alone;
    none = off."""
    @field_validator("calibration")
    @classmethod
    def _calibration(cls, v: str) -> str:
        from ..calibration import METHODS  # the registry: the one place that knows the methods

        if v not in METHODS:
            raise ValueError(f"must be one of {', '.join(METHODS)}")
        return v

    ood_quantile: float | None = Field(0.99, gt=0.5, lt=1.0)
    """Unfamiliar-image warning: the share of images like the calibration images that pass
    unflagged (the threshold is that quantile of their scores); null turns the warning off."""


class Config(_Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


def target_label(data: dict) -> str:
    """'weight (lb)' from a config's data section (as stored in checkpoints): name and unit."""
    name = data.get("target_name") or data.get("target_column") or "target"
    unit = data.get("target_unit") or ""
    return f"{name} ({unit})" if unit else name
