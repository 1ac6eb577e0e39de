from pathlib import Path

import pytest
import yaml

from mdn_cli.config import Config, load_config, to_yaml
from mdn_cli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "train: {epochs: 7}\n"), ["train.epochs=3", "model.components=5", "model.pretrained=false"])
    assert cfg.train.epochs == 3
    assert cfg.model.components == 5
    assert cfg.model.pretrained is False
    assert cfg.data.num_workers == "auto"
    assert load_config(None, ["model.pretrained=weights/r18.pth"]).model.pretrained == "weights/r18.pth"


def test_resolved_config_round_trips():
    cfg = load_config(None, ["train.lr=0.01", "data.target_transform=log"])
    assert Config.model_validate(yaml.safe_load(to_yaml(cfg))) == cfg


def test_all_problems_reported_at_once_with_lines_and_suggestions(tmp_path):
    path = write(
        tmp_path,
        "run:\n  seed: -1\n  device: gpu\nmodel:\n  componets: 3\ntrain:\n  lr_rate: 0.1\n  epochs: zero\n",
    )
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.batch_size=0"])
    msg = str(e.value)
    assert f"{path}: 6 problems" in msg
    assert f"{path}:2: run.seed" in msg
    assert f"{path}:3: run.device: must be one of auto, cpu, cuda, cuda:N, mps (got 'gpu')" in msg
    assert f"{path}:5: model.componets: unknown key, did you mean model.components?" in msg
    assert f"{path}:7: train.lr_rate: unknown key, did you mean train.lr?" in msg
    assert f"{path}:8: train.epochs" in msg
    assert "--set train.batch_size" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.target_transform=sqrt", "data.target_transform"),
        ("data.num_workers=-1", "data.num_workers"),
        ("train.precision=fp8", "train.precision"),
        ("model.components=0", "model.components"),
        ("run.name=a/b", "run.name"),
        ("bogus.key=1", "bogus"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_fractions_must_leave_training_data():
    with pytest.raises(ConfigError, match="calibration_fraction \\+ data.test_fraction"):
        load_config(None, ["data.val_fraction=0.6", "data.test_fraction=0.5"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "run:\n  name: toy\ntrain:\n  epochs: [3\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.epochs"])


def test_yaml_is_data_not_code(tmp_path):
    path = write(tmp_path, "run: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    assert not Path("pwned").exists()
