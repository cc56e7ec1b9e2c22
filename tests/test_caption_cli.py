"""`coca caption` end to end on real photos with a converted random-weight model."""

import csv
import json
import shutil

import pytest

from conftest import ROOT, run_cli

PHOTOS = sorted((ROOT / "examples" / "images").glob("*.jpg"))
FAST = ["--seq-len", "8", "--min-seq-len", "2", "--num-beams", "2", "--num-beam-groups", "1"]


@pytest.fixture(scope="module")
def tiny(converted):
    return str(converted("coca_tiny")[1])


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in PHOTOS:
        shutil.copy(p, folder / p.name)
    return folder


def test_captions_a_folder_as_tsv(tiny, photos, capsys):
    assert run_cli("caption", photos, "--pretrained", tiny, *FAST) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(photos / p.name) for p in PHOTOS]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)


def test_same_captions_as_python_api(tiny, capsys):
    import torch

    from coca_cli import create_model_and_transforms, decode
    from coca_cli.transforms import load_image

    assert run_cli("caption", *PHOTOS, "--pretrained", tiny, *FAST, "--batch-size", "2") == 0
    cli = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    model, _, transform = create_model_and_transforms(None, pretrained=tiny)
    images = torch.stack([transform(load_image(p)) for p in PHOTOS])
    tokens = model.generate(images, seq_len=8, min_seq_len=2, num_beams=2, num_beam_groups=1)
    assert [cli[str(p)] for p in PHOTOS] == [decode(t) for t in tokens]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_output_file_formats(tiny, photos, tmp_path, suffix):
    out = tmp_path / f"captions{suffix}"
    assert run_cli("caption", photos, "--pretrained", tiny, *FAST, "--output", out) == 0
    text = out.read_text()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines()]
        assert {r["image"] for r in rows} == {str(photos / p.name) for p in PHOTOS}
        assert all(r["caption"] for r in rows)
    elif suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        assert rows[0] == ["image", "caption"] and len(rows) == 1 + len(PHOTOS)
    else:
        assert len(text.splitlines()) == len(PHOTOS)


def test_json_lines_on_stdout(tiny, photos, capsys):
    assert run_cli("caption", photos / "coffee.jpg", "--pretrained", tiny, *FAST, "--json") == 0
    row = json.loads(capsys.readouterr().out)
    assert row["image"].endswith("coffee.jpg") and isinstance(row["caption"], str)


def test_bad_files_are_reported_and_the_rest_captioned(tiny, photos, tmp_path, capsys):
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.jpg").write_text("this is not an image")
    data = (photos / "chelsea.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 3])
    out = tmp_path / "c.jsonl"
    assert run_cli("caption", photos, "--pretrained", tiny, *FAST, "--output", out) == 1
    err = capsys.readouterr().err.splitlines()
    assert sorted(line.split(":")[0] for line in err[:-1]) == sorted(
        f"skipped {photos / n}" for n in ("empty.jpg", "notes.jpg", "truncated.jpg"))
    assert "empty file" in "\n".join(err) and "not an image" in "\n".join(err)
    assert err[-1] == "coca: error: 3 of 6 images could not be captioned"
    assert len(out.read_text().splitlines()) == len(PHOTOS)


def test_resume_skips_done_images_and_repairs_a_cut_line(tiny, photos, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert run_cli("caption", photos / "astronaut.jpg", "--pretrained", tiny, *FAST, "--output", out) == 0
    first = out.read_text()
    with open(out, "a") as f:
        f.write('{"image": "' + str(photos / "chelsea.jpg") + '", "capt')  # killed mid-write
    assert run_cli("caption", photos, "--pretrained", tiny, *FAST, "--output", out, "--resume") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.read_text().startswith(first)
    assert sorted(r["image"] for r in rows) == sorted(str(photos / p.name) for p in PHOTOS)
    capsys.readouterr()
    assert run_cli("caption", photos, "--pretrained", tiny, *FAST, "--output", out, "--resume") == 0
    assert "already captioned" in capsys.readouterr().err


def test_seeded_sampling_is_reproducible(tiny, photos, capsys):
    args = ["caption", photos, "--pretrained", tiny, "--generation-type", "top_p", "--top-p", "0.9",
            "--temperature", "1.5", "--seq-len", "10", "--seed", "3"]
    assert run_cli(*args) == 0
    first = capsys.readouterr().out
    assert run_cli(*args) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("args, message", [
    (["--num-beams", "5", "--num-beam-groups", "3"], "num_beams"),
    (["--seq-len", "5", "--min-seq-len", "5"], "seq_len"),
    (["--generation-type", "top_p", "--top-p", "1.5"], "top_p"),
])
def test_invalid_generation_settings_are_one_line(tiny, args, message, capsys):
    assert run_cli("caption", PHOTOS[0], "--pretrained", tiny, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("coca: error:")


def test_unsupported_output_type(tiny, tmp_path, capsys):
    assert run_cli("caption", PHOTOS[0], "--pretrained", tiny, "--output", tmp_path / "c.xlsx") == 2
    assert "unsupported output file type" in capsys.readouterr().err
