"""How long a whole training run takes: estimated from a short timed probe before epoch 1, and
corrected by the epochs that have finished.

The run's parts, each timed on this machine with this model and data:
    features    the backbone's features of the train and val images, computed once for the
                head-only epochs (train.unfreeze_after) -- a forward pass per image
    head epoch  the head on cached features: milliseconds a step
    full epoch  training steps through the real loader (decoding included), then validation
    after       the feature bank, calibration and the test split's evaluation: forward passes
The probe's step time is the median of a few real steps (the first, which pays for start-up,
left out) on a copy of the model, so the run itself is untouched. Early stopping can end a run
sooner than the estimate, which assumes every epoch runs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class RunEstimate:
    """Seconds for each part of a run, and the epochs it has."""

    epochs: int
    head_epochs: int
    """Of `epochs`, those that train the head alone on cached features."""
    full_epoch_s: float
    head_epoch_s: float
    features_s: float
    """Computing cached features once, before the first head-only epoch (0 without one)."""
    after_s: float
    started_epoch: int = 0
    """Epochs already done when the estimate was made (a resumed run)."""
    observed: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})
    """Measured epoch times so far: head-only (True) and whole-network (False) epochs."""

    def total(self) -> float:
        """The whole run from its first epoch, in seconds."""
        return self.remaining(self.started_epoch)

    def epoch_seconds(self, head: bool) -> float:
        """An epoch's seconds: the mean of those measured, else the probe's."""
        seen = self.observed[head]
        return statistics.fmean(seen) if seen else (self.head_epoch_s if head else self.full_epoch_s)

    def remaining(self, done: int) -> float:
        """Seconds left once `done` epochs have finished (calibration and evaluation included)."""
        head_left = max(0, self.head_epochs - done)
        full_left = max(0, self.epochs - max(done, self.head_epochs))
        features = self.features_s if done < self.head_epochs and not self.observed[True] else 0.0
        return features + head_left * self.epoch_seconds(True) + full_left * self.epoch_seconds(False) + self.after_s

    def finished_epoch(self, head: bool, seconds: float) -> None:
        self.observed[head].append(seconds)


def duration(seconds: float) -> str:
    """'45 s', '12 min', '1 h 05 min'."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
