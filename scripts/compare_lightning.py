#!/usr/bin/env python
"""`mdn train` against lightning-uq-box's MDN on Lightning: the same data, split, backbone, image
size, epochs and seeds; whole-process wall time, train+val time and test scores of each.

    bash scripts/compare_lightning.sh [--seeds 0 1 2]    # builds .venv-lightning, then runs this

Per seed:
  mdn        `mdn train configs/toy.yaml --set run.seed=S` (resnet18 from scratch at 64 px, 3
             components, all 15 epochs (no early stopping) of batches of 32, AdamW lr 1e-3): the whole process, as a user
             runs it (training, calibration, the unfamiliar-image bank, test evaluation, plots)
  lightning  lightning-uq-box's MDNRegression (3 components) on the same torchvision resnet18
             from scratch, trained by a Lightning Trainer for 15 epochs of batches of 32 with the
             same AdamW, on the mdn run's train split (validated on its val split), images
             decoded and resized by a torchvision pipeline in 2 loader workers, targets
             standardised on the train split; then its test split predicted. The whole process:
             imports, data, fit, test.
Both are scored on the mdn run's test split by the same code (mdn_cli.mixture / metrics): NLL per
image, CRPS, and the coverage of the central 68% and 95% intervals of each predictive mixture
(mdn's as it reports them: calibrated on its calibration split; Lightning's as its model gives).
Times: wall clock of each whole process (started fresh), and train+val: from the first training
step to the end of the last validation (mdn: its per-epoch seconds; Lightning: a callback).
Runs one process at a time; nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCH, SIZE, COMPONENTS, LR, WEIGHT_DECAY, WORKERS = 15, 32, 64, 3, 1e-3, 1e-4, 2


def score(weights, means, stds, targets) -> dict:
    """NLL, CRPS, central-interval coverage and width of mixtures in target units, mdn's code."""
    import torch

    from mdn_cli import mixture as mx

    m = mx.Mixture(weights, means, stds)
    y = torch.as_tensor(targets, dtype=torch.float64)
    out = {"n": len(y), "nll": float(-mx.log_prob(m, y).mean()), "crps": float(mx.crps(m, y).mean()),
           "mae_median": float((mx.median(m) - y).abs().mean())}
    for level in (0.68, 0.95):
        lo, hi = mx.interval(m, level)
        out[f"coverage_{round(level * 100)}"] = float(((y >= lo) & (y <= hi)).double().mean())
        out[f"width_{round(level * 100)}"] = float((hi - lo).mean())
    return out


# --- the Lightning side (run in its own process) ------------------------------------------------


def lightning_run(data: Path, splits: Path, seed: int, out: Path) -> None:
    import csv

    import lightning as L
    import torch
    import torchvision
    from lightning_uq_box.uq_methods import MDNRegression
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    rows = list(csv.DictReader(open(splits, newline="", encoding="utf-8")))
    target = [c for c in rows[0] if c not in ("image", "split")][0]
    by_split = {s: [(r["image"], float(r[target])) for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    train_y = torch.tensor([t for _, t in by_split["train"]], dtype=torch.float64)
    loc, scale = float(train_y.mean()), float(train_y.std())
    prepare = transforms.Compose([transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.ToTensor(),
                                  transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    class Images(Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, y = self.items[i]
            with Image.open(data / path) as im:
                x = prepare(im.convert("RGB"))
            return {"input": x, "target": torch.tensor([(y - loc) / scale], dtype=torch.float32)}

    def loader(split, shuffle=False):
        return DataLoader(Images(by_split[split]), batch_size=BATCH, shuffle=shuffle, num_workers=WORKERS,
                          persistent_workers=True, drop_last=shuffle)

    class Timer(L.Callback):
        def on_train_start(self, trainer, module):
            self.started = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.started

    L.seed_everything(seed, workers=True)
    backbone = torchvision.models.resnet18(num_classes=1)
    model = MDNRegression(backbone, n_components=COMPONENTS,
                          optimizer=lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY))
    timer = Timer()
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], default_root_dir=str(out))
    trainer.fit(model, loader("train", shuffle=True), loader("val"))
    model.eval()
    log_pi, mu, sigma = [], [], []
    with torch.inference_mode():
        for batch in loader("test"):
            a, b, c = model.model(batch["input"])
            log_pi.append(a.reshape(len(a), -1))
            mu.append(b.reshape(len(b), -1))
            sigma.append(c.reshape(len(c), -1))
    weights = torch.cat(log_pi).double().exp()
    means = torch.cat(mu).double() * scale + loc
    stds = torch.cat(sigma).double() * scale
    result = {"train_val_s": timer.seconds, **score(weights / weights.sum(1, keepdim=True), means, stds,
                                                    [t for _, t in by_split["test"]])}
    (out / "lightning.json").write_text(json.dumps(result, indent=2) + "\n")


# --- the comparison ---------------------------------------------------------------------------------


def mdn_run(seed: int, runs: Path) -> dict:
    mdn = Path(sys.executable).parent / "mdn"
    name = f"lightning-compare-{seed}"
    command = [str(mdn), "train", str(ROOT / "configs" / "toy.yaml"), "--overwrite", "--set", f"run.seed={seed}", "--set",
               f"run.name={name}", "--set", f"run.out_dir={runs}", "--set", f"data.root={ROOT / 'data' / 'toy'}",
               "--set", "train.early_stopping_patience=null"]  # all 15 epochs, as Lightning runs them
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"mdn train failed:\n{done.stderr[-3000:]}")
    run = runs / name
    import csv

    epochs = list(csv.DictReader(open(run / "metrics.csv", newline="")))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    # the breakdown's lines, up to the first blank one (the progress bars on stderr follow stdout here)
    log = done.stdout + done.stderr
    breakdown = log[log.rfind("where this run's time went"):].split("\n\n")[0].strip() if "where this run's time went" in log else ""
    return {"wall_s": wall, "train_val_s": sum(float(r["seconds"]) for r in epochs), "epochs": len(epochs),
            "nll": metrics["nll"], "crps": metrics["crps"], "mae_median": metrics["mae_median"],
            "coverage_68": metrics["coverage_68"], "coverage_95": metrics["coverage_95"],
            "width_68": metrics["width_68"], "width_95": metrics["width_95"], "n": metrics["n"], "splits": str(run / "splits.csv"),
            "breakdown": breakdown}


def lightning(seed: int, splits: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--lightning-run", str(ROOT / "data" / "toy"), splits, str(seed), str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"the Lightning run failed:\n{done.stderr[-3000:]}")
    return {"wall_s": wall, "epochs": EPOCHS, **json.loads((out / "lightning.json").read_text())}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--lightning-run":
        lightning_run(Path(argv[1]), Path(argv[2]), int(argv[3]), Path(argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "lightning-compare")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {"mdn": [], "lightning": []}
    for seed in args.seeds:  # alternating, so that a change in the machine's load hits both
        results["mdn"].append(mdn_run(seed, args.runs))
        print(json.dumps({"tool": "mdn", "seed": seed, **{k: v for k, v in results["mdn"][-1].items() if k != "breakdown"}}),
              flush=True)
        results["lightning"].append(lightning(seed, results["mdn"][-1]["splits"], args.runs / f"lightning-{seed}"))
        print(json.dumps({"tool": "lightning", "seed": seed, **results["lightning"][-1]}), flush=True)

    def cell(tool: str, key: str, digits: int) -> str:
        values = [r[key] for r in results[tool]]
        sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{sd}"

    print(f"\nmeans ± sd over seeds {args.seeds} (test split: {results['mdn'][0]['n']} images)\n")
    print("| tool | whole process s | train+val s | test NLL | CRPS | MAE (median) | 68% coverage (width) | 95% coverage (width) |")
    print("|---|---|---|---|---|---|---|---|")
    for tool in results:
        print(f"| {tool} | {cell(tool, 'wall_s', 1)} | {cell(tool, 'train_val_s', 1)} | {cell(tool, 'nll', 3)} | "
              f"{cell(tool, 'crps', 3)} | {cell(tool, 'mae_median', 3)} | {cell(tool, 'coverage_68', 3)} ({cell(tool, 'width_68', 2)}) | "
              f"{cell(tool, 'coverage_95', 3)} ({cell(tool, 'width_95', 2)}) |")
    ratio = [m["wall_s"] / lt["wall_s"] for m, lt in zip(results["mdn"], results["lightning"])]
    print(f"\nmdn / Lightning whole-process wall time per seed: {', '.join(f'{r:.3f}' for r in ratio)} "
          f"(mean {statistics.mean(ratio):.3f}; target <= 0.95)")
    print(f"\nmdn's own breakdown (seed {args.seeds[-1]}):\n{results['mdn'][-1]['breakdown']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
