"""Hostile configs: duplicate keys, alias bombs, deep nesting, huge or non-UTF-8 files, tags, keys
that are not names, run names that escape the run folder, malformed --set items. Each must end in
one ConfigError that names the file and line (or the --set item) and the key, after bounded work:
never a traceback, a hang or unbounded memory."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import within
from typer.testing import CliRunner

from mdn_cli.cli import app
from mdn_cli.config import MAX_CONFIG_BYTES, Config, _ConfigLoader, load_config
from mdn_cli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def refused(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The ConfigError message load_config gives (`within`: a hang fails the test)."""
    with within(), pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def billion_laughs(levels: int = 9, flow: bool = False) -> str:
    """Ten 'lol's, then each level a list of ten aliases of the one before: 10**(levels + 1) values."""
    rows = ["lol0: &l0 [" + ", ".join(['"lol"'] * 10) + "]"]
    rows += [f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return ("{" + ", ".join(rows) + "}\n") if flow else "\n".join(rows) + "\n"


# --- duplicate keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("train:\n  lr: 0.1\nmodel:\n  components: 2\ntrain:\n  epochs: 2\n", "train", 5, 1),
        ("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "train.lr", 4, 2),
        ("train:\n  lr: 0.1\n  lr: 0.2\n  lr: 0.3\n", "train.lr", 4, 2),
        ("train: {lr: 0.1, lr: 0.2}\n", "train.lr", 1, 1),
        ("run:\n  name: toy\ntrain: {epochs: 2,\n  epochs: 3}\n", "train.epochs", 4, 3),
        ("train:\n  lr: 0.1\n  'lr': 0.2\n", "train.lr", 3, 2),
        ("extra: 1\nextra: 2\n", "extra", 2, 1),
        ("train:\n  lr: {a: 1, a: 2}\n", "train.lr.a", 2, 2),
        ("{run: {seed: 1}, run: {seed: 2}}\n", "run", 1, 1),
    ],
    ids=["sections", "in-section", "three-times", "flow", "flow-over-lines", "quoted", "unknown", "deeper", "top-flow"],
)
def test_duplicate_keys_name_the_key_and_both_lines(tmp_path, text, key, line, first):
    path = write(tmp_path, text)
    assert f"{path}:{line}: {key}: duplicate key, also on line {first}" in refused(path)


def test_three_duplicates_are_each_reported_and_other_problems_still_listed(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n  lr_rate: 3\n  lr: 0.3\n")
    msg = refused(path, ["train.epochs=0"])
    assert f"{path}: 4 problems" in msg
    assert f"{path}:3: train.lr: duplicate key, also on line 2" in msg
    assert f"{path}:5: train.lr: duplicate key, also on line 2" in msg
    assert f"{path}:4: train.lr_rate: unknown key, did you mean train.lr?" in msg
    assert "--set train.epochs" in msg


# --- alias bombs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line",
    [
        (billion_laughs(9), 4),
        (billion_laughs(9, flow=True), 1),
        ("a0: &a0 {" + ", ".join(f"k{i}: lol" for i in range(10)) + "}\n"
         + "".join(f"a{i}: &a{i} {{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(10)) + "}\n" for i in range(1, 9)), 4),
        ("a: &a [" + ", ".join(["x"] * 2000) + "]\nb: [" + ", ".join(["*a"] * 2000) + "]\n", 2),
        ("train:\n  lr: &x [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  epochs: &y [" + ", ".join(["*x"] * 10) + "]\n"
         "  batch_size: &z [" + ", ".join(["*y"] * 10) + "]\n  grad_clip: [" + ", ".join(["*z"] * 10) + "]\n", 5),
    ],
    ids=["billion-laughs", "billion-laughs-flow", "mapping-bomb", "quadratic", "inside-a-section"],
)
def test_alias_bombs_are_refused_quickly_without_expanding(tmp_path, monkeypatch, text, line):
    # Work, not wall time: count the nodes the loader composes. Each anchored node and each alias is
    # composed once (an alias adds the size of the node it names without walking it), so the
    # refusal comes after about as many calls as the text has values (~2,000 here, at most); an
    # expansion would take one per value of the expanded document: 10**10 for the billion laughs.
    calls = 0
    compose_node = _ConfigLoader.compose_node

    def counted(self, parent, index):
        nonlocal calls
        calls += 1
        return compose_node(self, parent, index)

    monkeypatch.setattr(_ConfigLoader, "compose_node", counted)
    path = write(tmp_path, text)
    msg = refused(path)
    assert 0 < calls < 5_000, calls
    assert msg.startswith(f"{path}:{line}: the YAML expands (through aliases) to more than 10000 values")
    assert "\n" not in msg


@pytest.mark.parametrize(
    "text, line, alias", [("train: &a {lr: *a}\n", 1, "a"), ("train:\n  lr: &l [1, *l]\n", 2, "l"), ("a: &a [[[*a]]]\n", 1, "a")]
)
def test_an_alias_inside_its_own_value_is_refused(tmp_path, text, line, alias):
    path = write(tmp_path, text)
    assert refused(path) == f"{path}:{line}: alias *{alias} is used inside the value it names; remove the loop"


@pytest.mark.parametrize(
    "text, check",
    [
        ("run: {seed: &s 3}\ntrain: {epochs: *s, early_stopping_patience: *s}\n", lambda c: c.train.epochs == 3),
        ("model: {dropout: &d 0.25}\ntrain: {weight_decay: *d}\n", lambda c: c.train.weight_decay == 0.25),
        ("train:\n  <<: {lr: 0.01, epochs: 2}\n  epochs: 4\n", lambda c: (c.train.lr, c.train.epochs) == (0.01, 4)),
        ("run: &r {seed: 1}\n", lambda c: c.run.seed == 1),
        ("data:\n  root: &root data/toy\n  cache_dir: *root\n", lambda c: c.data.cache_dir == "data/toy"),
    ],
    ids=["scalar-twice", "across-sections", "merge-key", "unused-anchor", "path"],
)
def test_ordinary_aliases_still_load(tmp_path, text, check):
    with within():
        assert check(load_config(write(tmp_path, text)))


def test_many_aliases_below_the_limit_are_not_refused_for_size(tmp_path):
    # 1000 values aliased 8 times: 9,000 values, big for a config but not a bomb.
    path = write(tmp_path, "a: &a [" + ", ".join(["1"] * 1000) + "]\nb: [" + ", ".join(["*a"] * 8) + "]\n")
    msg = refused(path)
    assert "values" not in msg and f"{path}:1: a: unknown key" in msg


# --- deep nesting and huge files -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line",
    [
        ("[" * 10_000, 1),
        ("{a: " * 5_000, 1),
        ("".join(" " * i + "a:\n" for i in range(60)), 50),
        ("- " * 1_000 + "1\n", 1),
        ("train:\n  lr: " + "[" * 100 + "]" * 100 + "\n", 2),
        ("run:\n" + "".join("  " * i + "- \n" for i in range(1, 200)), 51),
    ],
    ids=["flow-lists", "flow-mappings", "block-mappings", "block-lists", "in-a-value", "indented-lists"],
)
def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path, text, line):
    path = write(tmp_path, text)
    assert refused(path) == f"{path}:{line}: nested more than 50 levels deep (a config is 3); check the brackets and indentation"


def test_nesting_below_the_limit_is_fine(tmp_path):
    path = write(tmp_path, "train:\n  lr: " + "[" * 45 + "]" * 45 + "\n")
    assert f"{path}:2: train.lr: Input should be a valid number" in refused(path)


def test_huge_files_are_refused_by_size_before_parsing(tmp_path):
    sparse = tmp_path / "sparse.yaml"  # 50 MB that costs no disk: a hole of NUL bytes
    with sparse.open("wb") as f:
        f.truncate(50 * 2**20)
    assert refused(sparse) == f"{sparse}: larger than 1 MB; a config is a few KB of YAML, is this the right file?"
    log = write(tmp_path, ("train:\n  lr: 0.1\n" + "# " + "x" * 78 + "\n") * (MAX_CONFIG_BYTES // 80))
    assert refused(log).startswith(f"{log}: larger than 1 MB")


@pytest.mark.skipif(sys.platform != "linux", reason="needs /dev/zero and RLIMIT_AS")
def test_an_endless_file_is_read_only_up_to_the_limit():
    # In a child capped at 2 GB of address space: a loader that read /dev/zero to the end would die
    # of MemoryError there instead of taking this machine's memory. One that read it and threw the
    # bytes away would never end: the child is also capped at 600 s of CPU time, a measure of work,
    # not wall time (a busy machine does not use it up; the child needs about 1 s).
    code = "from mdn_cli.config import load_config\ntry:\n    load_config('/dev/zero')\nexcept Exception as e:\n    print(type(e).__name__, e)"

    def cap_memory_and_work():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
        resource.setrlimit(resource.RLIMIT_CPU, (600, 600))

    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            preexec_fn=cap_memory_and_work)
    assert result.stdout.startswith("ConfigError /dev/zero: larger than 1 MB"), result.stdout + result.stderr


def test_a_file_just_under_the_size_limit_is_read(tmp_path):
    path = write(tmp_path, "run: {name: big}\n#" + "x" * (MAX_CONFIG_BYTES - 19) + "\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES
    with within():
        assert load_config(path).run.name == "big"


@pytest.mark.parametrize(
    "text, line",
    [("".join(f"k{i}: {i}\n" for i in range(20_000)), 5_000), ("[" + "1, " * 20_000 + "]\n", 1)],
    ids=["many-keys", "long-list"],
)
def test_too_many_values_are_refused_while_parsing(tmp_path, text, line):
    path = write(tmp_path, text)
    assert refused(path).startswith(f"{path}:{line}: the YAML holds more than 10000 values")


# --- structure: keys, sections, tags, documents ----------------------------------------------------


@pytest.mark.parametrize(
    "text, line, key, what",
    [
        ("1: x\n", 1, "(top level)", "a key must be a name such as epochs or lr, found the number '1'"),
        ("train:\n  1.5: 2\n", 2, "train", "found the number '1.5'"),
        ("? [a, b]\n: 1\n", 1, "(top level)", "found a list"),
        ("train:\n  ? {a: 1}\n  : 2\n", 2, "train", "found a mapping"),
        ("train:\n  ~: 2\n", 2, "train", "found nothing (null)"),
        ("train:\n  true: 1\n", 2, "train", "found the true/false value 'true'"),
        ("train:\n  '': 1\n", 2, "train", "found the text ''"),
        ("run:\n  2024-01-01: 1\n", 2, "run", "found the date '2024-01-01'"),
        ("train:\nmodel:\n  components: 2\n", 1, "train", "empty section; put its keys under it"),
        ("run:\n  - name\n  - seed\n", 1, "run", "expected a section of `key: value` lines, found a list"),
        ("run: toy\n", 1, "run", "found the text 'toy'"),
        ("data: 3\n", 1, "data", "found the number '3'"),
        ("run:\n  name: 2024-13-45\n", 2, "run.name", "cannot read '2024-13-45' as a timestamp"),
        ("run:\n  seed: " + "9" * 5000 + "\n", 2, "run.seed", "a number 5000 characters long"),
        ("run:\n  seed: !!int abc\n", 2, "run.seed", "'abc' is not a valid int; fix the value or remove the tag"),
        ("run:\n  name: !!timestamp 1\n", 2, "run.name", "'1' is not a valid timestamp"),
        ("model:\n  pretrained: !!bool maybe\n", 2, "model.pretrained", "'maybe' is not a valid bool"),
        ("train:\n  lr: =\n", 2, "train.lr", "cannot read '='; quote it to keep it as text"),
        ("a: &a {lr: !!binary aGk=}\ntrain: *a\n", 1, "a.lr", "the tag !!binary is not allowed"),
    ],
)
def test_keys_and_sections_of_the_wrong_kind_name_key_and_line(tmp_path, text, line, key, what):
    path = write(tmp_path, text)
    msg = refused(path)
    assert f"{path}:{line}: {key}: " in msg and what in msg


def test_a_merge_of_something_other_than_a_mapping_names_the_line(tmp_path):
    path = write(tmp_path, "train:\n  <<: [1, 2]\n")
    assert refused(path).startswith(f"{path}:2: invalid YAML: while constructing a mapping, expected a mapping for merging")


@pytest.mark.parametrize(
    "text, line, key, tag",
    [
        ("run: !!python/object/apply:os.system ['touch pwned']\n", 1, "run", "!!python/object/apply:os.system"),
        ("run:\n  name: !!python/name:os.system ''\n", 2, "run.name", "!!python/name:os.system"),
        ("run:\n  name: !!binary aGVsbG8=\n", 2, "run.name", "!!binary"),
        ("run:\n  name: !custom toy\n", 2, "run.name", "!custom"),
        ("model: !!set {a, b}\n", 1, "model", "!!set"),
        ("train: !!omap [{lr: 0.1}]\n", 1, "train", "!!omap"),
        ("%TAG !e! tag:example.com,2000:\n---\nrun: {name: !e!x toy}\n", 3, "run.name", "tag:example.com,2000:x"),
        ("!!python/object:collections.OrderedDict {}\n", 1, "(top level)", "!!python/object:collections.OrderedDict"),
    ],
)
def test_yaml_tags_are_refused_by_key_and_line(tmp_path, text, line, key, tag):
    path = write(tmp_path, text)
    msg = refused(path)
    assert f"{path}:{line}: {key}: invalid YAML for a config: the tag {tag} is not allowed; remove it" in msg
    assert not Path("pwned").exists()


def test_explicit_plain_tags_are_fine(tmp_path):
    cfg = load_config(write(tmp_path, "run:\n  name: !!str 123\n  seed: !!int '7'\n"))
    assert (cfg.run.name, cfg.run.seed) == ("123", 7)


@pytest.mark.parametrize(
    "text, line", [("run: {name: a}\n---\nrun: {name: b}\n", 2), ("---\n...\n---\n", 3), ("a: 1\n--- b\n", 2)]
)
def test_more_than_one_document_is_refused(tmp_path, text, line):
    path = write(tmp_path, text)
    assert refused(path).startswith(f"{path}:{line}: invalid YAML: expected a single document in the stream")


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"run:\n  name: caf\xe9\n", ":2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"),
        ("run:\n  name: toy\n".encode("utf-16"), ": is UTF-16 or UTF-32 text; save it as UTF-8"),
        ("run:\n  name: toy\n".encode("utf-16-be"), ":1: contains a NUL byte"),
        ("run:\n  name: toy\n".encode("utf-32"), ": is UTF-16 or UTF-32 text"),
        (b"run:\n  name: t\x00y\n", ":2: contains a NUL byte; a config is UTF-8 text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ":3: contains a NUL byte"),
        (b"\xff\xd8\xff\xe0 JFIF", ":1: not valid UTF-8 (byte 0xff)"),
        (b"run:\n  name: a\x07b\n", ":2: invalid YAML: the control character U+0007 is not allowed"),
    ],
    ids=["latin-1", "utf-16", "utf-16-no-bom", "utf-32", "nul", "png", "jpeg", "control-char"],
)
def test_files_that_are_not_utf8_text_name_the_file(tmp_path, content, expected):
    path = write(tmp_path, content)
    assert refused(path).startswith(f"{path}{expected}")


def test_utf8_byte_order_mark_is_fine(tmp_path):
    assert load_config(write(tmp_path, b"\xef\xbb\xbfrun: {name: toy}\n")).run.name == "toy"


def test_a_folder_is_not_a_config(tmp_path):
    assert refused(tmp_path) == f"{tmp_path}: is a folder; expected a YAML config file"


def test_problem_lines_stay_one_line_and_short(tmp_path):
    path = write(tmp_path, 'run:\n  name: "' + "x" * 900_000 + '"\ntrain:\n  "a\\nb": 1\n')
    msg = refused(path)
    lines = msg.splitlines()
    assert len(lines) == 3 and all(len(line) < 400 and line.isprintable() for line in lines)
    assert f"{path}:4: train.a\\nb: unknown key" in msg


def test_a_file_with_many_problems_lists_the_first_fifty(tmp_path):
    path = write(tmp_path, "".join(f"k{i}: 1\n" for i in range(200)))
    lines = refused(path).splitlines()
    assert lines[0] == f"{path}: 200 problems in the config"
    assert lines[1].startswith(f"  {path}:1: k0: unknown key") and lines[-1] == "  ... and 150 more"


# --- run.name ------------------------------------------------------------------------------------

BAD_NAMES = ["..", ".", ".hidden", "-rf", "a/b", "../up", "a\\b", "/abs", "a b", "", "a" * 101,
             "CON", "nul.txt", "com1", "run.", "été", "a\nb", "a\tb", "~", "*"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_run_names_in_the_file(tmp_path, name):
    path = write(tmp_path, yaml.safe_dump({"run": {"name": name}}))
    msg = refused(path)
    assert f"{path}:2: run.name: must be" in msg and "folder name" in msg


@pytest.mark.parametrize("name", [n for n in BAD_NAMES if n], ids=repr)
def test_bad_run_names_from_set(name):
    msg = refused(None, [f"run.name={name}"])  # '~' is YAML for null: not a string at all
    assert "--set run.name: must be" in msg or "--set run.name: Input should be a valid string" in msg


@pytest.mark.parametrize("name", ["toy", "toy-resnet18_2", "v1.2", "_x", "a" * 100, "2024-run", "CONSOLE", "a..b"])
def test_good_run_names(name):
    assert load_config(None, [f"run.name={name}"]).run.name == name


# --- --set ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item, expected",
    [
        ("train.lr.x=1", "train.lr is a value, not a section; set it with --set train.lr=VALUE"),
        ("run.name.x=1", "run.name is a value, not a section"),
        ("run=3", "run is a section; set one of its keys, for example --set run.name=..."),
        ("train=", "train is a section"),
        ("train={epochs: 3}", "train is a section"),
        ("=3", "expected dotted.key=value"),
        (".x=1", "expected dotted.key=value"),
        ("a..b=1", "expected dotted.key=value"),
        ("train.=1", "expected dotted.key=value"),
        ("train.lr", "expected dotted.key=value"),
        ("train.lr=" + "[" * 1000, "nested more than 50 levels deep"),
        ("train.lr=" + billion_laughs(9, flow=True).strip(), "expands (through aliases) to more than 10000 values"),
        ("train.lr=&a [*a]", "alias *a is used inside the value it names"),
        ("run.name=a\x00b", "the value contains a NUL character; remove it"),
        ("run.name=!!binary aGVsbG8=", "the tag !!binary is not allowed"),
        ("train.lr=!!python/object/apply:os.system [echo]", "the tag !!python/object/apply:os.system is not allowed"),
        ("train.lr={a: 1, a: 2}", "train.lr.a: duplicate key"),
        ("run.name=2024-13-45", "cannot read '2024-13-45' as a timestamp"),
        ("train.lr=" + "1" * (MAX_CONFIG_BYTES + 1), "the value is larger than 1 MB"),
    ],
)
def test_bad_set_items_name_the_item(item, expected):
    msg = refused(None, [item])
    assert msg.startswith("--set '" + item[:20].replace("\x00", "\\x00")) and expected in msg
    assert "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize("value", ["#", "# a comment", " ", "---", "--- # c"])
def test_set_values_that_are_empty_yaml_are_null(value):
    # Found by the long fuzz profile: `--set key=#` once crashed on the empty document.
    assert load_config(None, [f"train.grad_clip={value}"]).train.grad_clip is None


def test_set_of_an_unknown_key_still_suggests():
    assert "train.lr_rate: unknown key, did you mean train.lr?" in refused(None, ["train.lr_rate=1"])
    assert "bogus: unknown key" in refused(None, ["bogus.key=1"])


# --- problems in file order ----------------------------------------------------------------------


def test_problems_are_listed_in_file_order_then_set_order(tmp_path):
    path = write(
        tmp_path,
        "train:\n  epochs: 0\n  epochs: 1\nmodel:\n  componets: 3\nrun:\n  seed: -1\n  name: ..\ndata: []\n",
    )
    lines = refused(path, ["train.batch_size=0", "model.dropout=2", "run.device=gpu"]).splitlines()
    assert lines[0] == f"{path}: 8 problems in the config"
    where = [re.match(r"  (.*?:\d+: [\w.]+|--set [\w.]+): ", line).group(1) for line in lines[1:]]
    assert where == [
        f"{path}:3: train.epochs",
        f"{path}:5: model.componets",
        f"{path}:7: run.seed",
        f"{path}:8: run.name",
        f"{path}:9: data",
        "--set train.batch_size",
        "--set model.dropout",
        "--set run.device",
    ]


# --- the CLI: one red message, exit code 2 ---------------------------------------------------------


@pytest.mark.parametrize(
    "content", [billion_laughs(9), "[" * 10_000, "train:\n  lr: 1\n  lr: 2\n", b"\xff\xfe\x00\x00", "run: !!binary aGk=\n"]
)
def test_cli_prints_one_error_and_no_traceback(tmp_path, content):
    path = write(tmp_path, content)
    with within():
        result = CliRunner().invoke(app, ["train", str(path), "--set", "run.name=ok"])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_the_default_run_name_follows_the_rule():
    assert Config().run.name == "run" and load_config(None).run.name == "run"
