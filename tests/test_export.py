"""`mdn export`: the ONNX model predicts the same distribution as the checkpoint, and the server agrees."""

import json
import math

import pytest
import torch
from conftest import load_script, write_config
from typer.testing import CliRunner

from mdn_cli.cli import app

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")


def mdn(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A log-target model with finite conformal 95% intervals and the unfamiliar-image warning
    (ood_quantile 0.9, ~90 calibration images), and its ONNX export."""
    tmp = tmp_path_factory.mktemp("export")
    data = tmp / "toy"
    load_script("make_toy_data").make_toy_dataset(data, n=300, seed=6, size=32)
    config = write_config(tmp / "c.yaml", data, tmp / "runs",
                          data={"target_transform": "log", "val_fraction": 0.15, "calibration_fraction": 0.3, "test_fraction": 0.1},
                          train={"epochs": 2, "batch_size": 16, "early_stopping_patience": None, "ood_quantile": 0.9})
    assert mdn("train", config).exit_code == 0
    best = tmp / "runs/tiny/best.pt"
    result = mdn("export", best, "--output", tmp / "model.onnx")
    assert result.exit_code == 0, result.output
    assert "onnx.checker passed" in result.output
    return best, tmp / "model.onnx", data


def close(a, b, path=""):
    """Every number within 1e-4 relative (ONNX runs the same float32 network, in another runtime)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-9), path
    else:
        assert a == b, path


def test_onnx_graph_names_and_metadata(exported):
    _, model_path, _ = exported
    model = onnx.load(str(model_path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["weights", "means", "stds", "ood_score"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch
    meta = json.loads({p.key: p.value for p in model.metadata_props}["mdn"])
    assert meta["target_transform"] == "log" and meta["input"]["size"] == 32 and meta["member_components"] == [2]
    scores = meta["calibration"]["scores"]
    assert meta["calibration"]["method"] == "conformal" and len(scores["pit"]) > 39 and meta["calibration"]["scale_applied"]
    assert scores["pit"] == sorted(scores["pit"]) and all(c["pit"] == sorted(c["pit"]) for c in scores["cells"].values())
    assert meta["members"] == [{"backbone": "resnet18", "components": 2, "image_size": 32}]
    assert {p.key for p in model.metadata_props} == {"mdn", "mdn_sha256"}


def test_predict_with_the_onnx_model_prints_the_checkpoints_json(exported, tmp_path):
    best, model_path, data = exported
    images = sorted((data / "images").glob("*.png"))[:10]
    noise = tmp_path / "noise.png"
    from PIL import Image

    Image.frombytes("RGB", (40, 40), bytes(range(256)) * 18 + bytes(range(192))).save(noise)
    a = mdn("predict", *images, noise, "-c", best, "-f", "json", "--levels", "0.5,0.8,0.95", "--backend", "torch")
    b = mdn("predict", *images, noise, "-c", model_path, "-f", "json", "--levels", "0.5,0.8,0.95")
    assert a.exit_code == b.exit_code == 0, b.output
    pt, ox = json.loads(a.stdout), json.loads(b.stdout)
    assert len(pt) == 11 and "ood_score" in pt[0] and "hdr_80" in pt[0]
    close(ox, pt)
    assert ox[-1]["in_distribution"] is False  # the warning travels with the model


def test_backend_auto_exports_once_into_the_cache_and_agrees_with_torch(exported, tmp_path, monkeypatch):
    best, _, data = exported
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images = sorted((data / "images").glob("*.png"))[:5]
    torch_json = json.loads(mdn("predict", *images, "-c", best, "-f", "json", "--backend", "torch").stdout)
    first = mdn("predict", *images, "-c", best, "-f", "json")
    assert first.exit_code == 0 and "exporting" in first.stderr
    assert len(list((tmp_path / "cache" / "mdn-cli" / "onnx").glob("*.onnx"))) == 1
    close(json.loads(first.stdout), torch_json)
    again = mdn("predict", *images, "-c", best, "-f", "json")
    assert again.exit_code == 0 and "exporting" not in again.stderr  # exported once
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "torch" else real_version(name))
    # another torch (or another mdn, onnxruntime, torchvision...) exports again
    assert "exporting" in mdn("predict", *images, "-c", best, "-f", "json").stderr
    assert len(list((tmp_path / "cache" / "mdn-cli" / "onnx").glob("*.onnx"))) == 2


def test_a_damaged_cached_export_is_exported_again(exported, tmp_path, monkeypatch):
    from mdn_cli.export import _cache_key

    best, _, data = exported
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    image = sorted((data / "images").glob("*.png"))[0]
    first = mdn("predict", image, "-c", best, "-f", "json")
    cached = tmp_path / "cache" / "mdn-cli" / "onnx" / f"{_cache_key(best)}.onnx"
    assert first.exit_code == 0 and cached.is_file()
    cached.write_bytes(cached.read_bytes()[:1000])  # a disk that filled up, a crash mid-copy
    again = mdn("predict", image, "-c", best, "-f", "json")
    assert again.exit_code == 0 and "damaged; exporting again" in again.stderr, again.output
    close(json.loads(again.stdout), json.loads(first.stdout))


def test_onnxruntime_on_another_device_is_refused(exported):
    best, _, data = exported
    image = sorted((data / "images").glob("*.png"))[0]
    for args in (("--device", "cuda"), ("--precision", "bf16")):
        result = mdn("predict", image, "-c", best, "--backend", "onnxruntime", *args)
        assert result.exit_code == 2 and "--backend onnxruntime runs fp32 on the CPU" in result.output, result.output


def test_rebuild_intervals_from_the_outputs_and_metadata_alone(exported):
    """What a user in another language does: run the graph, then rebuild an interval from the
    components and the stored calibration PITs with the documented rank rule."""
    import onnxruntime

    from mdn_cli import mixture as mx
    from mdn_cli.images import decode_square

    best, model_path, data = exported
    model = onnx.load(str(model_path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["mdn"])
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    image = sorted((data / "images").glob("*.png"))[3]
    w, mu, sd, _ = session.run(None, {"images": decode_square(image, meta["input"]["size"])[None].numpy()})
    # the image's cell, from the outputs: its centre and log spread in the model's space, counted against the edges
    c = float((w * mu).sum())
    v = 0.5 * math.log(float((w * (sd**2 + (mu - c) ** 2)).sum()))
    taxonomy, scores = meta["calibration"]["taxonomy"], meta["calibration"]["scores"]
    below = lambda x, edges: sum(1 for e in edges if e < x)  # noqa: E731
    cell = below(c, taxonomy["centre_edges"]) * (len(taxonomy["spread_edges"]) + 1) + below(v, taxonomy["spread_edges"])
    own = scores["cells"].get(str(cell), {"pit": []})["pit"]
    pit = own if len(own) >= 50 else scores["pit"]  # a cell under 50 images falls back to all of them
    n = len(pit)
    level = 0.9
    m_rank = math.ceil(level * (n + 1))
    j = (n + 1 - m_rank) // 2
    k = j + m_rank
    mixture = mx.Mixture(torch.tensor(w, dtype=torch.float64), torch.tensor(mu, dtype=torch.float64),
                         torch.tensor(sd, dtype=torch.float64), meta["target_transform"])
    lo, hi = mx.quantile(mixture, [pit[j - 1], pit[k - 1]])[0].tolist()
    row = json.loads(mdn("predict", image, "-c", best, "-f", "json", "--levels", "0.9").stdout)[0]
    assert [lo, hi] == pytest.approx(row["interval_90"], rel=1e-4)


def test_the_server_agrees_with_both(exported):
    pytest.importorskip("httpx", reason="the server test needs httpx (the dev extra)")
    from fastapi.testclient import TestClient

    from mdn_cli.api import Model
    from mdn_cli.serve import create_app

    best, model_path, data = exported
    image = sorted((data / "images").glob("*.png"))[5]
    from_onnx = json.loads(mdn("predict", image, "-c", model_path, "-f", "json").stdout)
    from_torch = json.loads(mdn("predict", image, "-c", best, "-f", "json", "--backend", "torch").stdout)
    for backend in ("torch", "onnxruntime"):  # `mdn serve --backend`; auto picks onnxruntime on this CPU
        model = Model.load(best, "cpu", backend=backend)
        assert model.backend == backend and model.describe()["backend"] == backend
        with TestClient(create_app(model)) as client:
            served = client.post("/predict", files=[("file", (image.name, image.read_bytes(), "image/png"))]).json()
        served[0]["image"] = from_onnx[0]["image"]
        close(served, from_onnx)
        close(served, from_torch)
    assert Model.load(best, "cpu").backend == "onnxruntime"


def test_export_errors(exported, tmp_path):
    _, model_path, _ = exported
    result = mdn("export", tmp_path / "missing.pt", "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "not found" in result.output
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not a model")
    result = mdn("predict", model_path.parent / "toy" / "images" / "00000.png", "-c", fake)
    assert result.exit_code == 2 and "not a readable ONNX model" in result.output
