"""CUDA paths: skipped without a GPU; `scripts/gpu_check.sh` runs them on a GPU machine."""

import pytest
import torch
from typer.testing import CliRunner

from mdn_cli.cli import app
from mdn_cli.model import MDNRegressor, ModelArgs
from mdn_cli.runtime import select_runtime

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


def mdn(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_auto_precision_and_layout_on_this_gpu():
    runtime = select_runtime("cuda", "auto")
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert runtime.amp_dtype == (torch.bfloat16 if native else torch.float16)
    assert runtime.channels_last and runtime.pin_memory
    assert runtime.images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_is_fp32_under_cuda_autocast(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no native bf16 on this GPU")
    torch.manual_seed(0)
    model = MDNRegressor(ModelArgs("resnet18", 3, 64, (0.5,) * 3, (0.25,) * 3)).cuda().eval()
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        features = model.features(images)
        outputs = model.head(features)
    with torch.no_grad():
        reference = model.head(features.float())
    for a, b in zip(reference, outputs):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_in_reduced_precision_then_resume_in_another(tiny_config, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no native bf16 on this GPU")
    common = ["--set", "run.device=cuda", "--set", "data.num_workers=2"]
    result = mdn("train", tiny_config, *common, "--set", f"train.precision={precision}", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert f"({precision}" in result.output
    other = "fp16" if precision == "bf16" else "fp32"
    result = mdn("train", tiny_config, *common, "--set", f"train.precision={other}", "--set", "train.epochs=2", "--resume")
    assert result.exit_code == 0, result.output


def test_compile_trains(tiny_config):
    result = mdn("train", tiny_config, "--set", "run.device=cuda", "--set", "train.compile=true", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output


def test_predict_and_evaluate_default_to_fp32_on_the_gpu(tiny_config, tmp_path, toy_data):
    import json

    assert mdn("train", tiny_config, "--set", "run.device=cuda", "--set", "train.epochs=1").exit_code == 0
    best = tmp_path / "runs/tiny/best.pt"
    images = sorted((toy_data / "images").glob("*.png"))[:8]
    cpu = json.loads(mdn("predict", *images, "-c", best, "--device", "cpu", "-f", "json").stdout)
    gpu = json.loads(mdn("predict", *images, "-c", best, "--device", "cuda", "-f", "json").stdout)
    for a, b in zip(cpu, gpu):
        assert b["mean"] == pytest.approx(a["mean"], rel=1e-4) and b["std"] == pytest.approx(a["std"], rel=1e-4)
    half = json.loads(mdn("predict", *images, "-c", best, "--device", "cuda", "--precision", "bf16" if
                          torch.cuda.is_bf16_supported(including_emulation=False) else "fp16", "-f", "json").stdout)
    assert len(half) == len(cpu)
    result = mdn("evaluate", "-c", best, "--device", "cuda", "-o", tmp_path / "e")
    assert result.exit_code == 0, result.output
