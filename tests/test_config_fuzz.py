"""Property tests: whatever is in the config file or a --set item, `load_config` returns a Config or
raises ConfigError whose lines are printable and short; never another exception or a hang.

Reproducible by default (derandomized, no example database). For a longer, random local run:
    MDN_FUZZ_PROFILE=long OMP_NUM_THREADS=1 python -m pytest tests/test_config_fuzz.py
"""

import datetime
import os

import yaml
from conftest import within
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdn_cli.config import Config, load_config
from mdn_cli.errors import ConfigError

# A hang shows up as a TimeoutError from `within` (a hang guard that only a true hang reaches), not
# as a deadline: a deadline only measures an example after it returns, and on a busy shared CI core
# it would make the run flaky.
PROFILES = {
    "ci": settings(max_examples=400, derandomize=True, database=None, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    "long": settings(max_examples=5_000, derandomize=False, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
}
FUZZ = PROFILES[os.environ.get("MDN_FUZZ_PROFILE", "ci")]

SECTIONS = {name: list(field.annotation.model_fields) for name, field in Config.model_fields.items()}
NAMES = [*SECTIONS, *(k for keys in SECTIONS.values() for k in keys)]


def loads_or_refuses(path, overrides=()):
    """The property: a Config, or a ConfigError made of printable, short lines."""
    with within():
        try:
            return load_config(path, overrides)
        except ConfigError as e:
            for line in str(e).splitlines():
                assert line.isprintable() and len(line) < 600, line
            return None


def write(tmp_path_factory, content: bytes):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(content)
    return path


# --- (a) arbitrary bytes -------------------------------------------------------------------------

REAL = (b"run:\n  name: toy\n  seed: 0\ntrain:\n  epochs: 2\n  lr: 1.0e-3\nmodel:\n  components: 3\n")


@FUZZ
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=200).map(lambda b: REAL + b),
                 st.tuples(st.integers(0, len(REAL)), st.binary(min_size=1, max_size=8)).map(
                     lambda t: REAL[: t[0]] + t[1] + REAL[t[0] + len(t[1]):])))
def test_arbitrary_bytes(tmp_path_factory, content):
    loads_or_refuses(write(tmp_path_factory, content))


# --- (b) YAML-ish text from a grammar ------------------------------------------------------------

SCALARS = ["1", "-1", "0", "3.0e-4", "1e999", ".inf", "-.nan", "0x1F", "0o17", "1:30", "1_000", "~", "null", "true",
           "no", "on", "'q'", '"a\\x01\\n"', '"\\ud800"', "2024-01-01", "2024-13-45", "2001-12-14t21:59:43.10-05:00",
           "toy", "..", "/etc", "auto", "cpu", "cuda:1", "log", "''", "|\n      text", ">-\n      folded", "9" * 120,
           "0x" + "f" * 90, "[]", "{}", "[1, 2]", "{a: 1, a: 2}", "[[[[1]]]]", "# c", "---", "%"]
REFERENCES = ["*a", "*b", "*c", "&b [*a, *a]", "&c {x: *a, y: *b}", "{<<: *a, x: 1}", "[*c, *c, *c]"]
TAGS = ["", "", "", "", "", "", "!!str ", "!!int ", "!!binary ", "!!set ", "!!python/object:os.system ", "!x ",
        "!!timestamp ", "!<tag:yaml.org,2002:str> ", "!!float ", "!!bool ", "!!map ", "!!seq "]
ANCHORS = ["", "", "", "", "", "", "&a ", "&b ", "&c ", "&d "]
KEYS = [*NAMES, "lr_rate", "1", "~", "true", "''", "? [a]", "<<", "&k run", "*k", '"a\\nb"', "-", "a b"]
PUNCT = ["[", "]", "{", "}", ",", ":", "- ", "? ", "---", "...", "#", "%YAML 1.1", "%TAG !e! tag:e.com:", "\t", "\\", '"', "'"]


@st.composite
def yamlish(draw):
    """Mostly well-formed sections of `key: value` lines, dressed with tags, anchors, aliases and
    flow collections, with the odd line of loose tokens or wrong indentation thrown in."""
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        section = draw(st.sampled_from([*SECTIONS, *SECTIONS, *KEYS]))
        lines.append(f"{section}: {draw(st.sampled_from(ANCHORS))}{draw(st.sampled_from(TAGS))}".rstrip())
        for _ in range(draw(st.integers(0, 6))):
            indent = " " * draw(st.sampled_from([2] * 12 + [0, 1, 3, 4]))
            key = draw(st.sampled_from(SECTIONS.get(section, NAMES) + KEYS[-12:]))
            if draw(st.integers(0, 5)) == 0:
                value = draw(st.sampled_from(REFERENCES))
            else:
                value = draw(st.sampled_from(ANCHORS)) + draw(st.sampled_from(TAGS)) + draw(st.sampled_from(SCALARS))
            lines.append(f"{indent}{draw(st.sampled_from([''] * 12 + ['- ']))}{key}: {value}")
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        junk = "".join(draw(st.lists(st.sampled_from(PUNCT + SCALARS + REFERENCES + KEYS), max_size=8)))
        lines.insert(draw(st.integers(0, len(lines))), " " * draw(st.integers(0, 4)) + junk)
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n"]))


@FUZZ
@given(yamlish())
def test_yamlish_text(tmp_path_factory, text):
    loads_or_refuses(write(tmp_path_factory, text.encode("utf-8", "surrogatepass")))


# --- (c) nested Python data dumped as YAML -------------------------------------------------------

keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=12), st.integers(), st.booleans(), st.none(),
                 st.floats(allow_nan=False))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**80), st.floats(),
                    st.text(max_size=20), st.sampled_from(["toy", "..", "auto", "log", "scale", "cuda:0", "a/b"]),
                    st.binary(max_size=8), st.dates(), st.datetimes(timezones=st.just(datetime.timezone.utc)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=25)
sections = st.fixed_dictionaries({}, optional={
    name: st.one_of(st.dictionaries(st.sampled_from(SECTIONS[name]) | keys, values, max_size=6), values)
    for name in SECTIONS
})
# Mostly a mapping of sections, sometimes any mapping or any value at all.
documents = st.integers(0, 5).flatmap(
    lambda i: sections if i < 4 else st.dictionaries(keys, values, max_size=5) if i == 4 else values)


@FUZZ
@given(documents)
def test_dumped_structures(tmp_path_factory, data):
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    loads_or_refuses(write(tmp_path_factory, text.encode("utf-8", "surrogatepass")))


# --- (d) --set items -----------------------------------------------------------------------------

dotted = st.lists(st.sampled_from([*NAMES, "x", "lr_rate"]), min_size=1, max_size=4).map(".".join)
assignments = st.tuples(dotted, st.sampled_from(["="] * 5 + [""]), st.one_of(
    st.text(max_size=30), st.sampled_from(SCALARS), yamlish())).map("".join)
items = st.one_of(st.text(max_size=40), assignments, assignments, assignments)


@FUZZ
@given(st.lists(items, max_size=3))
def test_set_items(overrides):
    loads_or_refuses(None, overrides)
