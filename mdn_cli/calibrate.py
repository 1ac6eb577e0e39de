"""Fit a checkpoint's post-hoc steps on held-out images: after training, and for ensembles.

    feature bank   features of up to 2048 train images per member (the unfamiliar-image score)
    std scale      on the val split, which already chose the epoch (shapes the model), and the
                   scales of the unfamiliar-image score's distances
    conformal      interval levels and the unfamiliar-image threshold, on the calibration split,
                   which nothing else has touched (carries the guarantees)

See calibration.py and ood.py for the maths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import mixture as mx
from . import phases
from .calibration import DEFAULT_LEVELS, METHODS, Calibration, FitData, fit
from .checkpoint import save_checkpoint
from .errors import DataError
from .inference import Predictor
from .data import Source
from .data.labels import Example
from .ood import FeatureBank, UnfamiliarImages, subsample
from .runtime import Runtime


def calibrate_checkpoint(
    path: Path,
    method: str,
    splits: dict[str, list[Example]],
    source: Source,
    runtime: Runtime,
    num_workers: int | str,
    log: Callable[[str], None],
    on_skip: Callable[[str], None],
    ood_quantile: float | None = 0.99,
) -> Calibration:
    """Fit the calibration method called `method` (calibration.METHODS) and the unfamiliar-image
    warning for the checkpoint at `path` (a model or an ensemble) and store them there.
    `splits`: train, val, calibration, their images read from `source`."""
    predictor, ckpt = Predictor.from_checkpoint(path, runtime)

    def run(examples: list[Example]):
        loader = predictor.loader(source, examples, num_workers, name="calibration", pin_memory=runtime.pin_memory)
        return predictor.run(loader, runtime, on_skip=on_skip, moment="calibration-batch")

    if ood_quantile is not None and any(m.bank is None for m in predictor.members):
        train = splits["train"]
        chosen = [train[i] for i in subsample(len(train))]
        with phases.timed("unfamiliar-image feature bank"):
            vectors = run(chosen).features
        states = ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt]
        for state, member, v in zip(states, predictor.members, vectors):
            if member.bank is None:
                state["feature_bank"] = FeatureBank.of(v).state()
        predictor, _ = Predictor.from_checkpoint_state(ckpt, runtime, path)
        log(f"feature bank of {len(chosen)} train images for the unfamiliar-image warning")

    conformal, scales = METHODS[method].conformal, METHODS[method].scales
    val = run(splits["val"]) if scales or ood_quantile is not None else None
    if scales and len(val.targets) == 0:
        raise DataError("no val image could be read: the std scale cannot be fitted")
    cal = run(splits["calibration"]) if splits["calibration"] and (conformal or ood_quantile is not None) else None
    if cal is not None and len(cal.targets) == 0:
        raise DataError("no calibration image could be read: the intervals and the unfamiliar-image threshold cannot be fitted")
    if conformal and cal is None:
        log(f"note: no calibration images, so {method} calibration falls back to the std scale alone: the intervals carry no "
            "coverage guarantee (raise data.calibration_fraction or add 'calibration' rows to the split column)")
        method = "scale"
    kept = [splits["calibration"][i] for i in cal.indices.tolist()] if cal is not None else []
    data = FitData(*((predictor.mixture(val, calibrated=False), val.targets) if val is not None else (None, None)), *(
        (predictor.mixture(cal, calibrated=False), cal.targets, [e.group for e in kept]) if cal is not None else ()),
        val_groups=[splits["val"][i].group for i in val.indices.tolist()] if val is not None else None)
    result = fit(method, data)
    _log_fit(result, data, log)
    predictor.calibration = result

    unfamiliar = None
    if cal is not None and ood_quantile is not None:
        banks = [member.bank for member in predictor.members]
        scaling = val.features if len(val.targets) else cal.features  # val: never the threshold's own images
        unfamiliar = UnfamiliarImages.fit(banks, scaling, cal.features, ood_quantile)  # type: ignore[arg-type]
        log(unfamiliar.fitted_message())
    elif ood_quantile is not None:
        log("note: no calibration images, so unfamiliar images are not flagged "
            "(raise data.calibration_fraction or add 'calibration' rows to the split column)")
    ckpt["calibration"] = result.state()
    ckpt.pop("unfamiliar", None)
    if unfamiliar is not None:
        ckpt["unfamiliar"] = unfamiliar.state()
        for state, bank in zip(ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt], unfamiliar.members):
            state["feature_bank"] = bank.state()  # with the scales fitted on the val images
    save_checkpoint(ckpt, path)
    return result


def _log_fit(result: Calibration, data: FitData, log: Callable[[str], None]) -> None:
    """What calibration did, and on which images, in a few lines."""
    if not result.calibrated:
        return
    before = float(-mx.log_prob(data.val, data.val_targets).mean())
    after = float(-mx.log_prob(result.scaled(data.val), data.val_targets).mean())
    scale = result.scale.describe()["sigma_scale"]
    kind = f"component stds x {scale:.3f}" if isinstance(scale, float) else "a factor on each image's stds, by its predicted value and spread"
    log(f"std scale on {len(data.val_targets)} val images: {kind}, val NLL {before:.4f} -> {after:.4f}")
    if result.scores is None:
        return
    whole = result.apply(data.cal, data.cal_groups)
    levels = ", ".join(f"{level:.0%} -> CDF levels {float(lo.min()):.4f}..{float(hi.max()):.4f}" if len(result.scores.pit) > 1 else
                       f"{level:.0%} -> CDF levels {float(lo[0]):.4f}..{float(hi[0]):.4f}"
                       for level in DEFAULT_LEVELS for lo, hi in [whole.interval_probs(level)])
    cells = f" in {len(result.scores.pit)} cells ({', '.join(str(int(p.numel())) for p in result.scores.pit.values())} images)" \
        if len(result.scores.pit) > 1 else ""
    log(f"{result.method} intervals on {result.n_images} calibration images{cells}: {levels}")
    warnings = {r.get("warning") for r in whole.describe(DEFAULT_LEVELS)} - {None}
    for warning in sorted(warnings):
        log(f"warning: {warning}")
