"""`coca prepare-coco`: COCO 2014/2017 layouts, Karpathy's split, TSVs, shards and downloads."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from PIL import Image

from conftest import one_error_line, run_cli
from hub_server import LocalServer

# image id -> its five captions; a few carry tabs, newlines, quotes and padding
CAPTIONS = {
    9: ["A plate of food with broccoli.", "Rice and\tchicken on a plate.", "Some food.", "A meal.", "Dinner."],
    25: ["Two giraffes standing in a field.", 'A giraffe says "hi".', "Giraffes.", "Tall animals.", "A zoo."],
    30: ["A cat on a laptop.", "A cat\nsleeping on a computer.", "A cat.", "  A   lazy cat  ", "Kitty."],
    34: ["A man surfing a wave.", "Surfer.", "A wave.", "The ocean.", "A man on a board."],
    36: ["A red bus on a street.", "A bus.", "Double-decker bus.", "London.", "A street."],
    42: ["A dog catching a frisbee.", "A dog.", "Frisbee!", "It's a dog's life.", "A park."],
}
OFFICIAL = {"train": [9, 25], "val": [30, 34, 36, 42]}
# Karpathy's split: train2014 images are "train"; val2014's are "val", "test" or "restval"
KARPATHY = {9: "train", 25: "train", 30: "restval", 34: "restval", 36: "val", 42: "test"}


def image_name(year: str, split: str, image_id: int) -> str:
    return f"COCO_{split}{year}_{image_id:012d}.jpg" if year == "2014" else f"{image_id:012d}.jpg"


def write_jpeg(path: Path, image_id: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), ((image_id * 40) % 256, (image_id * 90) % 256, 128)).save(path, "JPEG")


def annotations(year: str, split: str) -> dict:
    ids = OFFICIAL[split]
    return {"images": [{"id": i, "file_name": image_name(year, split, i)} for i in ids],
            "annotations": [{"id": 1000 * i + n, "image_id": i, "caption": c}
                            for i in ids for n, c in enumerate(CAPTIONS[i])]}


def official_split(image_id: int) -> str:
    return "val" if image_id in OFFICIAL["val"] else "train"


def karpathy_file() -> dict:
    images = []
    for image_id, split in KARPATHY.items():
        folder = official_split(image_id)
        images.append({"filepath": f"{folder}2014", "filename": image_name("2014", folder, image_id),
                       "cocoid": image_id, "split": split,
                       "sentences": [{"raw": c, "tokens": c.lower().split()} for c in CAPTIONS[image_id]]})
    return {"images": images, "dataset": "coco"}


def make_coco(root: Path, year: str = "2014", images: bool = True, karpathy: bool = False) -> Path:
    """A COCO-shaped folder: annotations, images and, optionally, dataset_coco.json."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in OFFICIAL:
        (root / "annotations" / f"captions_{split}{year}.json").write_text(json.dumps(annotations(year, split)))
    if images:
        for split, ids in OFFICIAL.items():
            for image_id in ids:
                write_jpeg(root / f"{split}{year}" / image_name(year, split, image_id), image_id)
    if karpathy:
        (root / "dataset_coco.json").write_text(json.dumps(karpathy_file()))
    return root


def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def error_line(capsys) -> str:
    """The one error line, after any progress lines, and no traceback."""
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("coca: error: "), lines
    assert not any("Traceback" in line or line.startswith("coca: error") for line in lines[:-1]), lines
    return lines[-1]


# -- layouts -----------------------------------------------------------------------------------

def test_official_2017_layout(tmp_path, capsys):
    root = make_coco(tmp_path / "coco", "2017")
    assert run_cli("prepare-coco", "--root", root, "--split-style", "official") == 0
    rows = read_tsv(root / "train2017.tsv")
    assert list(rows[0]) == ["filepath", "title"]
    assert [r["filepath"] for r in rows] == ["train2017/000000000009.jpg"] * 5 + ["train2017/000000000025.jpg"] * 5
    assert [r["title"] for r in rows] == ["A plate of food with broccoli.", "Rice and chicken on a plate."] + \
        CAPTIONS[9][2:] + CAPTIONS[25]
    assert len(read_tsv(root / "val2017.tsv")) == 20
    assert "val2017.tsv: 4 images, 20 captions" in capsys.readouterr().err


def test_official_2014_layout_cleans_captions_and_quotes(tmp_path):
    root = make_coco(tmp_path / "coco", "2014")
    assert run_cli("prepare-coco", "--root", root, "--split-style", "official", "--output", tmp_path / "out") == 0
    rows = read_tsv(tmp_path / "out" / "val2014.tsv")
    assert rows[0]["filepath"] == "../coco/val2014/COCO_val2014_000000000030.jpg"  # relative to the TSV
    titles = [r["title"] for r in rows]
    assert "A cat sleeping on a computer." in titles and "A lazy cat" in titles  # whitespace normalised
    assert "It's a dog's life." in titles
    assert 'A giraffe says "hi".' in [r["title"] for r in read_tsv(tmp_path / "out" / "train2014.tsv")]
    text = (tmp_path / "out" / "val2014.tsv").read_text()
    assert text.count("\n") == 1 + 20  # one line per caption: no tab or newline left inside a caption
    import pandas as pd  # the reader open_clip's CsvDataset uses

    for name in ("train2014.tsv", "val2014.tsv"):
        frame = pd.read_csv(tmp_path / "out" / name, sep="\t")
        assert list(frame["title"]) == [r["title"] for r in read_tsv(tmp_path / "out" / name)]
        assert all((tmp_path / "out" / p).is_file() for p in frame["filepath"])


def test_both_releases_give_four_files(tmp_path):
    root = make_coco(tmp_path / "coco", "2014")
    make_coco(root, "2017")
    assert run_cli("prepare-coco", "--root", root, "--split-style", "official") == 0
    assert sorted(p.name for p in root.glob("*.tsv")) == ["train2014.tsv", "train2017.tsv", "val2014.tsv", "val2017.tsv"]
    assert run_cli("prepare-coco", "--root", root, "--split-style", "official", "--year", "2017", "--splits", "val",
                   "--output", tmp_path / "only") == 0
    assert [p.name for p in (tmp_path / "only").glob("*.tsv")] == ["val2017.tsv"]


def test_karpathy_split(tmp_path):
    root = make_coco(tmp_path / "coco", "2014", karpathy=True)
    assert run_cli("prepare-coco", "--root", root) == 0  # auto: Karpathy's file is there
    split_of = {}
    for split in ("train", "val", "test"):
        for row in read_tsv(root / f"karpathy_{split}.tsv"):
            split_of.setdefault(row["filepath"], split)
    expected = {f"{official_split(i)}2014/{image_name('2014', official_split(i), i)}":
                {"restval": "train"}.get(s, s) for i, s in KARPATHY.items()}
    assert split_of == expected
    test = read_tsv(root / "karpathy_test.tsv")
    assert [r["title"] for r in test] == [" ".join(c.split()) for c in CAPTIONS[42]]


def test_karpathy_split_on_2017_images(tmp_path):
    root = make_coco(tmp_path / "coco", "2017", karpathy=True)
    assert run_cli("prepare-coco", "--root", root, "--absolute", "--splits", "val,test") == 0
    rows = read_tsv(root / "karpathy_val.tsv")
    assert {r["filepath"] for r in rows} == {str((root / "val2017" / "000000000036.jpg").resolve())}
    assert not (root / "karpathy_train.tsv").exists()


def test_missing_images_are_counted_and_left_out(tmp_path, capsys):
    root = make_coco(tmp_path / "coco", "2014", karpathy=True)
    (root / "val2014" / image_name("2014", "val", 42)).unlink()
    assert run_cli("prepare-coco", "--root", root) == 1
    err = capsys.readouterr().err
    assert "karpathy_test: 1 of 1 images not found, left out" in err
    assert err.strip().splitlines()[-1].startswith("coca: error: 1 images listed in the annotations are missing")
    assert read_tsv(root / "karpathy_test.tsv") == []
    assert len(read_tsv(root / "karpathy_val.tsv")) == 5


def shard_folder(folder: Path) -> dict:
    """{file name: samples per sizes.json, or None for a shard it does not list}, of everything in ``folder``."""
    sizes = json.loads((folder / "sizes.json").read_text())
    return {p.name: sizes.get(p.name) for p in sorted(folder.iterdir()) if p.name != "sizes.json"}


def test_webdataset_shards(tmp_path, capsys):
    import webdataset as wds

    root = make_coco(tmp_path / "coco", "2014", karpathy=True)
    shards = tmp_path / "shards"
    assert run_cli("prepare-coco", "--root", root, "--shards", shards, "--shard-size", "3") == 0
    assert sorted(p.name for p in shards.iterdir()) == ["karpathy_test", "karpathy_train", "karpathy_val"]
    assert shard_folder(shards / "karpathy_train") == {"karpathy_train-000000.tar": 3, "karpathy_train-000001.tar": 1}
    assert shard_folder(shards / "karpathy_val") == {"karpathy_val-000000.tar": 1}
    assert f"2 shards in {shards / 'karpathy_train'}/" in capsys.readouterr().err
    samples = list(wds.WebDataset([str(p) for p in sorted((shards / "karpathy_train").glob("*.tar"))],
                                  shardshuffle=False))
    assert [s["__key__"] for s in samples] == [Path(image_name("2014", official_split(i), i)).stem
                                               for i in (9, 25, 30, 34)]
    first = samples[0]
    assert first["jpg"] == (root / "train2014" / image_name("2014", "train", 9)).read_bytes()
    assert first["txt"].decode() == CAPTIONS[9][0]
    meta = json.loads(first["json"])
    assert meta["image_id"] == 9 and meta["captions"][1] == "Rice and chicken on a plate."


def test_official_split_folders_and_a_rerun_with_another_shard_size(tmp_path):
    root = make_coco(tmp_path / "coco", "2014")
    shards = tmp_path / "shards"
    args = ["prepare-coco", "--root", root, "--split-style", "official", "--shards", shards]
    assert run_cli(*args, "--shard-size", "1") == 0
    assert sorted(p.name for p in shards.iterdir()) == ["train2014", "val2014"]
    assert shard_folder(shards / "val2014") == {f"val2014-00000{i}.tar": 1 for i in range(4)}
    (shards / "val2014" / ".val2014-000007.tar.k3x_9a2q.tmp").write_bytes(b"half")  # left by a run that was killed
    (shards / "val2014" / "notes.txt").write_text("mine")  # not a shard: kept
    assert run_cli(*args, "--shard-size", "3") == 0
    assert shard_folder(shards / "val2014") == {"notes.txt": None, "val2014-000000.tar": 3, "val2014-000001.tar": 1}
    assert shard_folder(shards / "train2014") == {"train2014-000000.tar": 2}


def test_an_interrupted_rerun_leaves_complete_shards_and_no_wrong_count(tmp_path, monkeypatch, capsys):
    import webdataset as wds

    from coca_cli.data import coco

    root = make_coco(tmp_path / "coco", "2014")
    val = tmp_path / "shards" / "val2014"
    args = ["prepare-coco", "--root", root, "--split-style", "official", "--splits", "val", "--shards", val.parent]
    assert run_cli(*args, "--shard-size", "1") == 0
    members, add = [], coco._add

    def ctrl_c_in_the_second_shard(tar, name, data):  # the first shard of the rerun holds 3 images, 9 members
        members.append(name)
        if len(members) == 11:
            raise KeyboardInterrupt
        add(tar, name, data)

    monkeypatch.setattr(coco, "_add", ctrl_c_in_the_second_shard)
    assert run_cli(*args, "--shard-size", "3") == 130
    monkeypatch.undo()
    assert sorted(p.name for p in val.iterdir()) == [f"val2014-00000{i}.tar" for i in range(4)]  # no sizes.json
    for shard in val.iterdir():  # the new first shard and the old others: each complete
        assert len(list(wds.WebDataset(str(shard), shardshuffle=False))) == (3 if shard.name.endswith("0.tar") else 1)
    capsys.readouterr()
    assert run_cli("train", "--data", val, "--model", "coca_tiny", "--output", tmp_path / "run") == 2
    assert "--train-num-samples" in one_error_line(capsys)  # rather than an epoch length that is wrong
    assert run_cli(*args, "--shard-size", "3") == 0
    assert shard_folder(val) == {"val2014-000000.tar": 3, "val2014-000001.tar": 1}


def test_train_on_a_split_folder_without_train_num_samples(tmp_path):
    root = make_coco(tmp_path / "coco", "2014", karpathy=True)
    assert run_cli("prepare-coco", "--root", root, "--splits", "train", "--shards", tmp_path / "shards",
                   "--shard-size", "3") == 0
    run = tmp_path / "run"
    assert run_cli("train", "--data", tmp_path / "shards" / "karpathy_train", "--model", "coca_tiny", "--workers", "0",
                   "--precision", "fp32", "--batch-size", "2", "--epochs", "1", "--warmup", "1",
                   "--log-every-n-steps", "1", "--output", run) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"]) for r in rows] == [(1, 2), (2, 4)]  # Karpathy's 4 train images, one epoch
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("make, args, message", [
    (lambda root: root.mkdir(), [], "no COCO caption annotations"),
    (lambda root: make_coco(root), ["--split-style", "karpathy"], "no Karpathy split file"),
    (lambda root: make_coco(root), ["--split-style", "fancy"], "unknown split style 'fancy'"),
    (lambda root: make_coco(root), ["--split-style", "official", "--splits", "test"], "unknown split 'test'"),
    (lambda root: make_coco(root), ["--split-style", "official", "--year", "2017"], "no caption annotations"),
    (lambda root: None, [], "no such folder"),
])
def test_bad_input_is_one_line(tmp_path, capsys, make, args, message):
    root = tmp_path / "coco"
    make(root)
    assert run_cli("prepare-coco", "--root", root, *args) == 2
    assert message in one_error_line(capsys)


def test_help_has_an_example(capsys):
    assert run_cli("prepare-coco", "--help") == 0
    assert "Example: coca prepare-coco --root" in capsys.readouterr().out


def test_broken_annotation_file_is_one_line(tmp_path, capsys):
    root = make_coco(tmp_path / "coco", images=False)
    (root / "annotations" / "captions_val2014.json").write_text('{"images": [')
    assert run_cli("prepare-coco", "--root", root, "--split-style", "official") == 2
    assert "captions_val2014.json" in one_error_line(capsys)


# -- downloads -----------------------------------------------------------------------------------

class ArchiveServer(LocalServer):
    """Serves archives on 127.0.0.1 with Range support; can cut a response short once."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.cut_after: dict[str, int] = {}  # path -> bytes to send before dropping the connection (once)
        self.ranges = True  # False: answer every request with the whole file, like servers without Range support
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(("GET", self.path, self.headers.get("Range", "")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                if server.ranges and self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

        super().__init__(Handler)

    def gets(self, path: str) -> list[str]:
        return [r for m, p, r in self.requests if m == "GET" and p == path]


def zip_of(folder: Path, names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name in names:
            zf.write(folder / name, name)
    return buffer.getvalue()


@pytest.fixture
def coco_archives(tmp_path):
    """The official archives (and Karpathy's) of the tiny COCO, as bytes keyed by URL path."""
    source = make_coco(tmp_path / "source", "2014", karpathy=True)
    files = {}
    for split in ("train", "val"):
        names = sorted(str(p.relative_to(source)) for p in (source / f"{split}2014").iterdir())
        files[f"/zips/{split}2014.zip"] = zip_of(source, names)
    (source / "annotations" / "instances_val2014.json").write_text("{}")  # not extracted
    files["/annotations/annotations_trainval2014.zip"] = zip_of(
        source, ["annotations/captions_train2014.json", "annotations/captions_val2014.json",
                 "annotations/instances_val2014.json"])
    files["/karpathy/caption_datasets.zip"] = zip_of(source, ["dataset_coco.json"])
    return files


def download_args(server, root):
    return ["prepare-coco", "--root", root, "--download", "--base-url", server.url,
            "--karpathy-url", f"{server.url}/karpathy/caption_datasets.zip"]


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") or p.suffix in (".part", ".zip"))


def test_download_extract_and_prepare(tmp_path, coco_archives, capsys):
    root = tmp_path / "coco"
    with ArchiveServer(coco_archives) as server:
        assert run_cli(*download_args(server, root)) == 0
        assert sorted(p for p in root.iterdir() if p.is_dir()) == [root / "annotations", root / "train2014",
                                                                    root / "val2014"]
        assert not (root / "annotations" / "instances_val2014.json").exists()  # only the captions
        assert leftovers(root) == []  # archives deleted once extracted, no temporary folders
        assert len(read_tsv(root / "karpathy_test.tsv")) == 5
        # a second run finds everything in place and downloads nothing
        server.requests.clear()
        assert run_cli(*download_args(server, root)) == 0
        assert server.requests == []
    assert "already there" in capsys.readouterr().err


def test_download_only_what_the_splits_need(tmp_path, coco_archives):
    root = tmp_path / "coco"
    with ArchiveServer(coco_archives) as server:
        assert run_cli(*download_args(server, root), "--splits", "val,test") == 0
        assert not server.gets("/zips/train2014.zip") and (root / "val2014").is_dir()
        assert sorted(p.name for p in root.glob("*.tsv")) == ["karpathy_test.tsv", "karpathy_val.tsv"]


def test_resumes_a_partial_download(tmp_path, coco_archives):
    root = tmp_path / "coco"
    root.mkdir()
    data = coco_archives["/zips/val2014.zip"]
    (root / "val2014.zip.part").write_bytes(data[:1000])
    with ArchiveServer(coco_archives) as server:
        assert run_cli(*download_args(server, root), "--splits", "val", "--keep-archives") == 0
        assert server.gets("/zips/val2014.zip") == ["bytes=1000-"]
    assert (root / "val2014.zip").read_bytes() == data
    assert len(list((root / "val2014").iterdir())) == 4


@pytest.mark.parametrize("part, ranges", [(b"x" * 5000, True), (b"garbage", False)])
def test_a_stale_partial_file_is_replaced(tmp_path, coco_archives, part, ranges):
    # longer than the file (the server answers 416), or a server that ignores Range (200)
    root = tmp_path / "coco"
    root.mkdir()
    (root / "val2014.zip.part").write_bytes(part)
    with ArchiveServer(coco_archives) as server:
        server.ranges = ranges
        assert run_cli(*download_args(server, root), "--splits", "val", "--keep-archives") == 0
    assert (root / "val2014.zip").read_bytes() == coco_archives["/zips/val2014.zip"]
    assert len(list((root / "val2014").iterdir())) == 4


def test_interrupted_download_is_resumed_by_the_next_run(tmp_path, coco_archives, capsys):
    root = tmp_path / "coco"
    data = coco_archives["/zips/val2014.zip"]
    with ArchiveServer(coco_archives) as server:
        server.cut_after["/zips/val2014.zip"] = 1500
        assert run_cli(*download_args(server, root), "--splits", "val") == 1
        err = error_line(capsys)
        assert "val2014.zip" in err and "run the same command again to resume" in err
        assert (root / "val2014.zip.part").stat().st_size == 1500 and not (root / "val2014").exists()
        assert run_cli(*download_args(server, root), "--splits", "val") == 0
        assert server.gets("/zips/val2014.zip") == ["", "bytes=1500-"]
    assert len(list((root / "val2014").iterdir())) == 4 and leftovers(root) == []
    assert len(data) > 1500


def test_truncated_archive_leaves_nothing_behind(tmp_path, coco_archives, capsys):
    root = tmp_path / "coco"
    coco_archives["/zips/val2014.zip"] = coco_archives["/zips/val2014.zip"][:-200]  # the server's copy is bad
    with ArchiveServer(coco_archives) as server:
        assert run_cli(*download_args(server, root), "--splits", "val") == 1
    err = error_line(capsys)
    assert "val2014.zip is corrupt or truncated" in err and "nothing was extracted" in err
    assert not (root / "val2014").exists() and leftovers(root) == []
    assert (root / "annotations" / "captions_val2014.json").is_file()  # the archives before it are fine


def test_archive_with_a_bad_member_leaves_nothing_behind(tmp_path, coco_archives, capsys):
    root = tmp_path / "coco"
    data = bytearray(coco_archives["/zips/val2014.zip"])
    data[200] ^= 0xFF  # inside the first image: its CRC check fails mid-extraction
    coco_archives["/zips/val2014.zip"] = bytes(data)
    with ArchiveServer(coco_archives) as server:
        assert run_cli(*download_args(server, root), "--splits", "val") == 1
    assert "corrupt or truncated" in error_line(capsys)
    assert not (root / "val2014").exists() and leftovers(root) == []


def test_missing_archive_is_one_line(tmp_path, coco_archives, capsys):
    del coco_archives["/zips/val2014.zip"]
    with ArchiveServer(coco_archives) as server:
        assert run_cli(*download_args(server, tmp_path / "coco"), "--splits", "val") == 1
    assert "HTTP 404" in error_line(capsys)
