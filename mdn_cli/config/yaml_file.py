"""Reading a YAML config: the file, then `--set dotted.key=value` overrides -> a validated `Config`.

Every problem in a file is reported at once, each with its dotted key, the file and line where it
stands, and a suggestion for misspelled keys; a hostile or broken file ends in a ConfigError
within a fraction of a second, never a hang, a MemoryError or a RecursionError.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .schema import Config

# A real config is a few KB: about 100 values, 3 levels deep. The limits below sit far above that
# and far below what makes the pure-Python YAML parser slow or memory-hungry, so a broken or hostile
# file (a "billion laughs" alias bomb, 10,000 nested brackets, a 50 MB log passed by mistake) ends
# in a ConfigError within a fraction of a second instead of a hang, a MemoryError or a RecursionError.

MAX_CONFIG_BYTES = 1_000_000
"""Largest config file, or `--set` value, that is read at all (the shipped configs are ~1 KB)."""
MAX_VALUES = 10_000
"""Most keys, values, lists and sections a document may hold once aliases are expanded."""
MAX_DEPTH = 50
"""Deepest nesting of sections and lists (a config is 3 deep)."""
MAX_PROBLEMS_SHOWN = 50
"""Problems listed in one error; the rest are counted (a wrong file can have thousands)."""

_TAG = "tag:yaml.org,2002:"
# The tags plain YAML resolves to on its own (and `!!str 1`-style spellings of them). Anything else
# (!!binary, !!set, !!python/..., a custom !tag) is not config data, even where SafeLoader would
# build it: !!binary bytes would pass as a str in pydantic's lax mode.
_PLAIN_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp", "seq", "map")}
_MERGE_TAG = _TAG + "merge"


class _Refused(yaml.YAMLError):
    """Valid YAML that cannot be a config (too big or too deep); raised while composing."""

    def __init__(self, message: str, mark: yaml.Mark) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that bounds the document while composing it, before anything is built.

    Each node's size after alias expansion is summed as it is composed, an alias counting the size
    of the node it names; so an alias bomb is refused after ~10,000 counted values, never expanded.
    Depth is counted on the way down, so 10,000 nested brackets stop at level 51 instead of
    overflowing the composer's recursion.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._values = 0
        self._sizes: dict[int, int] = {}  # id(node) -> its size after alias expansion
        self._aliases = 0

    def _count(self, n: int, mark: yaml.Mark) -> None:
        self._values += n
        if self._values > MAX_VALUES:
            what = "the YAML expands (through aliases) to" if self._aliases else "the YAML holds"
            fix = "write the values out instead of nesting aliases" if self._aliases else "is this the right file?"
            raise _Refused(f"{what} more than {MAX_VALUES} values (a config has about 100); {fix}", mark)

    def compose_node(self, parent: yaml.Node | None, index: yaml.Node | None) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:  # the anchored node is still being composed: it contains itself
                raise _Refused(f"alias *{event.anchor} is used inside the value it names; remove the loop", event.start_mark)
            self._aliases += 1
            self._count(size, event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep (a config is 3); check the brackets and indentation", event.start_mark)
        before = self._values
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = self._values - before
        return node


Problem = tuple[tuple[int, int], str]
"""A problem line and where it comes from, for sorting: (0, line) in the file, (1, i) the i-th
--set, (2, 0) nowhere in particular (listed last)."""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `dotted.key=value` overrides and validate everything at once."""
    raw: dict[str, Any] = {}
    where: dict[str, tuple[int, int]] = {}
    problems: list[Problem] = []
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw, lines, problems = _parse_yaml(_read_text(path), source)
        where = {key: (0, line) for key, line in lines.items()}
    for i, item in enumerate(overrides):
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        where[key] = (1, i)
    return _validate(raw, source, where, problems)


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # bounded: also safe on /dev/zero or a 50 MB log
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a YAML config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES / 1e6:g} MB; a config is a few KB of YAML, is this the right file?"
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        raise ConfigError(f"{path}: is UTF-16 or UTF-32 text; save it as UTF-8")
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise ConfigError(
            f"{path}:{line}: contains a NUL byte; a config is UTF-8 text (is this a binary file, or UTF-16?)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[str, int], list[Problem]]:
    """The file's mapping of sections; the 1-based line of every dotted key in it; and the problems
    found in its structure. The parts with problems are left out of the mapping, so that validation
    still checks the rest and every problem is reported at once."""
    try:
        loader = _ConfigLoader(text)  # the reader refuses control characters right here
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        raise _yaml_error(e, text, source) from None
    try:
        if node is None:
            return {}, {}, []
        if not isinstance(node, yaml.MappingNode):
            sections = ", ".join(Config.model_fields)
            raise ConfigError(
                f"{source}: expected a mapping of sections ({sections}) at the top level, found {_kind(node)}"
            )
        lines: dict[str, int] = {}
        found: list[tuple[int, str]] = []
        usable = _check_tree(loader, node, "", lines, found, set())
        problems = [((0, line), f"{source}:{line}: {msg}") for line, msg in found]
        if not usable:  # a tag on the whole document
            raise ConfigError(_report(source, problems))
        try:
            return loader.construct_document(node), lines, problems
        except (yaml.YAMLError, ValueError, OverflowError) as e:  # PyYAML signals a bad scalar with ValueError
            raise _yaml_error(e, text, source) from None
    finally:
        loader.dispose()


def _yaml_error(e: Exception, text: str, source: str) -> ConfigError:
    line, problem = _yaml_problem(e, text)
    return ConfigError(f"{source}:{line}: {problem}" if line else f"{source}: {problem}")


def _yaml_problem(e: Exception, text: str) -> tuple[int | None, str]:
    """(1-based line or None, one-line description) of a YAML error."""
    if isinstance(e, _Refused):
        return e.mark.line + 1, e.message
    if isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position) + 1
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        return line, f"invalid YAML: the control character {char} is not allowed in YAML text; delete it"
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    if context:
        problem = f"{context}, {problem}"  # e.g. 'expected a single document in the stream, but found another document'
    return (mark.line + 1 if mark is not None else None), f"invalid YAML: {problem}"


def _check_tree(
    loader: _ConfigLoader,
    node: yaml.Node,
    key: str,
    lines: dict[str, int],
    problems: list[tuple[int, str]],
    visited: set[tuple[int, str]],
    merged: bool = False,
) -> bool:
    """Walk the composed document once, before anything is built: record each dotted key's line and
    collect what validation cannot see (duplicate keys, which YAML silently resolves to the last)
    or would report confusingly (tags, keys that are not names, sections that are not mappings).

    Returns whether `node` can be built. Mapping pairs that cannot are dropped from the node.
    """
    # A node reached again through an alias, under the same key, was reported the first time. Under
    # another key it is checked again: whether it may be a section depends on where it is used.
    report = (id(node), key) not in visited
    visited.add((id(node), key))
    line = node.start_mark.line + 1
    shown = key or "(top level)"
    if node.tag not in _PLAIN_TAGS:
        if report and node.tag == _TAG + "value":  # a bare `=`, which YAML 1.1 reserves
            problems.append((line, f"{shown}: cannot read {_show(node.value)}; quote it to keep it as text"))
        elif report:
            tag = "!!" + node.tag[len(_TAG) :] if node.tag.startswith(_TAG) else node.tag
            problems.append((line, f"{shown}: invalid YAML for a config: the tag {tag} is not allowed; remove it"))
        return False
    if isinstance(node, yaml.ScalarNode):
        problem = _scalar_problem(loader, node)
        if problem and report:
            problems.append((line, f"{shown}: {problem}"))
        return problem is None
    if isinstance(node, yaml.SequenceNode):
        return all([_check_tree(loader, item, key, lines, problems, visited, merged) for item in node.value])
    kept = []
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        key_line = key_node.start_mark.line + 1
        if key_node.tag == _MERGE_TAG:
            # `<<: *defaults` pulls another mapping's keys in; keys written here win over them.
            if _check_tree(loader, value_node, key, lines, problems, visited, merged=True):
                kept.append((key_node, value_node))
            continue
        if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _TAG + "str" and key_node.value):
            if report:
                problems.append(
                    (key_line, f"{shown}: a key must be a name such as epochs or lr, found {_kind(key_node)} "
                     "(quote it if that is the name you mean)")
                )
            continue
        dotted = f"{key}.{key_node.value}" if key else key_node.value
        if key_node.value in first_line:
            if report:
                problems.append(
                    (key_line, f"{dotted}: duplicate key, also on line {first_line[key_node.value]}; "
                     "keep one (YAML would silently use the last)")
                )
        else:
            first_line[key_node.value] = key_line
        if merged:
            lines.setdefault(dotted, key_line)
        else:
            lines[dotted] = key_line
        if value_node.tag in _PLAIN_TAGS and _section(dotted) is not None and not isinstance(value_node, yaml.MappingNode):
            if report:
                problems.append((key_line, f"{dotted}: {_not_a_section(value_node)}"))
            continue
        if _check_tree(loader, value_node, dotted, lines, problems, visited, merged):
            kept.append((key_node, value_node))
    node.value = kept
    return True


def _scalar_problem(loader: _ConfigLoader, node: yaml.ScalarNode) -> str | None:
    """Why PyYAML cannot build this scalar (it raises ValueError, e.g. for the date 2024-13-45)."""
    if node.tag == _TAG + "int" and len(node.value) > 100:
        return f"a number {len(node.value)} characters long cannot be a config value"
    if node.tag == _TAG + "str":
        return None
    # An explicit `!!int abc` or `!!timestamp 1` reaches PyYAML's constructors unchecked and fails there
    # with any exception at all; accept a tag only where the value reads as that type without it.
    read_as = loader.resolve(yaml.ScalarNode, node.value, (True, False))
    if read_as != node.tag and (node.tag, read_as) != (_TAG + "float", _TAG + "int"):
        return f"{_show(node.value)} is not a valid {node.tag[len(_TAG):]}; fix the value or remove the tag"
    try:
        loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as e:
        return f"cannot read {_show(node.value)} as a {node.tag[len(_TAG):]} ({e}); quote it to keep it as text"
    return None


def _section(dotted: str) -> type[BaseModel] | None:
    """The pydantic model of the section at `dotted`, or None when that key is a value or unknown."""
    model: type[BaseModel] = Config
    for part in dotted.split("."):
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _not_a_section(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "null":
        return "empty section; put its keys under it, indented (`  key: value`), or delete the line"
    return f"expected a section of `key: value` lines, found {_kind(node)}"


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = {"null": "nothing (null)", "bool": "the true/false value", "int": "the number", "float": "the number",
            "timestamp": "the date", "str": "the text"}.get(node.tag[len(_TAG):] if node.tag.startswith(_TAG) else "")
    if kind is None:
        return f"a value tagged {node.tag}"
    return kind if kind == "nothing (null)" else f"{kind} {_show(node.value)}"


def _parse_override(item: str) -> tuple[str, Any]:
    shown = f"--set {_show(item)}"
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"{shown}: expected dotted.key=value, for example --set train.epochs=3")
    _check_override_key(key, shown)
    if "\x00" in value:
        raise ConfigError(f"{shown}: the value contains a NUL character; remove it")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{shown}: the value is larger than {MAX_CONFIG_BYTES / 1e6:g} MB")
    if not value.strip():
        return key, None
    try:
        loader = _ConfigLoader(value)
        node = loader.get_single_node()
    except _Refused as e:
        raise ConfigError(f"{shown}: {e.message}") from None
    except yaml.YAMLError:
        return key, value  # not YAML (say, a path with a ': ' in it): take the text as written
    if node is None:  # only a comment, like an empty value: null
        return key, None
    try:
        problems: list[tuple[int, str]] = []
        _check_tree(loader, node, key, {}, problems, set())
        if problems:
            raise ConfigError(f"{shown}: " + "; ".join(text for _, text in problems[:3]))
        try:
            return key, loader.construct_document(node)
        except (yaml.YAMLError, ValueError, OverflowError) as e:
            raise ConfigError(f"{shown}: {_yaml_problem(e, value)[1]}") from None
    finally:
        loader.dispose()


def _check_override_key(key: str, shown: str) -> None:
    """A --set key names a value inside a section; unknown keys are left to validation, which suggests."""
    parts = key.split(".")
    model: type[BaseModel] | None = Config
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            return  # an unknown key: validation reports it, with a suggestion
        dotted = ".".join(parts[: i + 1])
        model = _section(dotted)
        last = i == len(parts) - 1
        if last and model is not None:
            example = next(iter(model.model_fields))
            raise ConfigError(f"{shown}: {dotted} is a section; set one of its keys, for example --set {dotted}.{example}=...")
        if not last and model is None:
            raise ConfigError(f"{shown}: {dotted} is a value, not a section; set it with --set {dotted}=VALUE")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _validate(raw: dict[str, Any], source: str, where: dict[str, tuple[int, int]], problems: list[Problem]) -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        problems = problems + [_describe(err, source, where) for err in e.errors()]
    if problems:
        raise ConfigError(_report(source, problems))
    return config


def _report(source: str, problems: list[Problem]) -> str:
    """Header and one line per problem, in file order, then --set order, then the unplaced ones."""
    problems = sorted(problems, key=lambda p: p[0])  # stable: same place keeps validation's order
    n = len(problems)
    shown = [f"  {_one_line(text)}" for _, text in problems[:MAX_PROBLEMS_SHOWN]]
    if n > MAX_PROBLEMS_SHOWN:
        shown.append(f"  ... and {n - MAX_PROBLEMS_SHOWN} more")
    return f"{source}: {n} problem{'s' if n > 1 else ''} in the config\n" + "\n".join(shown)


# Union types add a loc part naming the branch (e.g. 'int', 'literal['auto']'); keep real keys.
_UNION_BRANCH = re.compile(r"^(int|str|bool|float|literal\[.*\]|function-.*|none)$")


def _describe(err: dict[str, Any], source: str, where: dict[str, tuple[int, int]]) -> Problem:
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    if err["type"] == "extra_forbidden":  # the last part is the user's key, whatever it is called
        loc = [p for p in loc[:-1] if not _UNION_BRANCH.match(p)] + loc[-1:]
    else:
        loc = [p for p in loc if not _UNION_BRANCH.match(p)]
    key = ".".join(loc)
    place = where.get(key, (2, 0))
    prefix = {0: f"{source}:{place[1]}: ", 1: "--set ", 2: ""}[place[0]]
    if err["type"] == "extra_forbidden":
        section = ".".join(loc[:-1])
        known = _known_keys(section)
        guess = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6) or [
            k for k in known if loc[-1].startswith(k + "_") or k.startswith(loc[-1])
        ][:1]
        hint = f", did you mean {'.'.join([*loc[:-1], guess[0]])}?" if guess else f" (valid keys: {', '.join(known)})"
        return place, f"{prefix}{key}: unknown key{hint}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        msg += f" (got {_show(err['input'])})"
    return place, f"{prefix}{key or '(top level)'}: {msg}"


def _show(value: Any, limit: int = 60) -> str:
    """repr() for a message, cut to `limit` characters (a value may be a 900 KB string)."""
    try:
        text = repr(value)
    except ValueError:  # ints over 4300 digits refuse to print
        text = f"a {type(value).__name__} too large to print"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str, limit: int = 300) -> str:
    """A problem as one printable line: keys may hold newlines or control characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _known_keys(section: str) -> list[str]:
    model = _section(section) if section else Config
    return list(model.model_fields) if model is not None else []


def to_yaml(config: Config, reasons: dict[str, str] | None = None, header: str | None = None) -> str:
    """The resolved config as commented YAML, in section order, every key with a comment: why it
    has its value (`reasons`, by dotted key, from the planner) or else what it means. Reads back
    as the same config."""
    lines = [f"# {line}".rstrip() for line in (header or "").splitlines()]
    dumped = config.model_dump(mode="json")
    for section, model in type(config).model_fields.items():
        lines.append(f"{section}:")
        fields = model.annotation.model_fields  # type: ignore[union-attr]
        for key, value in dumped[section].items():
            why = (reasons or {}).get(f"{section}.{key}")
            about = why or " ".join((fields[key].description or "").split()).split(". ")[0].rstrip(".")
            scalar = yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]
            lines.append(f"  {key}: {scalar}" + (f"  # {'chosen: ' if why else ''}{about}" if about else ""))
    return "\n".join(lines) + "\n"
