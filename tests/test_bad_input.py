"""The bad-input matrix: each mistake exits with the README's code (1: some inputs failed, 2: usage
error), says what is wrong in one line on stderr that names the problem, and prints no traceback.

Inputs that only spoil one file of many (zero-byte, truncated, not an image, decompression bomb)
are skipped: the good photo is still captioned, the bad one gets its own line, and a last line
counts the failures.
"""

import io
import json
import re
import shutil
import struct
import zlib

import pytest
from PIL import Image

from conftest import PHOTOS, ROOT, run_cli

GOOD = PHOTOS[0]
FAST_CAPTION = ["--seq-len", "6", "--min-seq-len", "2", "--num-beams", "2", "--num-beam-groups", "1"]
FAST_TRAIN = ["--model", "coca_tiny", "--workers", "0", "--precision", "fp32", "--batch-size", "2", "--epochs", "1"]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb(path):
    """A 100-byte PNG whose header claims 100,000 x 100,000 pixels."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _png_chunk(b"IEND", b""))


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.open(GOOD).convert("RGB").save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])


def _table(path, header, rows, encoding="utf-8"):
    path.write_bytes(("\n".join([header, *rows]) + "\n").encode(encoding))
    return path


# name -> builder(tmp_path, native) returning (argv, exit code, text the message must contain)
def missing_path(tmp, native):
    return ["caption", tmp / "nope.jpg", "--pretrained", native], 2, f"no such file or directory: {tmp / 'nope.jpg'}"


def directory_without_images(tmp, native):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("no pictures here")
    return ["caption", tmp / "empty", "--pretrained", native], 2, "no images found"


def unknown_model(tmp, native):
    return ["caption", GOOD, "--model", "coca_ViT-B-23"], 2, "unknown model 'coca_ViT-B-23' (did you mean: coca_ViT-B-32"


def config_checkpoint_mismatch(tmp, native):
    config = json.loads((ROOT / "models" / "coca_tiny.json").read_text())
    config["text_cfg"]["layers"] = 3
    (tmp / "deeper.json").write_text(json.dumps(config))
    return (["caption", GOOD, "--model", tmp / "deeper.json", "--pretrained", native / "model.safetensors"], 2,
            "text.transformer.resblocks.2")


def truncated_safetensors(tmp, native):
    data = (native / "model.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return ["caption", GOOD, "--model", "coca_tiny", "--pretrained", tmp / "cut.safetensors"], 2, "cut.safetensors"


def empty_labels(tmp, native):
    return ["classify", GOOD, "--labels", " , ", "--pretrained", native], 2, "the label list is empty"


def duplicate_labels(tmp, native):
    return ["classify", GOOD, "--labels", "dog,cat,dog", "--pretrained", native], 2, "duplicate label 'dog'"


def non_utf8_labels_file(tmp, native):
    (tmp / "labels.txt").write_bytes("café\nthé\n".encode("latin-1"))
    return ["classify", GOOD, "--labels-file", tmp / "labels.txt", "--pretrained", native], 2, "not UTF-8"


def csv_missing_columns(tmp, native):
    table = _table(tmp / "pairs.csv", "image,text", [f"{GOOD},a photo"])
    return ["eval", "retrieval", "--data", table, "--pretrained", native], 2, "filepath"


def non_utf8_csv(tmp, native):
    table = _table(tmp / "pairs.csv", "filepath,title", [f"{GOOD},un café noir"], encoding="latin-1")
    return ["train", *FAST_TRAIN, "--data", table, "--output", tmp / "run"], 2, "not UTF-8"


def empty_dataset(tmp, native):
    table = _table(tmp / "pairs.csv", "filepath,title", [])
    return ["train", *FAST_TRAIN, "--data", table, "--output", tmp / "run"], 2, "pairs.csv"


def beams_not_divisible_by_groups(tmp, native):
    return ["caption", GOOD, "--pretrained", native, "--num-beams", "5", "--num-beam-groups", "3"], 2, "--num-beam-groups"


def seq_len_not_above_min_seq_len(tmp, native):
    return ["caption", GOOD, "--pretrained", native, "--seq-len", "5", "--min-seq-len", "5"], 2, "--min-seq-len"


@pytest.mark.parametrize("top_p", ["0", "1.5", "-0.1"])
def test_top_p_outside_0_1_is_a_usage_error(top_p, tiny, capsys):
    code = run_cli("caption", GOOD, "--pretrained", tiny[1], "--generation-type", "top_p", "--top-p", top_p)
    _assert_one_line(capsys.readouterr().err, "--top-p")
    assert code == 2


FATAL = [missing_path, directory_without_images, unknown_model, config_checkpoint_mismatch, truncated_safetensors,
         empty_labels, duplicate_labels, non_utf8_labels_file, csv_missing_columns, non_utf8_csv, empty_dataset,
         beams_not_divisible_by_groups, seq_len_not_above_min_seq_len]


def _assert_one_line(err: str, needle: str):
    assert "Traceback" not in err, err
    assert err.startswith("coca: error: ") and err.count("\n") == 1, err
    assert needle in err, err


@pytest.mark.parametrize("case", FATAL, ids=lambda case: case.__name__)
def test_a_mistake_is_one_line_and_an_exit_code(case, tiny, tmp_path, capsys):
    argv, code, needle = case(tmp_path, tiny[1])
    got = run_cli(*argv)
    _assert_one_line(capsys.readouterr().err, needle)
    assert got == code


BAD_FILES = {
    "zero_byte.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "notes.jpg": (lambda p: p.write_text("this is a text file, not a JPEG\n"), "not an image"),
    "bomb.png": (_bomb, "image too large (10000000000 pixels)"),
}


@pytest.mark.parametrize("name", BAD_FILES)
@pytest.mark.parametrize("command", ["caption", "classify"])
def test_a_bad_file_is_skipped_with_one_line_and_the_rest_still_done(command, name, tiny, tmp_path, capsys):
    make, reason = BAD_FILES[name]
    bad = tmp_path / name
    make(bad)
    good = tmp_path / GOOD.name
    shutil.copy(GOOD, good)
    extra = FAST_CAPTION if command == "caption" else ["--labels", "dog,cat"]
    assert run_cli(command, good, bad, "--pretrained", tiny[1], *extra) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    about_bad = [line for line in captured.err.splitlines() if name in line]
    assert len(about_bad) == 1 and reason in about_bad[0], captured.err
    assert re.fullmatch(r"coca: error: 1 of 2 images could not be (captioned|read)", captured.err.splitlines()[-1])
    assert str(good) in captured.out and str(bad) not in captured.out


def test_over_long_captions_are_truncated_not_an_error(tiny, tmp_path, capsys):
    long_caption = " ".join(["a very long caption about a cup of coffee"] * 40)  # ~400 tokens, context is 32
    table = _table(tmp_path / "pairs.csv", "filepath,title", [f"{p},{long_caption}" for p in PHOTOS[:2]])
    assert run_cli("eval", "retrieval", "--data", table, "--pretrained", tiny[1]) == 0
    assert run_cli("train", *FAST_TRAIN, "--data", table, "--output", tmp_path / "run") == 0
    assert "Traceback" not in capsys.readouterr().err
