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
) -> None:
    """Train a backbone + MDN head; writes config.yaml, splits.csv, metrics.csv, last.pt and best.pt
    to run.out_dir/run.name."""
    from .config import load_config

    try:
        cfg = load_config(config, set_ or [])
        from .train import train as run_training

        run_training(cfg, resume=resume, overwrite=overwrite)
    except MdnError as e:
        raise fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        where = Path(cfg.run.out_dir) / cfg.run.name / "last.pt"
        extra = " ".join(f"--set {s}" for s in set_ or [])
        raise fail(
            f"interrupted; {where} holds the last completed epoch. Continue with: "
            f"mdn train {config} {extra + ' ' if extra else ''}--resume",
            EXIT_INTERRUPTED,
        ) from None


def main() -> None:  # pragma: no cover - console entry point alias
    app(prog_name="mdn")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
