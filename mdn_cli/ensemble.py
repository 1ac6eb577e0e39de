"""`mdn ensemble`: combine trained models into one checkpoint that predicts their average mixture.

Members may differ in seed, backbone, image size or number of components, and may have been
trained anywhere, but they must share the target (column and transform) and the split: the
ensemble's std scale is fitted on val images and its interval levels and unfamiliar-image
threshold on calibration images, which must be images no member trained on or chose its epoch by.
The result is a run folder (best.pt, splits.csv, config.yaml, eval/) that `mdn predict`,
`mdn evaluate`, `mdn export` and `mdn serve` use like any other.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from . import interrupts
from .calibrate import calibrate_checkpoint
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CheckpointError, RunError
from .files import temp_path, write_text_atomic
from .run_folder import lock_run_dir
from .runtime import select_runtime
from .data import open_source
from .data.splits import SPLITS_FILE

# What an ensemble keeps of each member: enough to rebuild and run it, and to say where it came from.
MEMBER_KEYS = ("config", "model_args", "target_scaler", "model", "epoch", "data", "feature_bank")


def member_states(checkpoints: list[Path]) -> list[tuple[dict, Path]]:
    """(member state, its splits.csv) for every model in `checkpoints` (an ensemble contributes its members)."""
    out = []
    for path in checkpoints:
        ckpt = load_checkpoint(path)
        splits = Path(path).parent / SPLITS_FILE
        if not splits.is_file():
            raise CheckpointError(f"{path}: no {SPLITS_FILE} beside it; an ensemble needs each member's run folder (or a copy "
                                  "of its splits.csv beside the checkpoint) to know which images no member trained on")
        states = ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt]
        out += [({k: s[k] for k in MEMBER_KEYS if k in s}, splits) for s in states]
    return out


def check_members(members: list[tuple[dict, Path]], checkpoints: list[Path]) -> None:
    if len(members) < 2:
        raise CheckpointError("an ensemble needs at least 2 members; pass 2 or more checkpoints")
    first, first_splits = members[0]
    for (state, splits), path in zip(members[1:], checkpoints[1:] if len(checkpoints) == len(members) else [None] * len(members)):
        where = f"{path}" if path is not None else "a member"
        for key in ("target_column", "target_transform"):
            a, b = first["config"]["data"][key], state["config"]["data"][key]
            if a != b:
                raise CheckpointError(f"{where}: data.{key} is '{b}', but the first member's is '{a}'; members must predict the same target")
        if splits.read_bytes() != first_splits.read_bytes():
            raise CheckpointError(
                f"{where}: trained on a different split ({splits} differs from {first_splits}); the ensemble's calibration "
                "needs images that no member trained on. Train every member from the same labels file with the same "
                "data.split_seed (run.seed may differ)"
            )


def build_ensemble(
    checkpoints: list[Path],
    output: Path,
    device: str = "auto",
    data_root: Path | None = None,
    num_workers: int | str = "auto",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_skip: Callable[[str], None] = print,
) -> Path:
    """Write the ensemble of `checkpoints` into the run folder `output` (or, for a path ending in
    .pt, that file in its folder); fit its calibration and score its test split. Returns best.pt."""
    members = member_states(checkpoints)
    check_members(members, checkpoints)
    folder, path = (output.parent, output) if output.suffix == ".pt" else (output, output / "best.pt")
    lock = lock_run_dir(folder)
    try:
        if path.exists() and not overwrite:
            raise RunError(f"{path} already exists; pass --overwrite to replace it, or choose another --output")
        config = members[0][0]["config"]
        if data_root is not None:
            config = {**config, "data": {**config["data"], "root": str(Path(data_root).resolve())}}
        shutil.copyfile(members[0][1], folder / SPLITS_FILE)
        write_text_atomic(folder / "config.yaml", yaml.safe_dump(config, sort_keys=False))  # the first member's
        ensemble = {
            "kind": "ensemble",
            "members": [state for state, _ in members],
            "config": config,
            "data": members[0][0].get("data", {}),
            "calibration": {"method": "none"},
        }
        # Calibrated beside its final name, then put in place: an interrupted or failed run leaves
        # no uncalibrated ensemble behind (and an ensemble it was to replace stays as it was).
        staging = temp_path(path)
        try:
            save_checkpoint(ensemble, staging)
            log(f"ensemble of {len(members)} members: " + ", ".join(
                f"{s['model_args']['backbone']} ({s['model_args']['components']} components, {s['model_args']['image_size']}px)"
                for s, _ in members))
            source = open_source(config["data"])
            examples = source.recorded(folder / SPLITS_FILE)
            splits = {name: [e for e in examples if e.split == name] for name in ("train", "val", "calibration", "test")}
            runtime = select_runtime(device, "fp32", what="--precision")
            train_cfg = config["train"]
            calibrate_checkpoint(staging, train_cfg["calibration"], splits, source, runtime, num_workers, log, on_skip,
                                 ood_quantile=train_cfg.get("ood_quantile", 0.99))
            interrupts.check()
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)
        if splits["test"]:
            interrupts.reached("evaluation")
            from .evaluate import evaluate, format_metrics

            evaluation, out, described = evaluate(path, runtime=runtime, num_workers=num_workers, on_skip=on_skip, overwrite=True)
            log(f"test metrics of the ensemble ({described}; written to {out}):\n{format_metrics(evaluation.metrics)}")
    finally:
        lock.release()
    return path


def train_members(cfg, members: int, resume: bool = False, overwrite: bool = False, log: Callable[[str], None] = print) -> Path | None:
    """`mdn train --members M`: train M members one after the other (run.name-1 ... run.name-M, with
    run.seed, run.seed+1, ...; the same split), then their ensemble into run.name. M times the
    training time; to train members in parallel, start them yourself (one per GPU or machine)
    and call `mdn ensemble`."""
    import os

    from .train import train

    paths = []
    for i in range(members):
        member = cfg.model_copy(deep=True)
        member.run.name, member.run.seed = f"{cfg.run.name}-{i + 1}", cfg.run.seed + i
        run_dir = Path(member.run.out_dir) / member.run.name
        log(f"member {i + 1}/{members}: {run_dir} (run.seed={member.run.seed})")
        train(member, resume=resume and (run_dir / "last.pt").is_file(), overwrite=overwrite, log=log)
        paths.append(run_dir / "best.pt")
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, the first process builds the ensemble
        return None
    return build_ensemble(paths, Path(cfg.run.out_dir) / cfg.run.name, device=cfg.run.device, overwrite=True, log=log)
