"""The `mdn` command line. A thin layer: parse options, call the library, turn its typed errors
into one red line and an exit code. Heavy imports (torch) happen inside the commands so that
`mdn --help` stays fast."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from .errors import MdnError

if TYPE_CHECKING:
    from .interrupts import Interrupted


def _plain_help(params: list) -> list:
    """Typer prints a type tag beside every parameter: `<bool>` beside a flag, `<list[str]>` beside
    `IMAGE...`. A flag's name says what it takes, and so does an argument's metavar: drop those."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""
        elif isinstance(param, TyperArgument) and param.metavar:
            param.display_type_rich = lambda ctx: None  # the panel shows the metavar in the name column
    return params


class Command(TyperCommand):
    """A command whose help reads like a hand-kept CLI: `mdn predict [OPTIONS] IMAGE...` in the
    usage line (Typer writes `{images}...`), and no type tags where they add nothing."""

    def get_params(self, ctx):
        return _plain_help(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or param.name.upper()
                if param.nargs != 1 and not name.endswith("..."):
                    name += "..."
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class Group(TyperGroup):
    def get_params(self, ctx):
        return _plain_help(super().get_params(ctx))


app = typer.Typer(
    name="mdn",
    cls=Group,
    help="Image regression with honest uncertainty: train a CNN + mixture density network on labelled "
    "images, then predict a full distribution (mean, std, median, 68%/95% intervals, modes) per image.",
    epilog="Start with: mdn train configs/toy.yaml, then mdn predict IMAGE... (each command has --help with examples).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # paragraphs reflow to the terminal's width; examples are code blocks
    context_settings={"help_option_names": ["-h", "--help"]},
)

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


@contextmanager
def stoppable(kept: Callable[[Interrupted], str]) -> Iterator[None]:
    """Run a long command so that Ctrl-C and SIGTERM stop it at a safe point (see interrupts.py):
    one line says so, and `kept(e)` what was kept and how to go on; exit 128 + the signal number."""
    from .interrupts import Interrupted, check, stop_requests

    try:
        with stop_requests():
            yield
            check()  # a stop asked for during the command's last stretch still ends it as interrupted
    except Interrupted as e:
        how = f"stopped at once (a second {e})" if e.forced else f"interrupted ({e})"
        raise fail(f"{how}; {kept(e)}", e.exit_code) from None


def _this_command() -> str:
    """The command line being run, to repeat it."""
    import shlex

    return shlex.join(["mdn", *sys.argv[1:]])


def counted(n: int, noun: str) -> str:
    """'1 plot', '2 plots'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _device(value: str) -> str:
    # The pattern only (no torch import); whether that device is there, the runtime checks.
    from .config import DEVICE_PATTERN

    if not DEVICE_PATTERN.match(value):
        raise typer.BadParameter(f"expected auto, cpu, cuda, cuda:N (N: a GPU number) or mps, got {value!r}")
    return value


# Options shared by several commands, declared once so that their help reads the same everywhere.
Device = Annotated[
    str,
    typer.Option("--device", metavar="DEVICE", callback=_device,
                 help="auto, cpu, cuda, cuda:N (the N-th GPU) or mps; auto picks CUDA, then MPS, then the CPU."),
]
Precision = Annotated[
    Literal["fp32", "bf16", "fp16", "auto"],
    typer.Option("--precision", help="fp32 is exact; bf16 / fp16 (CUDA only) are faster and slightly less exact; "
                 "auto: bf16 or fp16 on a CUDA GPU, fp32 elsewhere."),
]
Levels = Annotated[
    str | None,
    typer.Option("--levels", metavar="LEVELS", help="Central interval levels, comma-separated (default: 0.6827,0.95)."),
]
Backend = Annotated[
    Literal["auto", "torch", "onnxruntime"],
    typer.Option("--backend", help="auto: onnxruntime for fp32 on a CPU when it is installed (1.6-1.8x faster there; the "
                 "checkpoint is exported once into ~/.cache/mdn-cli), PyTorch otherwise."),
]


@app.command(cls=Command, epilog="""**Examples**

    # no YAML: settings chosen from the data and this machine, the plan printed first
    mdn train data/toy/labels.csv
    mdn train configs/toy.yaml
    mdn train configs/toy.yaml --set train.epochs=3 --set model.components=5
    # continue after Ctrl-C
    mdn train configs/toy.yaml --resume
    # an ensemble of 5 seeds
    mdn train configs/toy.yaml --members 5

The run folder (run.out_dir/run.name) gets config.yaml, splits.csv, metrics.csv, curves.png
(redrawn at most every 30 s and at the end: open it to watch the run), last.pt, best.pt and eval/.""")
def train(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="A YAML config (see configs/ and the README's config reference), "
                                           "or a labels CSV: mdn then chooses the settings itself and prints its plan.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config value, e.g. --set train.epochs=3 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished or stale run of the same name.")] = False,
    members: Annotated[
        int, typer.Option("--members", min=1, metavar="N", help="Train N members (seeds run.seed, run.seed+1, ...) and their ensemble.")
    ] = 1,
) -> None:
    """Train a model on labelled images.

    A backbone CNN with a mixture density head learns the full distribution of the target for each
    image; after training it is calibrated and scored on the test split."""
    from .config import load_config

    cfg = None
    planned = config.suffix.lower() == ".csv"

    def kept(e: Interrupted) -> str:
        extra = "".join(f" --set {s}" for s in set_ or [])
        run_dir = Path(cfg.run.out_dir) / cfg.run.name if cfg is not None else None
        if run_dir is None or not (run_dir / "last.pt").is_file():
            return f"no epoch was completed, so there is nothing to resume. Start again with: mdn train {config}{extra}"
        lost = "the epoch in progress was not saved; " if e.forced else ""
        again = f"{run_dir / 'config.yaml'}" if planned else f"{config}{extra}"  # the plan as written: the data may change
        return f"{lost}{run_dir / 'last.pt'} holds the last completed epoch. Continue with: mdn train {again} --resume"

    with stoppable(kept):
        try:
            reasons = header = None
            if planned:
                from . import phases

                with phases.timed("planning (reading the data)"):
                    cfg, reasons, header = _plan(config, set_ or [])
            else:
                cfg = load_config(config, set_ or [])
            if members > 1:
                from .ensemble import train_members

                train_members(cfg, members, resume=resume, overwrite=overwrite, log=typer.echo)
            else:
                from .train import train as run_training

                run_training(cfg, resume=resume, overwrite=overwrite, reasons=reasons, header=header)
        except MdnError as e:
            raise fail(str(e), e.exit_code) from None


def _plan(labels: Path, overrides: list[str], out: Path | None = None):
    """Plan a run from a labels file, print the plan; (config, reasons, header for the YAML)."""
    import datetime

    from .config.planner import Machine, plan

    machine = Machine.here()
    p = plan(labels, machine, overrides)
    cfg, facts, why = p.config, p.facts, p.reasons
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    target = cfg.data.target_column
    head = f"{cfg.train.unfreeze_after} head-only epoch{'s' * (cfg.train.unfreeze_after != 1)} on cached features, then " \
        if cfg.train.unfreeze_after else ""
    lines = [
        f"plan for {labels} ({facts.rows} rows; image column {cfg.data.image_column!r}, target {target!r}):",
        f"  target    {cfg.data.target_transform} ({why['data.target_transform']})",
        f"  images    {cfg.data.image_size} px ({why['data.image_size']})",
        f"  model     {cfg.model.backbone} ({'ImageNet weights' if cfg.model.pretrained else 'random init'}) + "
        f"{cfg.model.components}-component MDN, dropout {cfg.model.dropout}",
        f"  schedule  {cfg.train.epochs} epochs of batches of {cfg.train.batch_size}: {head}the whole network "
        f"(backbone at {cfg.train.backbone_lr_scale}x lr {cfg.train.lr:g}); early stopping after "
        f"{cfg.train.early_stopping_patience} epochs without a better val NLL",
        f"  machine   {machine.device}, {machine.cores} cores, precision {cfg.train.precision}, "
        f"{'decoded images kept in memory' if cfg.data.cache == 'memory' else 'images decoded every epoch'}",
        f"  config    {out or run_dir / 'config.yaml'} (commented; repeat this run with: mdn train "
        f"{out or run_dir / 'config.yaml'}{'' if out else ' --overwrite'})",
    ]
    typer.echo("\n".join(lines))
    header = (f"Planned by `mdn {' '.join(['train' if out is None else 'init', str(labels), *(f'--set {o}' for o in overrides)])}` "
              f"on {datetime.date.today()} ({machine.device}, {machine.cores} cores).\n"
              "Each key: why it has its value (chosen: ...), or what it means. Edit and train with: mdn train THIS_FILE")
    return cfg, why, header


@app.command(cls=Command, epilog="""**Examples**

    mdn init data/toy/labels.csv -o config.yaml
    mdn init photos/labels.csv -o config.yaml --set data.target_column=weight
    mdn train config.yaml

Writes the commented YAML `mdn train LABELS.csv` would use, without training.""")
def init(
    labels: Annotated[Path, typer.Argument(metavar="LABELS.csv", help="A labels CSV: an image column and a numeric target column.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="Where to write the YAML config.")] = Path("config.yaml"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a chosen value, e.g. --set train.epochs=3 (repeatable)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file at --output.")] = False,
) -> None:
    """Write a config chosen from a labels file, to read and edit before training.

    Finds the image and target columns and chooses the backbone, image size, batch size, epochs,
    schedule and target transform from the data and this machine, each with its reason as a comment."""
    try:
        from .config import to_yaml
        from .files import write_text_atomic

        if output.exists() and not overwrite:
            raise fail(f"{output} exists; pass --overwrite to replace it, or choose another --output")
        cfg, reasons, header = _plan(labels, set_ or [], out=output)
        write_text_atomic(output, to_yaml(cfg, reasons, header))
    except MdnError as e:
        raise fail(str(e), e.exit_code) from None
    typer.echo(f"wrote {output}")


@app.command("check-data", cls=Command, epilog="""**Examples**

    mdn check-data data/toy/labels.csv
    mdn check-data configs/utkface.yaml --output runs/check-utkface

Exit code: 0 when nothing was found, 1 when problems were found (listed, and in report.json),
2 when the data cannot be read at all.""")
def check_data(
    source: Annotated[Path, typer.Argument(metavar="LABELS.csv|CONFIG", help="A labels CSV, or a YAML config naming one.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config value, e.g. --set data.target_column=age."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FOLDER", help="Where to write report.json, duplicates.csv and label_histogram.png "
                     "(default: runs/check-NAME)."),
    ] = None,
) -> None:
    """Check a labelled image set before training on it.

    Unreadable, truncated or tiny images and unusual modes; exact and near-duplicate photos (the
    same photo resized or re-compressed), above all copies in two splits, which leak test images
    into training; label cells that are not numbers, outliers and skew, with a histogram."""
    from tqdm import tqdm

    with stoppable(lambda e: "no report was written"):
        try:
            from .check_data import check_data as run_check
            from .check_data import format_report

            cfg, labels = _data_config(source, set_ or [])
            out = output or Path(cfg.run.out_dir) / f"check-{labels.resolve().parent.name}"
            bar = tqdm(total=0, desc="checking images", unit="image", leave=False)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh() if done % 64 == 0 else None

            report = run_check(labels, cfg, out, progress=progress)
            bar.close()
        except MdnError as e:
            raise fail(str(e), e.exit_code) from None
    typer.echo(format_report(report, out), nl=False)
    if report.problems:
        raise typer.Exit(1)


def _data_config(source: Path, overrides: list[str]):
    """(config, labels file) from a labels CSV (its columns found as `mdn train labels.csv` finds
    them) or a YAML config."""
    from .config import load_config

    if source.suffix.lower() == ".csv":
        from .config.planner import read_facts

        facts = read_facts(source, *_given(overrides, "data.image_column", "data.target_column"))
        cfg = load_config(None, [f"data.root={source.parent}", f"data.labels={source.name}",
                                 f"data.image_column={facts.image_column}", f"data.target_column={facts.target_column}",
                                 f"data.split_column={facts.split_column or 'split'}", *overrides])
        return cfg, source
    cfg = load_config(source, overrides)
    labels = Path(cfg.data.labels)
    return cfg, labels if labels.is_absolute() else Path(cfg.data.root) / labels


@app.command(cls=Command, epilog="""**Examples**

    mdn shard data/toy/labels.csv --output shards/toy
    mdn shard configs/utkface.yaml --output s3://my-bucket/utkface --images-per-shard 2000
    # then train from them: data.shards
    mdn train configs/utkface.yaml --set data.shards=s3://my-bucket/utkface

S3-compatible stores: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY as usual.
Written again after rows were added to the labels, it writes shards of the new images only.""")
def shard(
    source: Annotated[Path, typer.Argument(metavar="LABELS.csv|CONFIG", help="A labels CSV, or a YAML config naming one.")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="FOLDER|URL", help="Where the shard set goes: a folder, file:// or s3:// URL.")],
    images_per_shard: Annotated[int, typer.Option("--images-per-shard", min=1, metavar="N", help="Images in one shard file.")] = 1000,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config value (the columns, the split rule)."),
    ] = None,
) -> None:
    """Write a labelled image folder as shards, to train and score from a folder or a bucket.

    Each record keeps the original image bytes (never re-encoded), its target, its key and its
    split, made by the same rule as a folder run, so both runs have the same splits."""
    with stoppable(lambda e: "shards already written are whole and listed; run the command again to write the rest"):
        try:
            from .data.folder import FolderSource
            from .data.shards import write_shards

            cfg, labels = _data_config(source, set_ or [])
            data = cfg.data.model_dump()
            folder = FolderSource({**data, "labels": str(labels.resolve())}, Path(cfg.data.root))
            result = write_shards(folder, data, output, images_per_shard, log=typer.echo)
        except MdnError as e:
            raise fail(str(e), e.exit_code) from None
    split = ", ".join(f"{n} {s}" for s, n in result["by_split"].items())
    typer.echo(f"wrote {counted(len(result['shards']), 'shard')} of {counted(result['images'], 'new image')} ({split or 'none new'}) "
               f"to {output}; the set holds {result['total_images']} images in {result['total_shards']} shards")


def _given(overrides: list[str], *keys: str) -> list[str | None]:
    """The values of `keys` among --set overrides (None where not given)."""
    given = dict(item.split("=", 1) for item in overrides if "=" in item)
    return [given.get(key) for key in keys]


@app.command(cls=Command, epilog="""**Examples**

    mdn train configs/toy.yaml --set run.name=toy-1 --set run.seed=1
    mdn train configs/toy.yaml --set run.name=toy-2 --set run.seed=2
    mdn ensemble runs/toy-1/best.pt runs/toy-2/best.pt -o runs/toy-ens
    mdn predict photo.jpg -c runs/toy-ens/best.pt

`mdn train CONFIG --members N` does all of this in one go.""")
def ensemble(
    checkpoints: Annotated[
        list[Path], typer.Argument(metavar="CHECKPOINT...", help="Trained members: best.pt files of runs on the same labels and split.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="FOLDER", help="Run folder for the ensemble (or a .pt path in one).")
    ] = Path("runs/ensemble"),
    data_root: Annotated[
        Path | None,
        typer.Option("--data-root", metavar="FOLDER", help="Where the images are now, if not where the first member was trained."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an ensemble already at --output.")] = False,
    device: Device = "auto",
) -> None:
    """Combine trained models into one ensemble checkpoint.

    The ensemble predicts the average of its members' mixtures, with its own calibration (std scale
    on val, conformal levels and the unfamiliar-image threshold on the calibration split) and its
    test-split scores."""
    target = output if output.suffix == ".pt" else output / "best.pt"

    def kept(e: Interrupted) -> str:
        if target.is_file():  # written only once calibrated (an interrupted start removes its own)
            return f"the ensemble {target} is complete; its test scores were not written: mdn evaluate -c {target}"
        again = " ".join(["mdn ensemble", *map(str, checkpoints), "--output", str(output)])
        return f"no ensemble was written. Start again with: {again}"

    with stoppable(kept):
        try:
            from .ensemble import build_ensemble

            path = build_ensemble(checkpoints, output, device=device, data_root=data_root, overwrite=overwrite,
                                  log=typer.echo, on_skip=lambda m: typer.secho(f"skipped: {m}", err=True, fg=typer.colors.YELLOW))
        except MdnError as e:
            raise fail(str(e), e.exit_code) from None
        typer.echo(f"ensemble checkpoint: {path}")


def _shard_examples(url: str, split: str | None, checkpoint: Path):
    """(source, examples, problems) of a shard set's images, read as the model reads its target."""
    from .checkpoint import load_checkpoint
    from .data.shards import ShardSource
    from .export import is_onnx

    data = {} if is_onnx(checkpoint) else load_checkpoint(checkpoint)["config"]["data"]
    source = ShardSource(url, data)
    examples = [e for e in source.read().examples if split is None or e.split == split]
    return source, examples, [] if examples else [f"{url}: no {split} images in the shard set"]


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


@app.command(cls=Command, epilog="""**Examples**

    # with the newest runs/**/best.pt
    mdn predict photo.jpg
    mdn predict photos/ "litter*/*.jpg" -c runs/toy/best.pt
    mdn predict photo.jpg --format json --output preds.json
    # one PNG per image: the image beside its predicted density
    mdn predict photo.jpg --plot plots/

Exit code 1 when some inputs could not be read (the rest are still predicted).""")
def predict(
    images: Annotated[
        list[str] | None, typer.Argument(metavar="IMAGE...", help="Image files, folders (every image inside) or glob patterns.")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", "-c", metavar="CHECKPOINT", help="Checkpoint to use (default: the newest best.pt under ./runs)."),
    ] = None,
    format: Annotated[
        Literal["table", "json", "csv"], typer.Option("--format", "-f", help="Output format.")
    ] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write to this file instead of stdout.")] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", metavar="FOLDER", help="Write one PNG per image here: the image beside its predicted density."),
    ] = None,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, metavar="N", help="Images per forward pass.")] = 32,
    levels: Levels = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
    group: Annotated[
        str | None,
        typer.Option("--group", metavar="GROUP", help="The images' group, for a model calibrated by group (data.group_column)."),
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option("--shards", metavar="URL", help="Predict the images of a shard set (a folder, file:// or s3:// URL; see mdn shard)."),
    ] = None,
    split: Annotated[
        Literal["train", "val", "calibration", "test"] | None,
        typer.Option("--split", metavar="SPLIT", help="With --shards: only this split's images."),
    ] = None,
    groups: Annotated[
        Path | None,
        typer.Option("--groups", metavar="FILE.csv",
                     help="Each image's group: a CSV with columns image (relative to its folder) and group."),
    ] = None,
) -> None:
    """Predict a distribution for each image.

    For every image: mean, std (its aleatoric and epistemic parts for an ensemble), median, mode,
    the 68% and 95% intervals, the highest-density regions, every likely answer with its
    probability, the mixture components, and a warning for images unlike the training images;
    as a table, JSON or CSV."""
    wrote: list[str] = []  # what is complete on disk
    plots: list[Path] = []

    def kept(e: Interrupted) -> str:
        done = wrote + ([f"{counted(len(plots), 'plot')} to {plot}"] if plots else [])
        return f"wrote {' and '.join(done)} before stopping" if done else "nothing was written"

    with stoppable(kept):
        try:
            from .mixture import cat_mixtures
            from .predict import (
                collect_images,
                find_latest_checkpoint,
                predict_chunks,
                prediction_output,
                read_groups,
            )

            if checkpoint is None:
                checkpoint = find_latest_checkpoint()
                typer.echo(f"using checkpoint {checkpoint}", err=True)
            if group is not None and groups is not None:
                raise fail("--group and --groups: give one group for every image, or a file of groups, not both")
            if shards is not None:
                if images or plot is not None:
                    raise fail("--shards predicts the images of a shard set: give no image files, and no --plot (it draws files)")
                source, examples, problems = _shard_examples(shards, split, checkpoint)
            else:
                from .data.folder import unlabelled

                paths, problems = collect_images(images or [])
                source, examples = unlabelled(paths)
            for problem in problems:
                typer.secho(f"skipped: {problem}", err=True, fg=typer.colors.YELLOW)
            if not examples:
                raise fail("no images to predict")
            if plot is not None and plot.exists() and not plot.is_dir():
                raise fail(f"--plot: {plot} is a file; give a folder to write the plots into")
            if groups is not None or group is not None:
                import dataclasses

                table = read_groups(groups) if groups is not None else {}
                examples = [dataclasses.replace(e, group=group if group is not None else table.get(e.path.resolve()))
                            for e in examples]
            skipped: list[str] = []

            def on_skip(message: str) -> None:
                skipped.append(message)
                typer.secho(f"skipped: {message}", err=True, fg=typer.colors.YELLOW)

            predicted, for_plots = 0, []  # streamed: memory stays flat over any number of images (without --plot)
            with prediction_output(format, output) as writer:
                for part, mixture in predict_chunks(source, examples, checkpoint, device=device, batch_size=batch_size,
                                                    on_skip=on_skip, levels=_levels(levels), precision=precision, backend=backend,
                                                    log=lambda message: typer.echo(message, err=True)):
                    writer.add(part)
                    predicted += len(part)
                    if plot is not None:
                        for_plots.append((part, mixture))
            if predicted and output is not None:
                wrote.append(f"{counted(predicted, 'prediction')} to {output}")
                typer.echo(f"wrote {wrote[-1]}", err=True)
            if plot is not None and predicted:
                from .plots import checkpoint_label, write_density_plots

                written = write_density_plots([p for part, _ in for_plots for p in part], cat_mixtures([m for _, m in for_plots]),
                                              plot, checkpoint_label(checkpoint), on_written=plots.append)
                typer.echo(f"wrote {counted(len(written), 'plot')} to {plot}", err=True)
        except MdnError as e:
            raise fail(str(e), e.exit_code) from None
    if problems or skipped:
        n = len(problems) + len(skipped)
        raise fail(f"{counted(n, 'input')} could not be read (see above); {predicted} predicted", 1)


@app.command(cls=Command, epilog="""**Examples**

    # the newest run's test split
    mdn evaluate
    mdn evaluate -c runs/toy/best.pt --split val
    mdn evaluate -c runs/toy/best.pt --data new/labels.csv -o new-eval/

Writes metrics.json, predictions.csv, reliability.png, pit_histogram.png, predicted_vs_true.png
and coverage_by_bin.png.""")
def evaluate(
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", "-c", metavar="CHECKPOINT", help="Checkpoint to score (default: the newest best.pt under ./runs)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", metavar="LABELS.csv",
                     help="A labels CSV in the training format (image paths relative to its folder); default: the run's own split."),
    ] = None,
    split: Annotated[
        Literal["train", "val", "calibration", "test"] | None,
        typer.Option("--split", metavar="SPLIT",
                     help="train, val, calibration or test (default: test of the run's splits.csv; every row of --data)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FOLDER", help="Output folder (default: eval/ for the run's test split, else eval-NAME/)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace results of other inputs in the output folder.")] = False,
    device: Device = "auto",
    levels: Levels = None,
    precision: Precision = "fp32",
) -> None:
    """Score a checkpoint on labelled images.

    NLL, CRPS, MAE/RMSE, interval coverage, width and interval score (also by decile of the true
    value and of the predicted std) and calibration error, with diagnostic plots."""
    with stoppable(lambda e: f"files already written are whole; to write them all, run again: {_this_command()}"):
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
    plots = sorted(p.name for p in out.glob("*.png"))
    typer.echo(f"wrote metrics.json, predictions.csv and {counted(len(plots), 'plot')} ({', '.join(plots)}) to {out}")


@app.command(cls=Command, epilog="""**Examples**

    mdn export runs/toy/best.pt --output toy.onnx
    mdn predict photo.jpg --checkpoint toy.onnx

Needs the export extra: pip install "mdn-cli[export]".""")
def export(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A checkpoint (best.pt) or an ensemble's.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="Where to write the ONNX model.")] = Path("model.onnx"),
) -> None:
    """Export a trained model to ONNX, its distribution intact.

    Inputs uint8 RGB images (N x 3 x S x S); outputs the mixture weights, means and stds (and the
    unfamiliar-image score); the metadata rebuilds every summary. `mdn predict --checkpoint
    model.onnx` runs it on onnxruntime."""
    with stoppable(lambda e: f"{output} was not written; run again: {_this_command()}"):
        try:
            from .export import export_onnx

            export_onnx(checkpoint, output, log=typer.echo)
        except MdnError as e:
            raise fail(str(e), e.exit_code) from None


@app.command(cls=Command, epilog="""**Examples**

    # then open http://127.0.0.1:8000/
    mdn serve runs/toy/best.pt
    mdn serve runs/toy/best.pt --host 0.0.0.0 --port 8080

Needs the serve extra: pip install "mdn-cli[serve]".""")
def serve(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Checkpoint to serve (a best.pt).")],
    host: Annotated[
        str, typer.Option("--host", metavar="ADDRESS", help="Address to listen on; 0.0.0.0 for every interface (no auth: see the README).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="Port (0: any free port).")] = 8000,
    device: Device = "auto",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, metavar="N", help="Most images in one forward pass.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", min=0, metavar="MS", help="How long an image waits for others to share its forward pass.")
    ] = 10.0,
    max_files: Annotated[int, typer.Option("--max-files", min=1, metavar="N", help="Most files in one request.")] = 16,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, metavar="MB", help="Most megabytes in one request.")] = 20.0,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=1, metavar="N",
                          help="Most images waiting for an answer; beyond it requests get 503 with Retry-After.")
    ] = 256,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", min=0.001, metavar="SECONDS",
                            help="Longest a client may take to send its upload (slower: 408).")
    ] = 30.0,
    backend: Backend = "auto",
) -> None:
    """Serve predictions over HTTP, with a web page.

    A web page at /, POST /predict (multipart, fields named "file") and GET /health. Concurrent
    requests share forward passes."""
    import importlib.util

    needed = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python-multipart": ("python_multipart", "multipart")}
    missing = [package for package, modules in needed.items()
               if not any(importlib.util.find_spec(m) for m in ([modules] if isinstance(modules, str) else modules))]
    if missing:
        raise fail(f'mdn serve needs {", ".join(missing)}: pip install "mdn-cli[serve]"')
    def kept(e: Interrupted) -> str:
        return "requests in flight may have been cut off" if e.forced else "the server stopped after answering the requests in flight"

    with stoppable(kept):
        try:
            from .serve import ServeSettings
            from .serve import serve as run_server

            settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_files=max_files, max_upload_mb=max_upload_mb,
                                     max_queue=max_queue, request_timeout_s=request_timeout)
            run_server(checkpoint, host, port, device, settings, log=lambda message: typer.echo(message, err=True), backend=backend)
        except MdnError as e:
            raise fail(str(e), e.exit_code) from None
