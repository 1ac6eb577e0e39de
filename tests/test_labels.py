"""The labels reader against hostile input. Every file ends in a Labels whose rows are all valid (with notes for what
was dropped), or in one DataError listing each problem at its physical line: never a traceback, a hang, or a row
read wrongly."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import threading
from pathlib import Path

import pytest
from conftest import within
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mdn_cli.errors import DataError
from mdn_cli.data.labels import MAX_REPORTED, MAX_TARGET, SPLITS, Labels, read_labels

HEADER = "image,weight,split\n"


@pytest.fixture
def root(tmp_path) -> Path:
    """A data root with img/0.png .. img/5.png."""
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(root / "img" / f"{i}.png")
    return root


def write(root: Path, content: str | bytes) -> Path:
    path = root / "labels.csv"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def read(root: Path, content: str | bytes, split_column: str | None = "split", transform: str = "none") -> Labels:
    return read_labels(write(root, content), root, "image", "weight", split_column, transform)


def error(root: Path, content: str | bytes, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        read(root, content, **kwargs)
    return str(e.value)


def lines_in(message: str, path: Path) -> dict[int, str]:
    """Physical line -> problem, from a DataError's message."""
    return {int(n): text for n, text in re.findall(rf"^\s*{re.escape(str(path))}:(\d+): (.*)$", message, re.M)}




# --- the API ------------------------------------------------------------------------------------------


def test_a_clean_file_gives_examples_no_notes_and_the_file_hash(root):
    content = HEADER + "img/0.png,5.5,train\nimg/1.png,6,val\nimg/2.png,7,calibration\nimg/3.png,8,test\n"
    labels = read(root, content)
    assert [(e.image, e.target, e.split, e.line) for e in labels.examples] == [
        ("img/0.png", 5.5, "train", 2), ("img/1.png", 6.0, "val", 3), ("img/2.png", 7.0, "calibration", 4), ("img/3.png", 8.0, "test", 5)
    ]
    assert labels.examples[0].path == (root / "img" / "0.png").resolve()
    assert labels.notes == []
    assert labels.sha256 == hashlib.sha256(content.encode()).hexdigest()
    assert SPLITS == ("train", "val", "calibration", "test")
    with pytest.raises(AttributeError):
        labels.notes = []  # frozen


@pytest.mark.parametrize(
    "cell, split",
    [("train", "train"), ("TRAIN", "train"), (" Train ", "train"), ("val", "val"), ("VAL", "val"), ("valid", "val"),
     ("Validation", "val"), ("cal", "calibration"), ("CALIB", "calibration"), ("calibrate", "calibration"),
     ("Calibration", "calibration"), ("test", "test"), ("TeSt", "test")],
)
def test_split_names_are_case_insensitive_with_aliases(root, cell, split):
    assert read(root, HEADER + f"img/0.png,1,{cell}\n").examples[0].split == split


@pytest.mark.parametrize("cell", ["holdout", "", "tr ain", "calibrated", "testing", "'train'"])
def test_a_bad_split_names_the_four_valid_ones(root, cell):
    message = error(root, HEADER + f"img/0.png,1,{cell}\n")
    assert "labels.csv:2: " in message and "not one of train, val, calibration, test" in message


def test_without_a_split_column_the_split_is_none(root):
    assert read(root, "image,weight\nimg/0.png,1\n").examples[0].split is None
    assert read(root, HEADER + "img/0.png,1,train\n", split_column=None).examples[0].split is None


def test_a_split_column_that_differs_only_by_case_is_not_silently_ignored(root):
    message = error(root, "image,weight,Split\nimg/0.png,1,train\n")
    assert "no column 'split', but there is 'Split'" in message and "data.split_column: Split" in message


# --- 1. repeated column names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, column, positions",
    [
        ("image,weight,weight", "weight", "columns 2 ('weight'), 3 ('weight')"),
        ("image,weight, weight ", "weight", "columns 2 ('weight'), 3 (' weight ')"),
        ("image,weight,Weight", "weight", "columns 2 ('weight'), 3 ('Weight')"),
        ("image,image,weight", "image", "columns 1 ('image'), 2 ('image')"),
        ("image,weight,split,SPLIT", "split", "columns 3 ('split'), 4 ('SPLIT')"),
        ("weight,image,weight,weight", "weight", "appears 3 times in the header (columns 1 ('weight'), 3 ('weight'), 4"),
    ],
)
def test_repeated_column_names_are_refused_naming_the_positions(root, header, column, positions):
    message = error(root, f"{header}\nimg/0.png,1,2,train\n")
    assert message.startswith(f"{root / 'labels.csv'}:1: column '{column}' appears")
    assert positions in message and "rename or delete" in message


def test_every_repeated_column_is_reported(root):
    message = error(root, "image,image,weight,weight\nimg/0.png,img/1.png,1,2\n")
    assert "2 problems" in message and "column 'image'" in message and "column 'weight'" in message


def test_repeated_names_of_columns_mdn_does_not_read_are_fine(root):
    labels = read(root, "image,weight,notes,notes\nimg/0.png,1,a,b\n")
    assert labels.examples[0].target == 1.0


# --- 2. duplicates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, images, note",
    [
        (["img/0.png,1,train", "img/0.png,1,train"], ["img/0.png"], "1 duplicate row dropped (the same image and label listed again): line 3 repeats line 2"),
        (["img/0.png,1,train", "./img/0.png,1,train"], ["img/0.png"], "line 3 repeats line 2"),
        (["img/0.png,1,train", "img/../img/0.png,1,train"], ["img/0.png"], "line 3 repeats line 2"),
        (["img/0.png,1,train", "img//0.png,1,train"], ["img/0.png"], "line 3 repeats line 2"),
        (["img/0.png,1,train", " img/0.png ,1.0,TRAIN"], ["img/0.png"], "line 3 repeats line 2"),
        (["img/0.png,1,train", "img/0.png,1e0,train"], ["img/0.png"], "line 3 repeats line 2"),
        (["img/0.png,1,val", "img/0.png,1,validation"], ["img/0.png"], "line 3 repeats line 2"),
        (
            ["img/0.png,1,train", "img/0.png,1,train", "img/1.png,2,val", "./img/0.png,1,train"],
            ["img/0.png", "img/1.png"],
            "2 duplicate rows dropped (the same image and label listed again): line 3 repeats line 2, line 5 repeats line 2",
        ),
        (
            ["img/0.png,1,train", "img/1.png,2,val", "", "img/1.png,2,val", "img/0.png,1,train"],
            ["img/0.png", "img/1.png"],
            "2 duplicate rows dropped (the same image and label listed again): line 5 repeats line 3, line 6 repeats line 2",
        ),
    ],
)
def test_duplicate_rows_are_dropped_with_a_note(root, rows, images, note):
    labels = read(root, HEADER + "\n".join(rows) + "\n")
    assert [e.image for e in labels.examples] == images
    assert len(labels.notes) == 1 and note in labels.notes[0]
    assert labels.notes[0].startswith(str(root / "labels.csv"))


def test_many_duplicates_are_counted_and_the_first_few_named(root):
    labels = read(root, HEADER + "img/0.png,1,train\n" * 8)
    assert labels.notes == [
        f"{root / 'labels.csv'}: 7 duplicate rows dropped (the same image and label listed again): "
        "line 3 repeats line 2, line 4 repeats line 2, line 5 repeats line 2, line 6 repeats line 2, line 7 repeats line 2, ..."
    ]


def test_a_symlink_to_an_image_is_the_same_image(root):
    os.symlink("0.png", root / "img" / "alias.png")
    labels = read(root, HEADER + "img/0.png,1,train\nimg/alias.png,1,train\n")
    assert [e.image for e in labels.examples] == ["img/0.png"] and "line 3 repeats line 2" in labels.notes[0]


@pytest.mark.parametrize(
    "rows, words",
    [
        (["img/0.png,1,train", "img/0.png,2,train"], "different label (2.0 here, 1.0 on line 2)"),
        (["img/0.png,1,train", "img/0.png,1,val"], "different split ('val' here, 'train' on line 2)"),
        (["img/0.png,1,train", "./img/0.png,2,val"], "different label and split (2.0 here, 1.0 on line 2; 'val' here, 'train' on line 2) (written 'img/0.png' there)"),
        (["img/0.png,1,train", "img/1.png,1,train", "img//1.png,1,test"], "different split ('test' here, 'train' on line 3)"),
    ],
)
def test_the_same_image_with_another_label_or_split_is_an_error_naming_both_lines(root, rows, words):
    message = error(root, HEADER + "\n".join(rows) + "\n")
    problems = lines_in(message, root / "labels.csv")
    assert list(problems) == [len(rows) + 1] and words in problems[len(rows) + 1]


# --- 3. physical line numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, bad_lines",
    [
        ("image,weight\n\n\nimg/0.png,x\n", [4]),
        ("image,weight\n  \n,\n\t\nimg/0.png,x\n", [5]),
        ('image,weight,notes\nimg/0.png,1,"a\nb\nc"\nimg/1.png,x,\n', [5]),
        ('image,weight,notes\r\nimg/0.png,1,"a\r\nb"\r\nimg/1.png,x,\r\n', [4]),
        ('image,weight,notes\nimg/0.png,1,"a\r\n\r\nb"\nimg/1.png,x,\n', [5]),
        ("image,weight\r\nimg/0.png,1\r\n\r\nimg/1.png,x\r\n", [4]),
        ("image,weight\rimg/0.png,1\r\rimg/1.png,x\r", [4]),
        ("image,weight\nimg/0.png,1\r\nimg/1.png,1\rimg/2.png,x\n", [4]),
        ("\ufeffimage,weight\nimg/0.png,x\n", [2]),
        ("image,weight\nimg/0.png,x", [2]),
        ("image,weight\nimg/0.png,x\nimg/1.png,1\n\nimg/2.png,nan\n", [2, 5]),
        ('"image","weight"\n"img/0.png","1"\n\n"img/1.png","x"\n', [4]),
    ],
)
def test_problems_name_the_physical_line(root, content, bad_lines):
    message = error(root, content, split_column=None)
    assert list(lines_in(message, root / "labels.csv")) == bad_lines


def test_a_row_spanning_lines_is_named_by_its_first_line(root):
    message = error(root, 'image,weight,notes\nimg/0.png,x,"one\ntwo\nthree"\n')
    problems = lines_in(message, root / "labels.csv")
    assert list(problems) == [2] and "the row spans lines 2-4" in problems[2]


def test_example_lines_are_physical_lines(root):
    labels = read(root, 'image,weight,notes\r\n\r\nimg/0.png,1,"a\nb"\nimg/1.png,2,\r\rimg/2.png,3,x', split_column=None)
    assert [e.line for e in labels.examples] == [3, 5, 7]


# --- 4. other separators --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, word",
    [
        ("image;weight\nimg/0.png;1\n", "semicolon"),
        ("image;weight;split\r\nimg/0.png;1,5;train\r\n", "semicolon"),
        ('"image";"weight"\n"img/0.png";1\n', "semicolon"),
        ("\ufeffimage;weight\n", "semicolon"),
        ("sep=;\nimage;weight\n", "semicolon"),
        ("image;weight,notes\nimg/0.png;1,a\n", "semicolon"),
        ("image\tweight\nimg/0.png\t1\n", "tab"),
        ('"image"\t"weight"\n', "tab"),
        ("image|weight\nimg/0.png|1\n", "pipe"),
    ],
)
def test_a_file_with_another_separator_is_told_to_use_commas(root, content, word):
    message = error(root, content)
    assert f"looks {word}-separated; mdn reads comma-separated CSV: save it with commas" in message
    assert "image_column" not in message and "target_column" not in message


# --- 5. bytes that are not CSV text, and paths that leave the root ---------------------------------------------


@pytest.mark.parametrize(
    "content, line, words",
    [
        (b"image,weight\nimg/0.png,1\nimg/\x001.png,2\n", 3, "NUL byte"),
        (b"ima\x00ge,weight\nimg/0.png,1\n", 1, "NUL byte"),
        (b"image,weight\nimg/0.png,1,\x00\n", 2, "NUL byte"),
        ("image,weight\nimg/0.png,1\n".encode("utf-16-le"), 1, "NUL byte"),  # UTF-16 without a byte order mark
        (bytes(range(256)), 1, "NUL byte"),
        ("image,weight\nimg/0.png,1\nimg/café.png,2\n".encode("latin-1"), 3, "not UTF-8 text (byte 0xE9"),
        ("image,weight\nimg/\u201c0\u201d.png,1\n".encode("cp1252"), 2, "not UTF-8 text (byte 0x93"),
        (b"image,weight\nimg/0.png,1\xe2\x82", 2, "not UTF-8 text"),
        (b"image,weight\nimg/\xed\xa0\x80.png,1\n", 2, "not UTF-8 text"),  # an encoded surrogate
        (b"image,weight\xff\nimg/0.png,1\n", 1, "not UTF-8 text"),
    ],
)
def test_bytes_that_are_not_utf8_text_are_named_with_their_line(root, content, line, words):
    message = error(root, content)
    assert f"labels.csv:{line}: this line" in message and words in message and "UTF-8" in message


@pytest.mark.parametrize(
    "content, words",
    [
        ("image,weight\nimg/0.png,1\n".encode("utf-16"), "UTF-16"),
        (b"\xfe\xff" + "image,weight\n".encode("utf-16-be"), "UTF-16"),
        ("image,weight\n".encode("utf-32"), "UTF-16"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "a PNG image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "a JPEG image"),
        (b"PK\x03\x04\x14\x00\x06\x00", "Excel .xlsx"),
        (b"%PDF-1.7\n", "a PDF document"),
    ],
)
def test_utf16_and_binary_files_are_named(root, content, words):
    message = error(root, content)
    assert message.startswith(f"{root / 'labels.csv'}: the file is") and words in message and "\n" not in message


@pytest.mark.parametrize(
    "cell, words",
    [
        ("img/\x07.png", "control character U+0007"),
        ("img/\x1b[31mred.png", "control character U+001B"),
        ('"img/0\n.png"', "control character U+000A"),
        ('"img/0\r.png"', "control character U+000D"),
        ("img/\t0.png", "control character U+0009"),
        ("img/0\x7f.png", "control character U+007F"),
        ("img/0\u0085.png", "control character U+0085"),
        ("/etc/passwd", "is absolute"),
        ("/img/0.png", "is absolute"),
        ("\\\\server\\share\\0.png", "is absolute"),
        ("\\img\\0.png", "is absolute"),
        ("C:/img/0.png", "drive letter"),
        ("c:img/0.png", "drive letter"),
        ("../img/0.png", "leaves the root through '..'"),
        ("img/../../root/img/0.png", "leaves the root through '..'"),
        ("./../x.png", "leaves the root through '..'"),
        ("img/./../../../etc/passwd", "leaves the root through '..'"),
        ("", "empty image path in column 'image'"),
        ('""', "empty image path in column 'image'"),
        ("img/nope.png", "image file 'img/nope.png' not found under"),
        ("img\\0.png", "separate folders with '/'"),
        ("C", "not found"),
    ],
)
def test_bad_image_paths_are_refused_with_their_line(root, cell, words):
    message = error(root, f"image,weight\nimg/1.png,1\n{cell},2\n")
    problems = lines_in(message, root / "labels.csv")
    assert list(problems) == [3] and words in problems[3]
    assert all(c.isprintable() or c == "\n" for c in message)  # no escape sequence reaches the terminal


# --- 6. symlinks and things that are not files -------------------------------------------------------------------


def test_symlinks_and_non_files_get_one_line_each(root, monkeypatch):
    img = root / "img"
    os.symlink("loop_b", img / "loop_a.png")
    os.symlink("loop_a.png", img / "loop_b")
    os.symlink("self.png", img / "self.png")
    secret = root.parent / "secret.png"
    secret.write_bytes(b"outside")
    os.symlink(secret, img / "out.png")
    os.symlink("../../", img / "up")
    os.symlink("gone.png", img / "dangling.png")
    (img / "folder.png").mkdir()
    os.mkfifo(img / "fifo.png")
    os.symlink("0.png", img / "inside.png")
    rows = {
        3: ("img/loop_a.png", "symbolic link loop"),
        4: ("img/self.png", "symbolic link loop"),
        5: ("img/out.png", "is a symbolic link to"),
        6: ("img/up/secret.png", "outside data.root"),
        7: ("img/dangling.png", "through a symbolic link it leads to"),
        8: ("img/folder.png", "is a folder, not a file"),
        9: ("img/fifo.png", "is not a file"),
        10: ("img/0.png/x.png", "not found"),
        11: ("img/" + "a" * 300 + ".png", "too long"),
        12: ("img/" + "a/" * 3000 + "x.png", "too long"),
    }
    content = "image,weight\nimg/1.png,1\n" + "".join(f"{image},{line}\n" for line, (image, _) in rows.items())
    content += "img/inside.png,13\n"
    with within():
        message = error(root, content)
    problems = lines_in(message, root / "labels.csv")
    assert message.startswith(f"{root / 'labels.csv'}: {len(rows)} problems")
    for line, (_, words) in rows.items():
        assert words in problems[line], (line, problems[line])


@pytest.mark.parametrize("exception", [RuntimeError("Symlink loop from 'x'"), OSError(40, "Too many levels of symbolic links")])
def test_a_resolution_that_raises_is_a_line_not_a_traceback(root, monkeypatch, exception):
    resolve = Path.resolve

    def fake_resolve(self, strict=False):
        if "trap" in self.name:
            raise exception
        return resolve(self, strict)

    monkeypatch.setattr(Path, "resolve", fake_resolve)
    message = error(root, "image,weight\nimg/0.png,1\nimg/trap.png,2\n")
    problems = lines_in(message, root / "labels.csv")
    assert list(problems) == [3] and ("symbolic link loop" in problems[3] or "cannot be resolved" in problems[3])


# --- 7. targets ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, words",
    [
        ("heavy", "target 'heavy' in column 'weight' is not a number"),
        ("0x10", "is not a number"),
        ("5 kg", "is not a number"),
        ('"1,5"', "use a dot as the decimal separator"),
        ("", "empty target in column 'weight'"),
        ("   ", "empty target in column 'weight'"),
        ("nan", "not a finite number"),
        ("NaN", "not a finite number"),
        ("-nan", "not a finite number"),
        ("inf", "not a finite number"),
        ("-Infinity", "not a finite number"),
        ("+inf", "not a finite number"),
        ("1e400", "'1e400' is not a finite number (it overflows to infinity)"),
        ("-1e400", "overflows to infinity"),
        ("1e13", "'1e13' is larger in magnitude than 1e+12"),
        ("-1e13", "larger in magnitude"),
        ("1e308", "larger in magnitude"),
        ("1000000000001", "larger in magnitude"),
    ],
)
def test_bad_targets_are_refused_with_their_line(root, cell, words):
    message = error(root, f"image,weight\nimg/1.png,1\nimg/0.png,{cell}\n")
    problems = lines_in(message, root / "labels.csv")
    assert list(problems) == [3] and words in problems[3]


@pytest.mark.parametrize("cell, value", [("1e12", 1e12), ("-1e12", -1e12), ("1e-300", 1e-300), ("-0", -0.0), (" 5.5 ", 5.5), ("+3", 3.0)])
def test_targets_up_to_the_bound_are_read(root, cell, value):
    assert read(root, f"image,weight\nimg/0.png,{cell}\nimg/1.png,2\n").examples[0].target == value
    assert MAX_TARGET == 1e12


@pytest.mark.parametrize("cell", ["0", "-2", "-0.0"])
def test_log_needs_positive_targets(root, cell):
    message = error(root, f"image,weight\nimg/1.png,1\nimg/0.png,{cell}\n", transform="log")
    assert "labels.csv:3: " in message and "not positive, which data.target_transform: log requires" in message


def test_targets_that_are_all_equal_are_a_note(root):
    labels = read(root, "image,weight\nimg/0.png,2\nimg/1.png,2.0\nimg/2.png,2e0\n")
    assert len(labels.examples) == 3 and len(labels.notes) == 1
    assert "all 3 targets are 2.0" in labels.notes[0] and "data.target_column ('weight')" in labels.notes[0]
    assert read(root, "image,weight\nimg/0.png,2\nimg/1.png,3\n").notes == []


# --- 8. shapes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, line, words",
    [
        ("image,weight,split\nimg/0.png,1,train,extra\n", 2, "4 cells, but the header has 3 columns"),
        ("image,weight\nimg/a,b.png,1\n", 2, 'a cell that contains a comma must be in quotes ("a,b")'),
        ("image,weight,split\nimg/0.png,1\n", 2, "2 cells, but the header has 3 columns: no 'split' cell"),
        ("image,notes,weight\nimg/0.png,a\n", 2, "no 'weight' cell"),
        ("image,weight\nimg/0.png\n", 2, "1 cell, but the header has 2 columns"),
        ('image,weight,notes\nimg/0.png,1,"oops\nimg/1.png,2,x\n', 2, "never closed"),
        ('image,weight\nimg/1.png,1\nimg/0.png,"1"x\n', 3, "a quoted cell is followed by more text"),
        ("image,weight\nimg/0.png," + "9" * 200_000 + "\n", 2, "a cell is longer than"),
        ('image,weight,notes\nimg/0.png,1,"' + "x\n" * 400_000, 2, "a cell is longer than"),
        ('image,weight,notes\nimg/0.png,1,' + ",".join(['"' + ("x" * 50 + "\n") * 2000 + '"'] * 12) + "\n", 2, "past 1 MiB"),
        ("image,weight\n" + "a" * 3_000_000, 2, "longer than 1 MiB"),
        ("image,weight\nimg/0.png,1\n" + ("img/1.png," * 200_000) + "\n", 3, "longer than 1 MiB"),
    ],
)
def test_rows_of_the_wrong_shape_are_refused(root, content, line, words):
    with within():
        message = error(root, content)
    problems = lines_in(message, root / "labels.csv")
    assert line in problems and words in problems[line], message[:500]


def test_long_files_split_across_read_blocks_keep_their_lines(root):
    # A CRLF whose CR ends one 64 KiB read block and whose LF starts the next is one line break, not two.
    head = "image,weight,notes\r\n"
    row = "img/0.png,1,"
    content = head + row + "x" * ((1 << 16) - 1 - len(head) - len(row)) + "\r\nimg/1.png,bad,\r\n"
    assert content.encode()[(1 << 16) - 1 : (1 << 16) + 1] == b"\r\n"
    assert list(lines_in(error(root, content), root / "labels.csv")) == [3]
    # A file of lone CRs is many lines, not one line longer than the row limit.
    rows = "".join(f"img/{i % 6}.png,{i % 6},\r" for i in range(12_000))
    labels = read(root, "image,weight,notes\r" + rows)
    assert [e.line for e in labels.examples] == [2, 3, 4, 5, 6, 7]
    assert "11994 duplicate rows dropped" in labels.notes[0]


def test_a_50_mb_single_line_is_refused_without_reading_it_all(root):
    path = write(root, b"x" * (50 << 20))
    with within():
        with pytest.raises(DataError, match=r"labels.csv:1: this line is longer than 1 MiB"):
            read_labels(path, root, "image", "weight", None)


@pytest.mark.parametrize(
    "content, words",
    [
        ("", "labels file is empty"),
        ("\ufeff", "labels file is empty"),
        ("image,weight\n", "has a header but no rows"),
        ("image,weight\n\n\r\n  \n", "has a header but no rows"),
        ("image,weight\n,\n,,\n", "has a header but no rows"),
        ("\nimage,weight\nimg/0.png,1\n", ":1: expected the header"),
        ("  \nimage,weight\n", ":1: expected the header"),
        (",,\nimg/0.png,1,\n", ":1: expected the header"),
        ("img,weight\nimg/0.png,1\n", "no column 'image'"),
        ("image,wieght\nimg/0.png,1\n", "did you mean 'wieght'? Set data.target_column: wieght"),
        ("image,weight\x1b[2J\nimg/0.png,1\n", "'weight\\x1b[2J'"),
        ('"image\nweight"\n', "no column 'image'"),
    ],
)
def test_files_without_a_usable_header_or_rows(root, content, words):
    message = error(root, content, split_column=None)
    assert words in message and "\x1b" not in message


@pytest.mark.parametrize(
    "content, note",
    [
        (",image,weight\n0,img/0.png,1\n1,img/1.png,2\n", "1 unnamed column (column 1)"),
        ("image,,weight,\nimg/0.png,,1,\nimg/1.png,,2,\n", "2 unnamed columns (columns 2, 4)"),
    ],
)
def test_unnamed_columns_are_ignored_with_a_note(root, content, note):
    labels = read(root, content)
    assert [e.target for e in labels.examples] == [1.0, 2.0] and len(labels.notes) == 1 and note in labels.notes[0]


def test_trailing_empty_cells_and_short_rows_of_unread_columns_are_fine(root):
    labels = read(root, "image,weight,notes\nimg/0.png,1,a,,\nimg/1.png,2\n")
    assert [e.target for e in labels.examples] == [1.0, 2.0] and labels.notes == []


def test_the_labels_path_must_be_a_regular_file(root):
    assert "is a folder" in str(pytest.raises(DataError, read_labels, root, root, "image", "weight", None).value)
    assert "not found" in str(pytest.raises(DataError, read_labels, root / "nope.csv", root, "image", "weight", None).value)
    os.symlink("loop.csv", root / "loop.csv")
    assert "cannot open" in str(pytest.raises(DataError, read_labels, root / "loop.csv", root, "image", "weight", None).value)
    assert "not a regular file" in str(pytest.raises(DataError, read_labels, Path(os.devnull), root, "image", "weight", None).value)


def test_a_fifo_as_the_labels_file_does_not_hang(root):
    fifo = root / "labels.csv"
    os.mkfifo(fifo)
    result = {}

    def target():
        try:
            read_labels(fifo, root, "image", "weight", None)
        except DataError as e:
            result["message"] = str(e)

    thread = threading.Thread(target=target, daemon=True)  # a daemon: a hung open cannot keep pytest alive
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "read_labels blocked on a FIFO"
    assert "not a regular file" in result["message"]


def test_a_root_that_is_not_a_folder(root):
    path = write(root, "image,weight\nimg/0.png,1\n")
    with pytest.raises(DataError, match="data.root is not a folder"):
        read_labels(path, root / "nope", "image", "weight", None)


# --- 9. how many problems are shown -----------------------------------------------------------------------------------


def test_the_first_problems_are_listed_and_the_rest_counted(root):
    message = error(root, "image,weight\n" + "".join(f"img/0.png,bad{i}\n" for i in range(MAX_REPORTED + 5)))
    assert message.startswith(f"{root / 'labels.csv'}: {MAX_REPORTED + 5} problems in the labels file\n")
    assert list(lines_in(message, root / "labels.csv")) == list(range(2, MAX_REPORTED + 2))
    assert message.endswith("\n  ... and 5 more")


def test_problems_of_every_kind_are_reported_together(root):
    message = error(root, HEADER + "img/0.png,x,train\n../a.png,1,val\nimg/1.png,1e13,test\nimg/2.png,1,nope\nimg/9.png,1,val\n")
    assert list(lines_in(message, root / "labels.csv")) == [2, 3, 4, 5, 6]


# --- properties ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    """Real images, so that some generated rows are valid, and every trap the cells can point at."""
    root = tmp_path_factory.mktemp("fuzz") / "root"
    (root / "img").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(root / "img" / f"{i}.png")
    (root.parent / "secret.png").write_bytes(b"outside")
    os.symlink(root.parent / "secret.png", root / "outside.png")
    os.symlink("loop.png", root / "loop.png")
    os.symlink("img/0.png", root / "alias.png")
    (root / "dir.png").mkdir()
    os.mkfifo(root / "fifo.png")
    return root


def check(root: Path, content: bytes, split_column: str | None = "split", transform: str = "none") -> Labels | None:
    """The property: a Labels of valid rows, or a DataError of printable lines; anything else fails the test."""
    path = root / "labels.csv"
    path.write_bytes(content)
    try:
        with within():
            labels = read_labels(path, root, "image", "weight", split_column, transform)
    except DataError as e:
        assert all(c.isprintable() or c == "\n" for c in str(e)), repr(str(e))
        event("DataError")
        return None
    event("Labels")
    assert labels.sha256 == hashlib.sha256(content).hexdigest()
    assert labels.examples and all("\n" not in note and note.isprintable() for note in labels.notes)
    inside = root.resolve()
    for e in labels.examples:
        assert math.isfinite(e.target) and abs(e.target) <= MAX_TARGET
        assert e.path.is_file() and not e.path.is_symlink() and e.path.is_relative_to(inside)
        assert e.split in SPLITS if split_column and e.split is not None else e.split is None
        assert transform != "log" or e.target > 0
    assert len({e.path for e in labels.examples}) == len(labels.examples)
    return labels


# Derandomized and bounded: the same examples on every run, the whole file in well under 30 s on one core.
SETTINGS = settings(
    max_examples=250, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PREFIXES = [b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"image,weight,split\n", b"image,weight,split\r\nimg/0.png,1,train\r\n",
            b'image,weight,split\nimg/1.png,2,val\n"', b"\x89PNG\r\n\x1a\n"]


@SETTINGS
@given(prefix=st.sampled_from(PREFIXES), tail=st.binary(max_size=400))
def test_any_bytes_give_labels_or_a_data_error(fuzz_root, prefix, tail):
    check(fuzz_root, prefix + tail)


NAMES = ["image", "weight", "split", "Weight", " weight", "IMAGE", "", "notes", "image;weight", "split ", "Split", "x"]
CELL_WORDS = [
    "img/0.png", "./img/1.png", "img//2.png", "img/../img/3.png", "img/4.png", "img/5.png", "alias.png", "../img/0.png",
    "/etc/passwd", "C:/img/0.png", "img/nope.png", "img", "loop.png", "outside.png", "dir.png", "fifo.png", "img/\x000.png",
    "img/\n0.png", " img/0.png ", "1", "2.5", "-3", "0", "1e12", "1e13", "1e400", "nan", "-inf", "1,5", "", " ",
    "train", "VAL", "valid", "cal", "Calibration", "test", "holdout", '"', '""', ",", ";", "\t", "\r\n", "\r", "\ufeff",
]
cells = st.one_of(
    st.sampled_from(CELL_WORDS),
    st.floats().map(repr),
    st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(list(',;"\t\r\n\x00 ')), max_size=10),
)
GOOD_IMAGES = ["img/{}.png", "./img/{}.png", "img//{}.png", "img/../img/{}.png", " img/{}.png "]
# A label and a split fixed per image, so that good rows repeat each other (duplicates) but never conflict.
good_rows = st.tuples(st.integers(0, 5), st.sampled_from(GOOD_IMAGES)).map(
    lambda t: [t[1].format(t[0]), str(t[0] + 0.5), ["train", "VAL", "valid", "cal", "Calibration", "test"][t[0]]]
)


@st.composite
def csv_files(draw) -> bytes:
    standard = st.sampled_from([["image", "weight", "split"], ["image", "weight"], ["image", "weight", "split", "notes"]])
    header = draw(st.one_of(standard, standard, standard, st.lists(st.sampled_from(NAMES), max_size=5)))
    # Mostly good rows, so that a fair share of files is valid and the checks on valid files run.
    rows = draw(st.lists(st.one_of(*[good_rows] * 8, st.lists(cells, max_size=5)), min_size=1, max_size=6))
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    if draw(st.booleans()):
        out = io.StringIO()
        csv.writer(out, lineterminator=end, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))).writerows([header, *rows])
        text = out.getvalue()
    else:  # written by hand: nothing quoted, so commas, quotes and line breaks in cells fall where they may
        text = "".join(",".join(row) + draw(st.sampled_from([end, end, end + end, ""])) for row in [header, *rows])
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + text.encode("utf-8")


@SETTINGS
@given(content=csv_files(), split_column=st.sampled_from(["split", None]), transform=st.sampled_from(["none", "log"]))
def test_any_csv_gives_labels_or_a_data_error(fuzz_root, content, split_column, transform):
    check(fuzz_root, content, split_column, transform)


@st.composite
def valid_files(draw):
    """A valid file written in any way CSV allows, and the examples it must give (with their physical lines)."""
    chosen = draw(st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True))
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    writer_quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    bom = draw(st.booleans())
    notes_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
    expected, chunks, repeats = [], [], 0

    def line(cells):
        # csv.writer quotes only the characters of its own lineterminator; CSV needs every line break quoted.
        quoting = csv.QUOTE_ALL if any("\r" in c or "\n" in c for c in cells) else writer_quoting
        out = io.StringIO()
        csv.writer(out, lineterminator=end, quoting=quoting).writerow(cells)
        return out.getvalue()

    chunks.append(line(["notes", "image", "weight", "split"]))
    for i in chosen:
        chunks.append(end * draw(st.integers(0, 2)))  # blank lines
        spelled = draw(st.sampled_from([f"img/{i}.png", f"./img/{i}.png", f"img//{i}.png", f"img/../img/{i}.png", f" img/{i}.png "]))
        target = draw(st.floats(-MAX_TARGET, MAX_TARGET, allow_nan=False))
        split_cell = draw(st.sampled_from(["train", "Train", "val", "VALID", "validation", "cal", "CALIB", "calibrate", "calibration", "test"]))
        text = "".join(chunks)
        first = 1 + len(re.findall(r"\r\n|\r|\n", text))
        chunks.append(line([draw(notes_text), spelled, repr(target), split_cell]))
        expected.append((spelled.strip(), target, {"valid": "val", "validation": "val", "cal": "calibration", "calib": "calibration",
                                                    "calibrate": "calibration"}.get(split_cell.lower(), split_cell.lower()), first))
        if draw(st.booleans()):
            repeats += 1
            chunks.append(line(["again", f"./{spelled.strip()}", repr(target), split_cell.upper()]))
    text = "".join(chunks)
    if draw(st.booleans()) and text.endswith(end):
        text = text[: -len(end)]  # no line break after the last row
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"), expected, repeats


@SETTINGS
@given(case=valid_files())
def test_a_valid_file_written_any_way_reads_back_exactly(fuzz_root, case):
    content, expected, repeats = case
    labels = check(fuzz_root, content)
    assert labels is not None
    assert [(e.image, e.target, e.split, e.line) for e in labels.examples] == expected
    assert sum("duplicate row" in n for n in labels.notes) == (repeats > 0)
    if repeats:
        assert f"{repeats} duplicate row{'s' if repeats > 1 else ''} dropped" in labels.notes[0]
