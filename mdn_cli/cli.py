"""The `mdn` command line. A thin layer: parse options, call the library, turn its typed errors
into one red line and an exit code. Heavy imports (torch) happen inside the commands so that
`mdn --help` stays fast."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import MdnError

app = typer.Typer(
    name="mdn",
    help="Image regression with honest uncertainty: train a CNN + mixture density network on labelled "
    "images, then predict a full distribution (mean, std, median, 68%/95% intervals, modes) per image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_INTERRUPTED = 130


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"mdn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Image regression with honest uncertainty."""


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file (see configs/ and the README's config reference).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a config value: --set train.epochs=3 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished or stale run of the same name.")] = False,
    members: Annotated[
        int, typer.Option("--members", min=1, help="Train this many members (seeds run.seed, run.seed+1, ...) and their ensemble.")
    ] = 1,
) -> None:
    """Train a backbone + MDN head; writes config.yaml, splits.csv, metrics.csv, last.pt and best.pt
    to run.out_dir/run.name."""
    import signal

    from .config import load_config

    def terminated(signum, frame):  # SIGTERM (schedulers, docker stop) ends the run like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    cfg = None
    try:
        cfg = load_config(config, set_ or [])
        if members > 1:
            from .ensemble import train_members

            train_members(cfg, members, resume=resume, overwrite=overwrite, log=typer.echo)
        else:
            from .train import train as run_training

            run_training(cfg, resume=resume, overwrite=overwrite)
    except MdnError as e:
        raise fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        extra = "".join(f" --set {s}" for s in set_ or [])
        last = Path(cfg.run.out_dir) / cfg.run.name / "last.pt" if cfg is not None else None
        if last is not None and last.is_file():
            hint = f"{last} holds the last completed epoch. Continue with: mdn train {config}{extra} --resume"
        else:
            hint = f"no epoch was completed, so there is nothing to resume. Start again with: mdn train {config}{extra}"
        raise fail(f"interrupted; {hint}", EXIT_INTERRUPTED) from None


@app.command()
def ensemble(
    checkpoints: Annotated[list[Path], typer.Argument(help="Trained members: best.pt files of runs on the same labels and split.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run folder for the ensemble (or a .pt path in one).")] = Path("runs/ensemble"),
    data_root: Annotated[
        Path | None, typer.Option("--data-root", help="Where the images are now, if not where the first member was trained.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an ensemble already at --output.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Combine trained models into one checkpoint that predicts their average mixture, with its
    own calibration (std scale on val, conformal levels and the unfamiliar-image threshold on the
    calibration split) and its test-split scores.

    Example: mdn ensemble runs/toy-1/best.pt runs/toy-2/best.pt runs/toy-3/best.pt -o runs/toy-ens"""
    try:
        from .ensemble import build_ensemble

        path = build_ensemble(checkpoints, output, device=device, data_root=data_root, overwrite=overwrite,
                              log=typer.echo, on_skip=lambda m: typer.secho(f"skipped: {m}", err=True, fg=typer.colors.YELLOW))
    except MdnError as e:
        raise fail(str(e), e.exit_code) from None
    typer.echo(f"ensemble checkpoint: {path}")


def _levels(text: str | None) -> tuple[float, ...]:
    from .calibration import DEFAULT_LEVELS

    if text is None:
        return DEFAULT_LEVELS
    try:
        levels = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        levels = ()
    if not levels or not all(0.0 < v < 1.0 for v in levels):
        raise fail(f"--levels: expected probabilities between 0 and 1 separated by commas, such as 0.5,0.8,0.9 (got {text!r})")
    return tuple(sorted(set(levels)))


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, folders (every image inside) or glob patterns.")],
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", "-c", help="Checkpoint to use (default: the newest best.pt under ./runs).")
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="Output format: table, json or csv.")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write one PNG per image (image beside its predicted density) here.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    levels: Annotated[
        str | None, typer.Option("--levels", help="Central interval levels, comma-separated (default: 0.6827,0.95).")
    ] = None,
    precision: Annotated[str, typer.Option(help="fp32 (default), or bf16 / fp16 on a CUDA GPU: faster, slightly less exact.")] = "fp32",
) -> None:
    """Predict a distribution per image: mean, std, median, mode, 68% and 95% intervals, and the
    mixture components. Exit code 1 when some inputs could not be read (the rest are still predicted)."""
    from .predict import FORMATS

    if format not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)} (got {format!r})")
    try:
        from .predict import (
            collect_images,
            find_latest_checkpoint,
            format_predictions,
            predict_images,
            write_output,
        )

        if checkpoint is None:
            checkpoint = find_latest_checkpoint()
            typer.echo(f"using checkpoint {checkpoint}", err=True)
        paths, problems = collect_images(images)
        for problem in problems:
            typer.secho(f"skipped: {problem}", err=True, fg=typer.colors.YELLOW)
        if not paths:
            raise fail("no images to predict")
        skipped: list[str] = []

        def on_skip(message: str) -> None:
            skipped.append(message)
            typer.secho(f"skipped: {message}", err=True, fg=typer.colors.YELLOW)

        predictions, mixture = predict_images(paths, checkpoint, device=device, batch_size=batch_size, on_skip=on_skip,
                                              levels=_levels(levels), precision=precision)
        if predictions:
            write_output(format_predictions(predictions, format), output)
        if plot is not None and predictions:
            from .plots import write_density_plots

            written = write_density_plots(predictions, mixture, plot)
            typer.echo(f"wrote {len(written)} plots to {plot}", err=True)
    except MdnError as e:
        raise fail(str(e), e.exit_code) from None
    if problems or skipped:
        n = len(problems) + len(skipped)
        raise fail(f"{n} input{'s' if n > 1 else ''} could not be read (see above); {len(predictions)} predicted", 1)


@app.command()
def evaluate(
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", "-c", help="Checkpoint to score (default: the newest best.pt under ./runs).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="A labels CSV in the training format (image paths relative to its folder); default: the run's own split."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option("--split", help="train, val, calibration or test (default: test of the run's splits.csv; all rows of --data)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (default: eval/ for the run's test split, else eval-NAME/).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace results of other inputs in the output folder.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    levels: Annotated[
        str | None, typer.Option("--levels", help="Central interval levels, comma-separated (default: 0.6827,0.95).")
    ] = None,
    precision: Annotated[str, typer.Option(help="fp32 (default), or bf16 / fp16 on a CUDA GPU.")] = "fp32",
) -> None:
    """Score a checkpoint on labelled images: NLL, CRPS, MAE/RMSE, interval coverage, width and
    interval score (also by decile of the true value and of the predicted std), calibration error;
    writes metrics.json, predictions.csv and diagnostic plots."""
    from .labels import SPLITS

    if split is not None and split not in SPLITS:
        raise fail(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
    try:
        from .evaluate import evaluate as run_evaluation
        from .evaluate import format_metrics
        from .predict import find_latest_checkpoint

        if checkpoint is None:
            checkpoint = find_latest_checkpoint()
            typer.echo(f"using checkpoint {checkpoint}", err=True)
        evaluation, out, described = run_evaluation(
            checkpoint, data, split, output, device,
            on_skip=lambda message: typer.secho(f"skipped: {message}", err=True, fg=typer.colors.YELLOW),
            overwrite=overwrite, levels=_levels(levels), precision=precision,
        )
    except MdnError as e:
        raise fail(str(e), e.exit_code) from None
    typer.echo(f"{checkpoint} on {described}:")
    typer.echo(format_metrics(evaluation.metrics), nl=False)
    typer.echo(f"wrote metrics.json, predictions.csv and plots to {out}")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (best.pt) or an ensemble.", metavar="CHECKPOINT")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the ONNX model.")] = Path("model.onnx"),
) -> None:
    """Export a trained model as ONNX, with its calibrated distribution intact.

    Inputs uint8 RGB images (N x 3 x S x S); outputs the mixture weights, means and stds (and the
    unfamiliar-image score); the metadata rebuilds every summary. `mdn predict --checkpoint
    model.onnx` runs it on onnxruntime.

    Example: mdn export runs/toy/best.pt --output toy.onnx"""
    try:
        from .export import export_onnx

        export_onnx(checkpoint, output, log=typer.echo)
    except MdnError as e:
        raise fail(str(e), e.exit_code) from None


@app.command()
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to serve (a best.pt).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface (no auth: see the README).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    max_batch: Annotated[int, typer.Option(min=1, help="Most images in one forward pass.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="How long an image waits for others to share its forward pass.")
    ] = 10.0,
    max_files: Annotated[int, typer.Option(min=1, help="Most files in one request.")] = 16,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Most megabytes in one request.")] = 20.0,
) -> None:
    """Serve predictions over HTTP: a web page at /, POST /predict (multipart, fields named "file"),
    GET /health. Concurrent requests share forward passes."""
    import importlib.util

    needed = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python-multipart": ("python_multipart", "multipart")}
    missing = [package for package, modules in needed.items()
               if not any(importlib.util.find_spec(m) for m in ([modules] if isinstance(modules, str) else modules))]
    if missing:
        raise fail(f'mdn serve needs {", ".join(missing)}: pip install "mdn-cli[serve]"')
    try:
        from .serve import ServeSettings
        from .serve import serve as run_server

        settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_files=max_files, max_upload_mb=max_upload_mb)
        run_server(checkpoint, host, port, device, settings, log=lambda message: typer.echo(message, err=True))
    except MdnError as e:
        raise fail(str(e), e.exit_code) from None


def main() -> None:  # pragma: no cover - console entry point alias
    app(prog_name="mdn")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
