"""The README stays true: every config key is documented, and its "Use" commands are exactly what
the quickstart runs after training (so the documented sequence works as written)."""

import re

from conftest import ROOT
from pydantic import BaseModel

from mdn_cli.config import Config

README = (ROOT / "README.md").read_text(encoding="utf-8")


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += keys(field.annotation, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_config_key_is_in_the_readme_config_reference():
    reference = README.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    missing = [k for k in keys(Config) if f"`{k}`" not in reference]
    assert not missing, f"config keys missing from the README's config reference: {missing}"


def test_the_use_commands_are_what_the_quickstart_runs_in_order():
    use = README.split("\n## Use", 1)[1]
    block = re.search(r"```bash\n(.*?)```", use, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("mdn ")]
    quickstart = (ROOT / "scripts" / "quickstart.sh").read_text(encoding="utf-8").split("# --- the README's \"Use\" commands ---", 1)[1]
    ran = [line.strip() for line in quickstart.splitlines() if line.startswith("mdn ")]
    assert commands and commands == ran
