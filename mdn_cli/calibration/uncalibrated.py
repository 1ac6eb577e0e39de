"""`none` and `scale`: the model's own distribution, as trained or with one std scale fitted on
val. Intervals at their nominal CDF levels; no coverage guarantee."""

from __future__ import annotations

from . import Calibration, FitData, Method, register
from .scale import fit_constant

register(Method(
    "none", "the model's own distribution, uncalibrated", lambda data: Calibration("none"), conformal=False, scales=False,
    guarantee=lambda n, which: "none: the model's own distribution, uncalibrated",
))


def fit_scale(data: FitData) -> Calibration:
    return Calibration("scale", fit_constant(data.val, data.val_targets))


register(Method(
    "scale", "one factor on every component std, fitted on the val split", fit_scale, conformal=False, scales=True,
    guarantee=lambda n, which: "none: component stds scaled by a factor fitted on the val split",
))
