"""What a user sees: plots in the target's own words, training curves, TensorBoard, help screens.

Plots are checked on synthetic predictions (scripts/plot_examples.py, no training) through the
figures' artists, which carry gids; one tiny real run checks what training and the CLI write."""

from __future__ import annotations

import re
import sys
import typing

import matplotlib.pyplot as plt
import numpy as np
import pytest
import typer
from conftest import load_script, write_config
from matplotlib.collections import LineCollection, QuadMesh
from PIL import Image
from typer.testing import CliRunner

from mdn_cli import cli, curves, plots
from mdn_cli.cli import app
from mdn_cli.data.labels import SPLITS
from mdn_cli.predict import FORMATS
from mdn_cli.train import HISTORY_COLUMNS

examples = load_script("plot_examples")
LABEL = "weight (lb)"
runner = CliRunner()


def mdn(*args):
    return runner.invoke(app, [str(a) for a in args])


def by_gid(fig, gid: str) -> list:
    return fig.findobj(lambda artist: artist.get_gid() == gid)


# ---------------------------------------------------------------------------------------------
# Evaluation plots


@pytest.mark.parametrize("n", [40, 3000])
def test_evaluation_plots_write_four_pngs_of_the_right_size(tmp_path, n):
    evaluation = examples.synthetic_evaluation(n)
    paths = plots.evaluation_plots(evaluation, tmp_path, LABEL)
    sizes = {"reliability.png": (5.8, 5.8), "pit_histogram.png": (6.4, 4.4), "predicted_vs_true.png": (6.6, 6.6),
             "coverage_by_bin.png": (13.8, 4.9)}  # three panels: predicted std, predicted value, true value
    assert [p.name for p in paths] == list(sizes)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(sizes)  # and no temp file left behind
    for path in paths:
        width, height = sizes[path.name]
        assert Image.open(path).size == (round(width * plots.DPI), round(height * plots.DPI)), path.name
        assert path.stat().st_size > 10_000


def test_evaluation_plots_speak_in_the_target_label_and_name_the_split():
    evaluation = examples.synthetic_evaluation(40)
    fig = plots.predicted_vs_true_figure(evaluation, "40 test images", LABEL)
    ax = fig.axes[0]
    assert ax.get_xlabel() == f"true {LABEL}" and LABEL in ax.get_ylabel()
    plt.close(fig)
    fig = plots.coverage_by_bin_figure(evaluation, "40 test images", LABEL)
    assert [a.get_xlabel() for a in fig.axes] == [f"predicted std of {LABEL} (equal-count bins)",
                                                  f"predicted {LABEL} (mean) (equal-count bins)", f"true {LABEL} (equal-count bins)"]
    # the quintile ranges are the tick labels, one per bin; each panel's title gives the homogeneity test
    assert len(fig.axes[2].get_xticklabels()) == len(evaluation.metrics["conditional"]["by_target"]["cells"]) == 5
    assert all("same coverage in every bin? 68%: p=" in a.get_title() for a in fig.axes)
    plt.close(fig)
    fig = plots.pit_figure(evaluation, "40 test images", LABEL)
    assert LABEL in fig.axes[0].get_xlabel()
    plt.close(fig)
    assert plots._split_of(evaluation) == "test"


def test_predicted_vs_true_switches_to_a_2d_histogram_for_many_images():
    small = plots.predicted_vs_true_figure(examples.synthetic_evaluation(40), "40", LABEL)
    large = plots.predicted_vs_true_figure(examples.synthetic_evaluation(3000), "3000", LABEL)
    kinds = lambda fig: {type(c) for c in fig.axes[0].collections}  # noqa: E731
    assert LineCollection in kinds(small) and QuadMesh not in kinds(small)  # one line per interval
    assert QuadMesh in kinds(large) and LineCollection not in kinds(large)  # 3000 lines would be a blur
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# Density plot


def test_density_plot_draws_every_hdr_piece_modes_and_the_label(tmp_path):
    image, m, record = examples.synthetic_prediction("bimodal")
    assert len(record["hdr_68"]) == 2  # the example is bimodal enough for a region in two pieces
    fig = plots.density_figure(image, m, record, LABEL, "photos/bimodal-puppy.jpg")
    for key in ("hdr_68", "hdr_95"):
        (bars,) = by_gid(fig, key)
        drawn = sorted(v for p in bars.get_paths() for v in (float(p.vertices[:, 0].min()), float(p.vertices[:, 0].max())))
        assert drawn == pytest.approx(sorted(v for piece in record[key] for v in piece))
    strip = fig.axes[2]
    assert [t.get_text() for t in strip.get_yticklabels()] == ["95% HDR", "68% HDR", "95% central", "68% central"]
    assert strip.get_xlabel() == LABEL and LABEL in fig.get_suptitle() and "bimodal-puppy.jpg" in fig.get_suptitle()
    assert len(by_gid(fig, "mode_1") + by_gid(fig, "mode_2")) == 2
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert sum("% of the mass" in t for t in texts) == 2
    # components never take the density's colour (where they are apart, each one is the density)
    colors = {line.get_color() for gid in ("component_1", "component_2") for line in by_gid(fig, gid)}
    assert len(colors) == 2 and plots.DENSITY not in colors
    # the legend and the title lie inside the figure (not cut off), and the legend covers no curve
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for artist in [fig.legends[0], fig._suptitle]:
        box = artist.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width + 1 and box.y1 <= fig.bbox.height + 1
    for other in [*fig.axes, fig._suptitle]:
        assert not fig.legends[0].get_window_extent(renderer).overlaps(other.get_window_extent(renderer))
    plt.close(fig)
    path = plots.density_plot(image, m, record, LABEL, "bimodal.jpg", tmp_path / "bimodal.png")
    assert Image.open(path).size[0] > 1000


def test_density_plot_without_regions_and_with_an_unbounded_interval():
    image, m, record = examples.synthetic_prediction("unimodal")
    assert len([md for md in record["modes"] if md["mass"] >= 0.05]) == 1  # unimodal: no regions drawn
    record["interval_95"] = [None, record["interval_95"][1]]  # too few calibration images for a lower end
    fig = plots.density_figure(image, m, record, LABEL, "one.jpg")
    assert not by_gid(fig, "hdr_68") and not by_gid(fig, "hdr_95")
    (shade,) = by_gid(fig, "interval_95")
    left = min(float(p.vertices[:, 0].min()) for p in shade.get_paths())
    assert left == pytest.approx(fig.axes[1].get_xlim()[0])  # shaded to the plot's edge
    assert not fig.axes[1].get_title()  # no warning for a familiar image
    plt.close(fig)


def test_density_plot_warns_about_an_unfamiliar_image():
    image, m, record = examples.synthetic_prediction("unfamiliar")
    fig = plots.density_figure(image, m, record, LABEL, "odd.jpg")
    assert "unlike the images the model was trained on" in fig.axes[1].get_title()
    plt.close(fig)


def test_log_target_density_is_of_the_target_itself():
    """Under target_transform: log the curve is p(y), Jacobian included: it integrates to ~1 over
    y (the density of log y drawn against y would integrate to about 1/E[1/y], not 1)."""
    image, m, record = examples.synthetic_prediction("log")
    fig = plots.density_figure(image, m, record, LABEL, "log.jpg")
    (line,) = by_gid(fig, "density")
    x, p = line.get_xdata(), line.get_ydata()
    assert 0.99 < np.trapezoid(p, x) < 1.001
    assert fig.axes[1].get_xlim()[0] >= 0
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Training curves


@pytest.mark.parametrize("epochs", [1, 200])
def test_curves_mark_the_best_epoch_in_every_panel(tmp_path, epochs):
    history = examples.synthetic_history(epochs)
    best = min(history, key=lambda r: r["val_nll_calibrated"])["epoch"]
    fig = curves.curves_figure(history, best, LABEL)
    assert len(fig.axes) == 3
    for ax in fig.axes:
        (line,) = [a for a in ax.lines if a.get_gid() == "best_epoch"]
        assert list(line.get_xdata()) == [best, best]
    assert LABEL in fig.axes[1].get_ylabel()
    assert fig.axes[2].get_yscale() == ("log" if epochs == 200 else "linear")  # the cosine decay spans decades
    plt.close(fig)
    path = curves.write_curves(history, tmp_path / "curves.png", best, LABEL)
    assert Image.open(path).size == (880, 924) and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_curves_take_a_learning_rate_of_zero():
    history = examples.synthetic_history(30)
    history[-1]["lr"] = 0.0
    fig = curves.curves_figure(history, None, LABEL)
    ax = fig.axes[2]
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] > 0
    (line,) = [a for a in ax.lines if a.get_gid() != "best_epoch"]
    assert line.get_ydata()[-1] == ax.get_ylim()[0]  # the last epoch is drawn, on the bottom edge
    assert any("bottom edge" in t.get_text() for t in ax.texts)
    assert not by_gid(fig, "best_epoch")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# A real tiny run: curves every epoch, TensorBoard, labels reaching the plots, CLI messages


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy_data):
    """A 2-epoch run with data.target_name/unit and run.tensorboard, recording what the plot
    functions were given."""
    pytest.importorskip("tensorboard", reason="pip install 'mdn-cli[tensorboard]' to test the TensorBoard log")
    tmp = tmp_path_factory.mktemp("presentation")
    config = write_config(tmp / "config.yaml", toy_data, tmp / "runs", run={"name": "tiny", "tensorboard": True},
                          data={"target_name": "weight", "target_unit": "lb"})
    calls: dict[str, list] = {"curves": [], "evaluation": []}
    import mdn_cli.train

    def curves_spy(history, path, best_epoch, label):
        calls["curves"].append((len(history), best_epoch, label))
        return curves.write_curves(history, path, best_epoch, label)

    def evaluation_spy(evaluation, out, label, real=plots.evaluation_plots):
        calls["evaluation"].append(label)
        return real(evaluation, out, label)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mdn_cli.train, "write_curves", curves_spy)
        patch.setattr(plots, "evaluation_plots", evaluation_spy)
        result = mdn("train", config)
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "tiny", calls


def test_training_writes_curves_every_epoch_with_the_best_epoch(run):
    folder, calls = run
    history = [line.split(",") for line in (folder / "metrics.csv").read_text().splitlines()[1:]]
    val = [float(row[HISTORY_COLUMNS.index("val_nll_calibrated")]) for row in history]
    best = 1 + val.index(min(val))
    assert [c[0] for c in calls["curves"]] == [1, 2]  # once per epoch, with the history so far
    assert calls["curves"][-1][1:] == (best, "weight (lb)")
    assert Image.open(folder / "curves.png").size == (880, 924)
    assert calls["evaluation"] == ["weight (lb)"]  # the test-split evaluation after training


@pytest.mark.parametrize("every_s, drawn", [(1e9, [1, 4]), (0.0, [1, 2, 3, 4])])
def test_curves_are_redrawn_at_most_every_few_seconds_and_after_the_last_epoch(tmp_path, toy_data, monkeypatch, every_s, drawn):
    """A drawing costs ~0.3 s: after the first epoch, then once CURVES_EVERY_S have passed, and
    always after the last epoch, so that the finished run's curves show every epoch."""
    import mdn_cli.train

    calls = []
    monkeypatch.setattr(mdn_cli.train, "CURVES_EVERY_S", every_s)
    monkeypatch.setattr(mdn_cli.train, "write_curves", lambda history, *a: calls.append(len(history)) or curves.write_curves(history, *a))
    config = write_config(tmp_path / "config.yaml", toy_data, tmp_path / "runs", train={"epochs": 4}, data={"test_fraction": 0.0})
    result = mdn("train", config)
    assert result.exit_code == 0, result.output
    assert calls == drawn
    assert Image.open(tmp_path / "runs" / "tiny" / "curves.png").size == (880, 924)


def test_tensorboard_logs_every_history_column(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = run
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(HISTORY_COLUMNS) - {"epoch"}
    assert [e.step for e in events.Scalars("val_nll")] == [1, 2]


def test_tensorboard_missing_is_a_config_error_before_training(tmp_path, toy_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    config = write_config(tmp_path / "config.yaml", toy_data, tmp_path / "runs", run={"name": "tb", "tensorboard": True})
    result = mdn("train", config)
    assert result.exit_code == 2
    assert 'pip install "mdn-cli[tensorboard]"' in result.output and "run.tensorboard" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs" / "tb" / "last.pt").exists()


def test_predict_plots_use_the_label_and_count_in_words(run, toy_data, tmp_path, monkeypatch):
    folder, _ = run
    labels = []
    write = plots.write_density_plots
    monkeypatch.setattr(plots, "write_density_plots", lambda p, m, out, label, **kw: labels.append(label) or write(p, m, out, label, **kw))
    images = [toy_data / "images" / f"0000{i}.png" for i in range(2)]
    one = mdn("predict", images[0], "-c", folder / "best.pt", "--plot", tmp_path / "one")
    assert one.exit_code == 0, one.output
    assert f"wrote 1 plot to {tmp_path / 'one'}" in one.stderr
    two = mdn("predict", *images, "-c", folder / "best.pt", "--plot", tmp_path / "two", "-o", tmp_path / "p.json", "-f", "json")
    assert two.exit_code == 0, two.output
    assert f"wrote 2 plots to {tmp_path / 'two'}" in two.stderr
    assert f"wrote 2 predictions to {tmp_path / 'p.json'}" in two.stderr
    assert labels == ["weight (lb)", "weight (lb)"] and plots.checkpoint_label(folder / "best.pt") == "weight (lb)"


def test_evaluate_says_what_it_wrote_and_where(run, tmp_path):
    folder, _ = run
    result = mdn("evaluate", "-c", folder / "best.pt", "-o", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote metrics\.json, predictions\.csv and 4 plots \(.*reliability\.png.*\) to " + re.escape(str(tmp_path / "eval")),
                     result.stdout.replace("\n", ""))


# ---------------------------------------------------------------------------------------------
# Help and messages

COMMANDS = ("train", "ensemble", "predict", "evaluate", "serve")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_reads_well(command):
    result = mdn(command, "--help")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Examples" in out and f"mdn {command} " in out.split("Examples", 1)[1]
    for tag in ("<bool>", "<list[str]>", "<str>", "<path>", "{"):
        assert tag not in out, f"{tag} in mdn {command} --help"
    usage = {"train": "mdn train [OPTIONS] CONFIG", "ensemble": "mdn ensemble [OPTIONS] CHECKPOINT...",
             "predict": "mdn predict [OPTIONS] [IMAGE...]", "evaluate": "mdn evaluate [OPTIONS]", "serve": "mdn serve [OPTIONS] CHECKPOINT"}
    assert f"Usage: {usage[command]}" in out


def test_the_command_list_gives_each_command_one_complete_sentence():
    group = typer.main.get_command(app)
    out = mdn("--help").output
    assert "<bool>" not in out
    for name in COMMANDS:
        first = group.commands[name].help.split("\n\n")[0]
        assert "\n" not in first and first.endswith(".") and first[0].isupper() and len(first) <= 60, first
        assert re.search(rf"│ {name} +{re.escape(first)} +│", out), f"{name}: first line not on one row"


def test_choices_are_listed_and_match_the_library():
    assert "<table|json|csv>" in mdn("predict", "--help").output
    hints = typing.get_type_hints(cli.predict, include_extras=True)
    assert typing.get_args(typing.get_args(hints["format"])[0]) == FORMATS
    split = typing.get_args(typing.get_type_hints(cli.evaluate, include_extras=True)["split"])[0]
    assert tuple(a for a in typing.get_args(typing.get_args(split)[0])) == SPLITS
    assert "train, val, calibration or test" in mdn("evaluate", "--help").output
    refused = mdn("evaluate", "--split", "holdout")
    assert refused.exit_code == 2 and all(f"'{s}'" in refused.output for s in SPLITS)
    refused = mdn("predict", "x.png", "--device", "gpu")
    assert refused.exit_code == 2 and "cuda:N" in refused.output


def test_counted_is_singular_for_one():
    assert [cli.counted(n, "plot") for n in (0, 1, 2)] == ["0 plots", "1 plot", "2 plots"]


@pytest.mark.slow  # 22 figures: the builders it uses are covered above
def test_plot_examples_script_renders_everything(tmp_path, monkeypatch):
    real = examples.synthetic_evaluation
    monkeypatch.setattr(examples, "synthetic_evaluation", lambda n, transform="none": real(min(n, 60), transform))
    monkeypatch.setattr(sys, "argv", ["plot_examples.py", "--out", str(tmp_path)])
    examples.main()
    assert len(list(tmp_path.rglob("*.png"))) == 4 * 4 + 4 + 2  # evaluation x 4 cases, densities, curves
