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
from .calibration import DEFAULT_LEVELS, Calibration, fit_sigma_scale
from .checkpoint import save_checkpoint
from .errors import DataError
from .inference import Predictor
from .labels import Example
from .ood import FeatureBank, UnfamiliarImages, images_needed, subsample
from .runtime import Runtime


def calibrate_checkpoint(
    path: Path,
    method: str,
    splits: dict[str, list[Example]],
    runtime: Runtime,
    num_workers: int | str,
    log: Callable[[str], None],
    on_skip: Callable[[str], None],
    ood_quantile: float | None = 0.99,
) -> Calibration:
    """Fit `method` (none | scale | conformal) and the unfamiliar-image warning for the checkpoint
    at `path` (a model or an ensemble) and store them there. `splits`: train, val, calibration."""
    predictor, ckpt = Predictor.from_checkpoint(path, runtime)

    def run(examples: list[Example]):
        return predictor.run([e.path for e in examples], runtime, [e.target for e in examples], num_workers=num_workers, on_skip=on_skip)

    if ood_quantile is not None and any(m.bank is None for m in predictor.members):
        train = splits["train"]
        chosen = [train[i] for i in subsample(len(train))]
        vectors = run(chosen).features
        states = ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt]
        for state, member, v in zip(states, predictor.members, vectors):
            if member.bank is None:
                state["feature_bank"] = FeatureBank.of(v).state()
        predictor, _ = Predictor.from_checkpoint_state(ckpt, runtime, path)
        log(f"feature bank of {len(chosen)} train images for the unfamiliar-image warning")

    result = Calibration()
    val = run(splits["val"]) if method != "none" or ood_quantile is not None else None
    if method != "none":
        if len(val.targets) == 0:
            raise DataError("no val image could be read: the std scale cannot be fitted")
        fit = fit_sigma_scale(predictor.mixture(val, calibrated=False), val.targets)
        result = Calibration("scale", fit.scale, len(val.targets))
        log(f"std scale on {len(val.targets)} val images: component stds x {fit.scale:.3f}, "
            f"val NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}")
    predictor.calibration = result

    unfamiliar = None
    if splits["calibration"] and (method == "conformal" or ood_quantile is not None):
        cal = run(splits["calibration"])
        if len(cal.targets) == 0:
            raise DataError("no calibration image could be read: the intervals and the unfamiliar-image threshold cannot be fitted")
        m = predictor.mixture(cal)
        if method == "conformal":
            pit = mx.cdf(m, cal.targets).sort().values
            hdr = mx.hdr_score(m, cal.targets).sort().values
            result = Calibration("conformal", result.sigma_scale, result.val_images, pit, hdr)
            levels = ", ".join(
                f"{level:.0%} -> CDF levels {lo:.4f}..{hi:.4f}" for level in DEFAULT_LEVELS for lo, hi in [result.interval_probs(level)]
            )
            log(f"conformal intervals on {result.n_images} calibration images: {levels}")
            if "warning" in result.describe():
                log(f"warning: {result.describe()['warning']}")
        if ood_quantile is not None:
            banks = [member.bank for member in predictor.members]
            scaling = val.features if len(val.targets) else cal.features  # val: never the threshold's own images
            if not len(val.targets):
                log("note: no val image could be read, so the unfamiliar-image scales are fitted on the calibration images")
            unfamiliar = UnfamiliarImages.fit(banks, scaling, cal.features, ood_quantile)  # type: ignore[arg-type]
            if unfamiliar.threshold == float("inf"):
                log(f"warning: {len(cal.targets)} calibration images are too few for an unfamiliar-image threshold at "
                    f"{ood_quantile} (needs at least {images_needed(ood_quantile)}): predictions carry no such warning")
                unfamiliar = None
            else:
                log(f"unfamiliar-image threshold on {unfamiliar.n_images} calibration images: flags about "
                    f"{1 - ood_quantile:.1%} of images like them")
    elif method == "conformal" or ood_quantile is not None:
        log("note: no calibration images, so the intervals carry no coverage guarantee and unfamiliar images are not flagged "
            "(raise data.calibration_fraction or add 'calibration' rows to the split column)")
    ckpt["calibration"] = result.state()
    ckpt.pop("unfamiliar", None)
    if unfamiliar is not None:
        ckpt["unfamiliar"] = unfamiliar.state()
        for state, bank in zip(ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt], unfamiliar.members):
            state["feature_bank"] = bank.state()  # with the scales fitted on the val images
    save_checkpoint(ckpt, path)
    return result
