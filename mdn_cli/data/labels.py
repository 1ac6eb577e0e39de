"""The labels file: read and validate a CSV of image paths and numeric targets.

Every problem of a file is reported at once, each with the physical line it is on (DataError). Findings that do not
stop a run (duplicate rows dropped, an unnamed column, targets that are all equal) come back as notes for the caller
to print. The format is described in data/README.md.
"""

from __future__ import annotations

import csv
import difflib
import errno
import hashlib
import math
import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..errors import DataError

SPLITS = ("train", "val", "calibration", "test")
"""The split names; calibration images are used only to calibrate the predictive intervals."""
SPLIT_ALIASES = {
    "valid": "val", "validation": "val", "cal": "calibration", "calib": "calibration", "calibrate": "calibration"
}
MAX_REPORTED = 20
"""Problems listed in a DataError; the others are only counted."""
MAX_TARGET = 1e12
"""Largest |target| accepted. Training standardises the targets and squares them; a label beyond this is almost
surely corrupt or in the wrong units (1e308 once gave an inf NLL and a 300-digit MAE)."""
MAX_ROW_BYTES = 1 << 20
"""Longest row, all its lines together: a file without line breaks, or an unclosed quote that turns the rest of the
file into one cell, is refused here instead of being read into memory."""
MAX_NOTED_REPEATS = 5
"""Duplicate rows named in the note; the others are only counted."""

_READ_BLOCK = 1 << 16
_LINE_END = re.compile(rb"\r\n|\r|\n")  # what a file opened with newline="" splits on, so csv sees the same lines
_DRIVE = re.compile(r"^[A-Za-z]:")
_UTF8_BOM = b"\xef\xbb\xbf"
# Files people point data.labels at by mistake: naming the kind helps more than "not UTF-8".
_NOT_CSV = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx workbook?)"),
    (b"\xd0\xcf\x11\xe0", "an old-style Excel .xls workbook"),
    (b"%PDF", "a PDF document"),
)
_SEPARATORS = ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"))


@dataclass(frozen=True)
class Example:
    image: str
    """The image path as written in the labels file (relative to the data root)."""
    path: Path
    """The resolved image path."""
    target: float
    """The label, in target units."""
    split: str | None
    """One of SPLITS from the split column, or None when the file has none."""
    line: int
    """1-based physical line of the labels file where the row starts (the header is line 1)."""
    group: str | None = None
    """The row's group (data.group_column: camera, site, breed...), None without one."""


@dataclass(frozen=True)
class Labels:
    examples: list[Example]
    """The valid rows, in file order, duplicates dropped."""
    notes: list[str]
    """Non-fatal findings for the caller to print, one line each."""
    sha256: str
    """Hex digest of the file's bytes: a fingerprint to store with a run."""
    rows: int = 0
    """Rows read (blank lines aside): the examples plus the repeated rows dropped."""
    problems: list[str] = field(default_factory=list)
    """The rows left out, one line each (only with `lenient`: otherwise they are a DataError)."""


def read_labels(
    labels_path: Path,
    root: Path,
    image_column: str,
    target_column: str,
    split_column: str | None,
    target_transform: str = "none",
    group_column: str | None = None,
    lenient: bool = False,
) -> Labels:
    """Read and validate the whole labels CSV; report every problem found at once (DataError).
    `group_column`: a column naming each row's group (an empty cell: no group). `lenient`: rows
    with problems are left out and listed in `problems` instead (the data check reports them all)."""
    labels_path, root = Path(labels_path), Path(root)
    with _open_regular_file(labels_path) as f:
        lines = _Lines(f)
        # strict: a quote left open to the end of the file is an error, not one cell that swallows every row after it.
        reader = csv.reader(lines, strict=True)
        columns, notes = _read_header(reader, lines, labels_path, image_column, target_column, split_column, group_column)
        root_resolved = _resolve_root(root, labels_path)

        problems: list[str] = []
        examples: list[Example] = []
        seen: dict[str, Example] = {}
        repeats: list[tuple[int, int]] = []
        rows = 0
        end = reader.line_num
        while True:
            lines.start_row()
            try:
                row = next(reader)
            except StopIteration:
                break
            except _Unreadable as e:
                problems.append(f"{labels_path}:{e.line}: {e.message} (reading stopped there)")
                break
            except csv.Error as e:
                problems.append(f"{labels_path}:{end + 1}: {_csv_problem(e)} (reading stopped there)")
                break
            # reader.line_num counts the lines read so far, so it is the line where this row ENDS; the row starts
            # on the line after the previous row ended (blank lines are rows of their own, and so counted).
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # a blank line, or a row of empty cells as spreadsheets leave at the end
            rows += 1
            span = f" (the row spans lines {start}-{end}: a quoted cell holds line breaks)" if end > start else ""
            try:
                image, path, target, split, group = columns.parse(row, root_resolved, root, target_transform)
            except _RowProblem as e:
                problems.append(f"{labels_path}:{start}: {e}{span}")
                continue
            example = Example(image=image, path=path, target=target, split=split, line=start, group=group)
            previous = seen.get(str(path))
            if previous is not None:
                if (previous.target, previous.split) == (target, split):
                    repeats.append((start, previous.line))
                else:
                    problems.append(f"{labels_path}:{start}: {_conflict(example, previous)}{span}")
                continue
            seen[str(path)] = example
            try:
                _check_file(path, image, root, root_resolved)
            except _RowProblem as e:
                problems.append(f"{labels_path}:{start}: {e}{span}")
                continue
            examples.append(example)
        sha256 = lines.sha256.hexdigest()

    if problems and not lenient:
        raise _report(labels_path, problems)
    if rows == 0:
        raise DataError(f"{labels_path}: labels file has a header but no rows; add one row per image below the header")
    if repeats:
        shown = ", ".join(f"line {line} repeats line {first}" for line, first in repeats[:MAX_NOTED_REPEATS])
        more = ", ..." if len(repeats) > MAX_NOTED_REPEATS else ""
        notes.append(
            f"{labels_path}: {len(repeats)} duplicate row{'s' if len(repeats) > 1 else ''} dropped "
            f"(the same image and label listed again): {shown}{more}"
        )
    if len(examples) > 1 and all(e.target == examples[0].target for e in examples):
        # Not an error: the target scaler copes with a zero spread and the model fits, but it can only learn one value.
        notes.append(
            f"{labels_path}: all {len(examples)} targets are {examples[0].target!r}, so the model can only learn that "
            f"one value; check that data.target_column ('{target_column}') is the label column"
        )
    return Labels(examples=examples, notes=notes, sha256=sha256, rows=rows, problems=problems)


# --- the file as lines of text ---------------------------------------------------------------------


class _Unreadable(Exception):
    """Bytes that are not CSV text. Reading stops there; line None means the whole file."""

    def __init__(self, line: int | None, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


def _open_regular_file(labels_path: Path) -> BinaryIO:
    not_regular = f"{labels_path}: is not a regular file (a pipe, socket or device); save the labels as a CSV file"
    try:
        st = os.stat(labels_path)
        if stat.S_ISDIR(st.st_mode):
            raise DataError(f"{labels_path}: is a folder, not a labels file; set data.labels to the CSV file")
        if not stat.S_ISREG(st.st_mode):
            # Checked before opening: opening a FIFO waits for a writer, and a device can be read forever.
            raise DataError(not_regular)
        # O_NONBLOCK and the fstat below close the gap between this stat and the open: a FIFO swapped in
        # meanwhile neither blocks the open nor gets read.
        fd = os.open(labels_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise DataError(f"{labels_path}: labels file not found; check data.root and data.labels") from None
    except OSError as e:
        raise DataError(f"{labels_path}: cannot open the labels file ({_reason(e)})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(not_regular)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _Lines:
    """The labels file as text for csv.reader, one physical line per item, checked on the way.

    One item per line (CRLF, LF or a lone CR ends one) makes csv's reader.line_num a physical line number. Each line is
    checked for NUL bytes and decoded as UTF-8 on its own, so a problem is reported on its exact line; the bytes are
    hashed as they are read.
    """

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.line = 0
        """Lines handed to csv so far."""
        self.first_line = ""
        self._row_start = 1
        self._row_bytes = 0

    def start_row(self) -> None:
        """Called before csv reads a row, so that an overlong row is reported on the line where it starts."""
        self._row_start, self._row_bytes = self.line + 1, 0

    def __iter__(self) -> Iterator[str]:
        for raw in self._raw_lines():
            if self.line == 0:
                raw = raw.removeprefix(_UTF8_BOM)
                if not raw:
                    return  # a byte order mark and nothing else: an empty file
            self.line += 1
            self._row_bytes += len(raw)
            if self._row_bytes > MAX_ROW_BYTES:
                raise _Unreadable(
                    self._row_start,
                    f"the row starting here runs to line {self.line} and past {MAX_ROW_BYTES >> 20} MiB: a quote (\") "
                    "opens a cell that does not end; close the quote, or remove it",
                )
            if b"\0" in raw:
                raise _Unreadable(
                    self.line,
                    "this line contains a NUL byte, which CSV text never holds (UTF-16 text and binary files do); "
                    "save the labels as CSV UTF-8",
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Unreadable(
                    self.line,
                    f"this line is not UTF-8 text (byte 0x{raw[e.start]:02X} at byte {e.start + 1} of the line); "
                    "save the labels as UTF-8 (Excel: 'CSV UTF-8')",
                ) from None
            if self.line == 1:
                self.first_line = text
            yield text

    def _raw_lines(self) -> Iterator[bytes]:
        carry = b""
        first = True
        while True:
            block = self._f.read(_READ_BLOCK)
            self.sha256.update(block)
            if first:
                _check_start(block)
                first = False
            data = carry + block
            start = 0
            for m in _LINE_END.finditer(data):
                if block and m.end() == len(data) and m.group() == b"\r":
                    break  # may be the first half of a CRLF that the next block completes
                yield data[start : m.end()]
                start = m.end()
            carry = data[start:]
            if not block:
                if carry:
                    yield carry
                return
            if len(carry) > MAX_ROW_BYTES:
                raise _Unreadable(
                    self.line + 1,
                    f"this line is longer than {MAX_ROW_BYTES >> 20} MiB; a labels row holds a path and a few values: "
                    "is this really the labels CSV?",
                )


def _check_start(block: bytes) -> None:
    if block.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise _Unreadable(
            None, "the file is UTF-16 (or UTF-32) text: it starts with a byte order mark; save it as UTF-8 (Excel: 'CSV UTF-8')"
        )
    for signature, kind in _NOT_CSV:
        if block.startswith(signature):
            raise _Unreadable(None, f"the file is {kind}, not a CSV text file; set data.labels to the labels CSV")


def _csv_problem(e: csv.Error) -> str:
    text = str(e)
    # Matched on csv's wording; an unknown one still gives a clear (if plainer) message.
    if "unexpected end of data" in text:
        return (
            'a quote (") opens a cell here that is never closed, so every line after it would be one cell; '
            "close the quote, or remove it"
        )
    if "expected after" in text:
        return (
            "a quoted cell is followed by more text before the next comma; "
            'quote the whole cell ("a, b") and double any quote inside it ("")'
        )
    if "field limit" in text:
        return (
            f"a cell is longer than {csv.field_size_limit()} characters; a labels cell is a path or a number: "
            "is this really the labels CSV?"
        )
    return f"cannot be read as CSV ({text})"


# --- the header -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    image: int
    target: int
    split: int | None
    names: list[str]
    image_column: str
    target_column: str
    split_column: str | None
    group: int | None = None
    group_column: str | None = None

    def parse(self, row: list[str], root_resolved: Path, root: Path, transform: str) -> tuple[str, Path, float, str | None, str | None]:
        """A row's image path (as written, and resolved inside the root), target, split and group; _RowProblem if invalid."""
        n = len(self.names)
        if len(row) > n and any(cell.strip() for cell in row[n:]):
            # Usually an unquoted comma inside a path or a number: every cell after it has moved one column right.
            raise _RowProblem(
                f"{len(row)} cells, but the header has {n} columns; "
                'a cell that contains a comma must be in quotes ("a,b")'
            )
        wanted = [(self.image, self.image_column), (self.target, self.target_column)]
        if self.split is not None:
            wanted.append((self.split, self.split_column))
        if self.group is not None:
            wanted.append((self.group, self.group_column))
        missing = [name for i, name in wanted if i >= len(row)]
        if missing:
            raise _RowProblem(
                f"{len(row)} cell{'s' if len(row) != 1 else ''}, but the header has {n} columns: "
                f"no '{missing[0]}' cell; write one cell per column, an empty one as two commas"
            )
        image = row[self.image].strip()
        path = _image_path(image, self.image_column, root_resolved, root)
        target = _target(row[self.target].strip(), self.target_column, transform)
        split = None if self.split is None else _split(row[self.split], self.split_column)
        group = None if self.group is None else (row[self.group].strip() or None)
        if group is not None and not group.isprintable():
            raise _RowProblem(f"the {self.group_column} cell {_show(group)} holds control characters; write the group as plain text")
        return image, path, target, split, group


def _read_header(
    reader, lines: _Lines, labels_path: Path, image_column: str, target_column: str, split_column: str | None,
    group_column: str | None = None,
) -> tuple[_Columns, list[str]]:
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{labels_path}: labels file is empty; expected a header line such as 'image,weight'") from None
    except _Unreadable as e:
        where = f"{labels_path}:{e.line}" if e.line is not None else f"{labels_path}"
        raise DataError(f"{where}: {e.message}") from None
    except csv.Error as e:
        separator = _foreign_separator([lines.first_line.strip()], lines.first_line, [image_column, target_column])
        raise DataError(f"{labels_path}:1: {separator or _csv_problem(e)}") from None
    names = [name.strip() for name in header]
    if not any(names):
        raise DataError(
            f"{labels_path}:1: expected the header (column names such as 'image,weight') on the first line, "
            "found no column names there; remove anything above the header"
        )
    wanted = [image_column, target_column] + ([split_column] if split_column else []) + ([group_column] if group_column else [])
    missing = [c for c in (image_column, target_column) if c not in names]
    separator = _foreign_separator(names, lines.first_line, missing)
    if separator:
        raise DataError(f"{labels_path}:1: {separator}")

    problems = []
    for column in dict.fromkeys(wanted):
        # Names are compared without surrounding spaces (they are stripped before use) and without case: 'weight'
        # and 'Weight' side by side are two versions of one column, and mdn cannot know which one is meant.
        positions = [i for i, name in enumerate(names) if name.casefold() == column.strip().casefold()]
        if len(positions) > 1:
            where = ", ".join(f"{i + 1} ({_show(header[i])})" for i in positions)
            problems.append(
                f"{labels_path}:1: column '{column}' appears {len(positions)} times in the header (columns {where}); "
                "mdn cannot tell which one to read: rename or delete the others"
            )
    if problems:
        raise _report(labels_path, problems) if len(problems) > 1 else DataError(problems[0])

    required = [("data.image_column", image_column), ("data.target_column", target_column)]
    for key, column in required + ([("data.group_column", group_column)] if group_column else []):
        if column not in names:
            guess = difflib.get_close_matches(column, [n for n in names if n], n=1, cutoff=0.5)
            if not guess:
                hint = f"; set {key} to one of them"
            elif guess[0].isprintable():
                hint = f"; did you mean '{guess[0]}'? Set {key}: {guess[0]}"
            else:
                hint = f"; did you mean {_show(guess[0])}? Rename that column"
            shown = ", ".join(_show(n) for n in names)
            raise DataError(f"{labels_path}: no column '{column}' (columns: {shown}){hint}")
    split = None
    if split_column:
        if split_column in names:
            split = names.index(split_column)
        else:
            other = [n for n in names if n.casefold() == split_column.casefold()]
            if other:
                # Without this the file's own split would be ignored for a random one, with no word said.
                raise DataError(
                    f"{labels_path}: no column '{split_column}', but there is '{other[0]}'; "
                    f"set data.split_column: {other[0]} to use it, or rename the column"
                )

    notes = []
    unnamed = [i + 1 for i, name in enumerate(names) if not name]
    if unnamed:
        notes.append(
            f"{labels_path}: the header has {len(unnamed)} unnamed column{'s' if len(unnamed) > 1 else ''} "
            f"(column{'s' if len(unnamed) > 1 else ''} {', '.join(map(str, unnamed))}), ignored like any other extra column"
        )
    columns = _Columns(
        image=names.index(image_column),
        target=names.index(target_column),
        split=split,
        names=names,
        image_column=image_column,
        target_column=target_column,
        split_column=split_column,
        group=names.index(group_column) if group_column else None,
        group_column=group_column,
    )
    return columns, notes


def _foreign_separator(names: list[str], first_line: str, missing: list[str]) -> str | None:
    """The message for a header written with another separator than the comma, if it looks so."""
    for separator, word in _SEPARATORS:
        if separator not in first_line:
            continue
        tokens = [t.strip().strip('"').strip() for t in first_line.strip().split(separator)]
        if (len(names) == 1 and separator in names[0]) or any(column in tokens for column in missing):
            return (
                f"the file looks {word}-separated; mdn reads comma-separated CSV: save it with commas "
                "(Excel: 'CSV UTF-8 (comma delimited)')"
            )
    return None


# --- the cells -----------------------------------------------------------------------------------------


class _RowProblem(Exception):
    """What is wrong with one row (the caller adds the file and line)."""


def _image_path(image: str, column: str, root_resolved: Path, root: Path) -> Path:
    if not image:
        raise _RowProblem(f"empty image path in column '{column}'")
    control = next((c for c in image if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise _RowProblem(
            f"image path {_show(image)} contains the control character U+{ord(control):04X}; "
            "fix the path (or rename the file without it)"
        )
    outside = f"so it points outside data.root; use a path relative to {root}"
    if image.startswith(("/", "\\")) or os.path.isabs(image):
        raise _RowProblem(f"image path {_show(image)} is absolute, {outside}")
    if _DRIVE.match(image):
        raise _RowProblem(f"image path {_show(image)} starts with a drive letter, {outside}")
    depth = 0  # checked on the text first, so that '..' is refused even where it happens to come back inside
    for part in PurePosixPath(image).parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            raise _RowProblem(f"image path {_show(image)} leaves the root through '..', {outside}")
    try:
        path = (root_resolved / image).resolve()
    except RuntimeError:  # Python < 3.13 raises this for a symlink loop
        raise _RowProblem(f"image path {_show(image)} is a symbolic link loop; fix or remove the link") from None
    except (OSError, ValueError) as e:
        raise _RowProblem(f"image path {_show(image)} cannot be resolved ({_reason(e)}); fix the path") from None
    if not path.is_relative_to(root_resolved):
        raise _RowProblem(
            f"image path {_show(image)} is a symbolic link to {path}, outside data.root ({root}); "
            "copy the image into data.root instead of linking it"
        )
    return path


def _check_file(path: Path, image: str, root: Path, root_resolved: Path) -> None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        hint = ""
        if Path(os.path.normpath(root_resolved / image)) != path:
            hint = f" (through a symbolic link it leads to {path}, which does not exist)"
        elif "\\" in image:
            hint = "; separate folders with '/', not '\\'"
        raise _RowProblem(f"image file {_show(image)} not found under {root}{hint}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _RowProblem(f"image path {_show(image)} is a symbolic link loop; fix or remove the link") from None
        raise _RowProblem(f"image file {_show(image)} cannot be read ({_reason(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _RowProblem(f"image path {_show(image)} is a folder, not a file; name the image file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise _RowProblem(f"image path {_show(image)} is not a file (a pipe, socket or device); name an image file")


def _target(text: str, column: str, transform: str) -> float:
    if not text:
        raise _RowProblem(f"empty target in column '{column}'; expected a number")
    try:
        value = float(text)
    except ValueError:
        hint = "; use a dot as the decimal separator" if re.fullmatch(r"[+-]?\d+,\d+", text) else ""
        raise _RowProblem(f"target {_show(text)} in column '{column}' is not a number{hint}") from None
    if not math.isfinite(value):
        overflow = not math.isnan(value) and "inf" not in text.lower()
        raise _RowProblem(
            f"target {_show(text)} is not a finite number{' (it overflows to infinity)' if overflow else ''}; "
            "fix the label or remove the row"
        )
    if abs(value) > MAX_TARGET:
        raise _RowProblem(
            f"target {_show(text)} is larger in magnitude than {MAX_TARGET:.0e}, the most mdn accepts (training "
            "standardises and squares the targets); fix the label, or express the labels in larger units"
        )
    if transform == "log" and value <= 0:
        raise _RowProblem(
            f"target {_show(text)} is not positive, which data.target_transform: log requires; "
            "fix the label or use target_transform: none"
        )
    return value


def _split(text: str, column: str | None) -> str:
    key = text.strip().lower()
    key = SPLIT_ALIASES.get(key, key)
    if key not in SPLITS:
        found = f"split {_show(text.strip())}" if key else "empty split"
        raise _RowProblem(
            f"{found} in column '{column}' is not one of {', '.join(SPLITS)} "
            "(valid/validation and cal/calib/calibrate are accepted too)"
        )
    return key


def _conflict(example: Example, previous: Example) -> str:
    differs, values = [], []
    for what, here, there in (("label", example.target, previous.target), ("split", example.split, previous.split)):
        if here != there:
            differs.append(what)
            values.append(f"{here!r} here, {there!r} on line {previous.line}")
    written = "" if example.image == previous.image else f" (written {_show(previous.image)} there)"
    return (
        f"{_show(example.image)} is listed again with a different {' and '.join(differs)} "
        f"({'; '.join(values)}){written}; keep one row per image"
    )


# --- helpers --------------------------------------------------------------------------------------------


def _resolve_root(root: Path, labels_path: Path) -> Path:
    try:
        resolved = root.resolve()
        is_dir = resolved.is_dir()
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{root}: data.root cannot be resolved ({_reason(e)}); check data.root") from None
    if not is_dir:
        raise DataError(f"{root}: data.root is not a folder; the image paths in {labels_path} are relative to it")
    return resolved


def _report(labels_path: Path, problems: list[str]) -> DataError:
    shown = problems[:MAX_REPORTED]
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return DataError(
        f"{labels_path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the labels file\n"
        + "\n".join(f"  {p}" for p in shown)
        + more
    )


def _show(text: str, limit: int = 60) -> str:
    """A cell for a message: quoted, escaped onto one line (no control characters reach the terminal), cut short."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _reason(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
