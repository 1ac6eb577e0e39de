"""The run configuration: its schema (schema.py), reading and checking a YAML file against it
(yaml_file.py), and choosing it from a labels file and the machine (planner.py)."""

from .schema import DEVICE_PATTERN, RUN_NAME_RULE, Config, DataConfig, ModelConfig, RunConfig, TrainConfig, target_label
from .yaml_file import MAX_CONFIG_BYTES, _ConfigLoader, load_config, to_yaml

__all__ = ["Config", "RunConfig", "DataConfig", "ModelConfig", "TrainConfig", "DEVICE_PATTERN", "RUN_NAME_RULE", "target_label",
           "load_config", "to_yaml", "MAX_CONFIG_BYTES", "_ConfigLoader"]
