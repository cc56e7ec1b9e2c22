"""Issue 13, classes 1, 4, 5 and 8 for results files: a file under its final name is whole; a
file coca did not write is never replaced; a damaged --resume file is repaired or refused, never
trusted into duplicates; line formats and tables read back exactly what was written."""

import gzip
import io
import json
import shutil
import tarfile

import pytest
from PIL import Image

from conftest import PHOTOS, ROOT, one_error_line, run_cli

FAST = ["--seq-len", "6", "--min-seq-len", "2", "--num-beams", "2", "--num-beam-groups", "1"]
HOSTILE_NAMES = ["tab\there.png", "new\nline.png", "carriage\rreturn.png", "back\\slash\\t.png", "plain.png"]


@pytest.fixture(scope="module")
def native(tiny):
    return str(tiny[1])


def _tar(samples) -> bytes:
    """A whole tar: members, then the end-of-archive marker."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- class 1: a shard read short never gets a finished output ---------------------------------------

MEMBER = 8192  # bytes of each member's data: a multiple of tar's 512-byte blocks, so the cuts land as named
CUTS = {  # (the shard's bytes cut short, its suffix)
    "in a header": (lambda tar: tar[:512 + MEMBER + 100], ".tar"),
    "in member data": (lambda tar: tar[:512 + 300], ".tar"),
    "at a member boundary": (lambda tar: tar[:2 * (512 + MEMBER)], ".tar"),  # the end-of-archive marker missing
    "in a gzip stream": (lambda tar: gzip.compress(tar)[:len(gzip.compress(tar)) // 2], ".tar.gz"),
}


@pytest.mark.parametrize("cut", CUTS)
def test_a_shard_cut_short_is_an_error_gets_no_output_and_is_retried(cut, native, tmp_path, capsys):
    shorten, suffix = CUTS[cut]
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(png, "PNG")
    image = png.getvalue().ljust(MEMBER, b"\0")  # bytes after a PNG's end are ignored
    whole = _tar([("a.png", image), ("b.png", image)])
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "good.tar").write_bytes(_tar([("g.jpg", PHOTOS[0].read_bytes())]))
    damaged = shards / f"cut{suffix}"
    damaged.write_bytes(shorten(whole))
    out = tmp_path / "captions"
    args = ["caption", "--data", f"{shards / 'good.tar'}::{damaged}", "--output", out, "--pretrained", native, *FAST]

    assert run_cli(*args) == 1
    err = capsys.readouterr().err.splitlines()
    naming = [line for line in err if str(damaged) in line]
    assert len(naming) == 1 and naming[0].startswith(f"shard {damaged} is cut short or damaged (")
    assert naming[0].endswith("): no captions written for it")
    assert err[-1] == "coca: error: 1 of 2 shards could not be read whole; run again to retry them"
    assert sorted(p.name for p in out.iterdir()) == ["good.jsonl"]  # no final name, no .part left behind
    good = (out / "good.jsonl").read_text()

    damaged.write_bytes(whole if suffix == ".tar" else gzip.compress(whole))  # fetched again, whole
    assert run_cli(*args) == 0
    assert capsys.readouterr().err.strip() == f"{damaged.name}: 2 captioned"  # good.tar was not redone
    assert (out / "good.jsonl").read_text() == good
    finished = out / ("cut.jsonl" if suffix == ".tar" else "cut.tar.gz.jsonl")
    assert [json.loads(line)["key"] for line in finished.read_text().splitlines()] == ["a", "b"]


def test_a_failed_run_leaves_the_earlier_results_as_they_were(native, tmp_path, capsys):
    """Captions and classifications are replaced only once a new result exists: a run that stops
    before (here: weights that do not exist) keeps the earlier file whole."""
    jsonl, tsv = tmp_path / "captions.jsonl", tmp_path / "labels.tsv"
    assert run_cli("caption", PHOTOS[0], "--pretrained", native, *FAST, "--output", jsonl) == 0
    assert run_cli("classify", PHOTOS[0], "--labels", "a,b", "--pretrained", native, "--output", tsv) == 0
    before = {path: path.read_bytes() for path in (jsonl, tsv)}
    capsys.readouterr()
    for args in (["caption", *PHOTOS, "--output", jsonl], ["caption", *PHOTOS, "--output", jsonl, "--resume"],
                 ["classify", *PHOTOS, "--labels", "x,y", "--output", tsv]):
        assert run_cli(*args, "--pretrained", tmp_path / "missing.safetensors") == 2
        one_error_line(capsys)
    assert {path: path.read_bytes() for path in before} == before


# -- classes 4/5: never replace a file coca did not write ------------------------------------------

def _foreign_files(tmp_path):
    """Files a slip of the keyboard could name: a photo, weights, a data table, notes, a model config."""
    files = {
        "photo.jsonl": PHOTOS[0].read_bytes(),
        "weights.jsonl": (ROOT / "coca_cli" / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()[:4096],
        "pairs.tsv": b"filepath\ttitle\nimg/a.jpg\ta dog\n",
        "people.csv": b"name,email\nada,ada@example.org\n",
        "notes.txt": "shopping list\nmilk\n".encode(),
        "config.json": (ROOT / "models" / "coca_tiny.json").read_bytes(),
        "binary.json": bytes(range(256)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


@pytest.mark.parametrize("command", ["caption", "classify", "retrieve", "eval retrieval", "eval captions"])
def test_an_output_file_coca_did_not_write_is_refused_untouched(command, tmp_path, capsys):
    files = _foreign_files(tmp_path)
    (tmp_path / "refs.tsv").write_text(f"filepath\ttitle\n{PHOTOS[0]}\ta photo\n")
    missing = tmp_path / "missing.safetensors"  # the refusal must come before any model loads
    base = {"caption": ["caption", PHOTOS[0], "--pretrained", missing],
            "classify": ["classify", PHOTOS[0], "--labels", "a,b", "--pretrained", missing],
            "retrieve": ["retrieve", "--images", PHOTOS[0], "--query", "a dog", "--pretrained", missing],
            "eval retrieval": ["eval", "retrieval", "--data", tmp_path / "refs.tsv", "--pretrained", missing],
            "eval captions": ["eval", "captions", "--data", tmp_path / "refs.tsv", "--pretrained", missing]}[command]
    suffixes = {"caption": (".jsonl", ".tsv", ".csv", ".txt"), "classify": (".jsonl", ".tsv", ".csv"),
                "retrieve": (".jsonl", ".tsv", ".csv")}.get(command, (".json",))
    targets = [name for name in files if name.endswith(suffixes)]
    assert len(targets) >= 2
    for name in targets:
        assert run_cli(*base, "--output", tmp_path / name) == 2, name
        assert f"--output {tmp_path / name} exists and is not a" in one_error_line(capsys)
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


def test_a_damaged_resume_file_is_refused_or_repaired_never_duplicated(native, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in PHOTOS:
        shutil.copy(p, photos / p.name)
    done = [str(photos / p.name) for p in PHOTOS[:2]]
    lines = [json.dumps({"image": image, "caption": "earlier"}) + "\n" for image in done]
    out = tmp_path / "c.jsonl"
    garbled = {"a garbled middle line": (lines[0] + '{"image": "x", "cap\n' + lines[1], "line 2: not valid JSON"),
               "a line that is not an object": (lines[0] + '["x", "y"]\n' + lines[1], "line 2: expected a JSON object"),
               "bytes that are not UTF-8": (lines[0] + "caf\xe9\n" + lines[1], "line 2: not UTF-8 text")}
    for text, message in garbled.values():
        out.write_bytes(text.encode("latin-1"))
        assert run_cli("caption", photos, "--pretrained", native, *FAST, "--output", out, "--resume") == 2
        assert message in one_error_line(capsys)
        assert out.read_bytes() == text.encode("latin-1")

    for name, cut in {"c.jsonl": lines[1][:-9], "c.txt": f"{done[1]}\tearl", "c.csv": f'"{done[1]}","earl'}.items():
        out = tmp_path / name
        header = {"c.jsonl": "", "c.txt": "", "c.csv": "image,caption\n"}[name]
        first = {"c.jsonl": lines[0], "c.txt": f"{done[0]}\tearlier\n", "c.csv": f"{done[0]},earlier\n"}[name]
        out.write_text(header + first + cut)
        assert run_cli("caption", photos, "--pretrained", native, *FAST, "--output", out, "--resume") == 0
        err = capsys.readouterr().err.splitlines()
        assert err == [f"warning: line {2 if not header else 3} of {out} was left unfinished by an interrupted run: "
                       "it is dropped and its image captioned again"], name
        assert out.read_text().startswith(header + first)
        images = [image for image, _ in _read_back(out)]
        assert sorted(images) == sorted(str(photos / p.name) for p in PHOTOS), name  # each once


# -- class 2's share: JSON writers never emit a bare NaN --------------------------------------------

def test_a_non_finite_score_is_never_written_as_json(native, tmp_path, monkeypatch, capsys):
    from coca_cli.tasks import retrieval

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("filepath\ttitle\n" + "".join(f"{p}\ta photo {i}\n" for i, p in enumerate(PHOTOS)))
    out = tmp_path / "results.json"
    assert run_cli("eval", "retrieval", "--data", pairs, "--pretrained", native, "--output", out) == 0
    earlier = out.read_bytes()
    capsys.readouterr()
    recall = retrieval.retrieval_recall
    for bad in (float("nan"), float("inf")):
        monkeypatch.setattr(retrieval, "retrieval_recall",
                            lambda *args, bad=bad, **kwargs: {**recall(*args, **kwargs), "image_retrieval_recall@1": bad})
        assert run_cli("eval", "retrieval", "--data", pairs, "--pretrained", native, "--output", out) == 1
        captured = capsys.readouterr()
        assert "NaN" not in captured.out and "Infinity" not in captured.out
        err = captured.err
        assert err.startswith("coca: error: ") and err.count("\n") == 1 and "non-finite" in err, err
        assert f"dataset {pairs}" in err  # names the record
        assert out.read_bytes() == earlier


# -- class 8: names with tabs and newlines, and one table parser -----------------------------------

def _read_back(path):
    """(image, caption) pairs of a captions file, read as coca's own readers do."""
    from coca_cli.tasks.caption_eval import read_predictions

    return list(read_predictions(path).items())


@pytest.fixture
def hostile(tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name in HOSTILE_NAMES:
        shutil.copy(PHOTOS[0], folder / name)
    return folder


def test_file_names_with_tabs_and_newlines_stay_on_their_line_and_resume_never_duplicates(native, hostile, tmp_path,
                                                                                         capsys):
    expected = sorted(str(hostile / name) for name in HOSTILE_NAMES)
    assert run_cli("caption", hostile, "--pretrained", native, *FAST) == 0
    lines = capsys.readouterr().out.split("\n")[:-1]
    assert len(lines) == len(HOSTILE_NAMES) and all(line.count("\t") == 1 and "\r" not in line for line in lines)
    from coca_cli.tasks.output import unescape_field

    assert sorted(unescape_field(line.split("\t")[0]) for line in lines) == expected
    assert "\\\\t.png" in "".join(lines)  # a backslash before a "t" stays a backslash, not a tab

    for suffix in (".txt", ".tsv", ".csv", ".jsonl"):
        out = tmp_path / f"captions{suffix}"
        assert run_cli("caption", hostile, "--pretrained", native, *FAST, "--output", out) == 0
        assert sorted(image for image, _ in _read_back(out)) == expected, suffix
        written = out.read_bytes()
        capsys.readouterr()
        assert run_cli("caption", hostile, "--pretrained", native, *FAST, "--output", out, "--resume") == 0
        assert f"all {len(HOSTILE_NAMES)} images are already captioned" in capsys.readouterr().err, suffix
        assert out.read_bytes() == written


@pytest.mark.parametrize("row, line, message", [
    ("{img},a dog, running on the beach", 3, "3 fields where the header has 2"),
    ("{img}", 3, "1 field where the header has 2"),
    ('{img},"a dog" running', 3, "not a well-formed table row"),
    ('{img},"a dog running', 3, "not a well-formed table row"),
])
def test_a_malformed_table_row_is_the_same_error_naming_its_line_everywhere(row, line, message, native, tmp_path,
                                                                            capsys):
    table = tmp_path / "pairs.csv"
    table.write_text(f"filepath,title\n{PHOTOS[0]},a photo\n{row.format(img=PHOTOS[1])}\n{PHOTOS[2]},a cat\n")
    predictions = tmp_path / "predictions.csv"
    predictions.write_text(f"image,caption\n{PHOTOS[0]},a photo\n{row.format(img=PHOTOS[1])}\n")
    for args in (["eval", "retrieval", "--data", table, "--pretrained", native],
                 ["eval", "captions", "--data", table, "--pretrained", native],
                 ["eval", "captions", "--data", tmp_path / "ok.tsv", "--predictions", predictions],
                 ["train", "--model", "coca_tiny", "--data", table, "--output", tmp_path / "run"]):
        (tmp_path / "ok.tsv").write_text(f"filepath\ttitle\n{PHOTOS[0]}\ta photo\n")
        assert run_cli(*args) == 2, args
        err = one_error_line(capsys)
        source = predictions if "--predictions" in args else table
        assert f"{source}, line {line}: {message}" in err, err
    assert not (tmp_path / "run").exists()

    from coca_cli.data.tables import read_pairs, read_table

    table.write_text('filepath,title\na.jpg,"a dog, running"\nb.jpg,"two\nlines"\n')  # quoted: read whole
    assert read_pairs(table).captions == ["a dog, running", "two\nlines"]
    assert read_table(str(table), "filepath", "title", None)[1] == ["a dog, running", "two\nlines"]
