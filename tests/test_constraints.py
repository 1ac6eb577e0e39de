"""constraints-dev.txt (the pins scripts/setup_venv.sh installs the dev tools at) stays in step
with pyproject.toml: every dependency the project or one of its extras names is pinned, at a
version its range admits. A new dependency added without a pin would be resolved against
whatever PyPI published that day, which is how a clean CI install once backtracked for minutes
and then failed."""

import tomllib

from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def pins() -> dict[str, Version]:
    out = {}
    for number, line in enumerate((ROOT / "constraints-dev.txt").read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints-dev.txt line {number}: {line!r} is not name==version"
        assert canonicalize_name(name) not in out, f"constraints-dev.txt line {number}: {name} pinned twice"
        out[canonicalize_name(name)] = Version(version)
    return out


def test_every_dependency_is_pinned_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pinned = pins()
    problems = []
    for req in declared:
        name = canonicalize_name(req.name)
        if name == canonicalize_name(project["name"]):
            continue  # the project's own extras, listed inside another extra
        if name not in pinned:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{req.name}=={pinned[name]} is outside {req}")
    assert not problems, "constraints-dev.txt (run scripts/update_constraints.sh): " + "; ".join(problems)
