"""Issue 13, class 3 and the `.part` download of class 9: `coca prepare-coco` reads no file outside
--root whatever paths its annotation files name, and a partial download the server will not continue
is started again rather than failing the same way on every run."""

from __future__ import annotations

import json
import tarfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from conftest import run_cli
from hub_server import LocalServer
from test_coco_prepare import (ArchiveServer, annotations, image_name, karpathy_file, make_coco, read_tsv, write_jpeg,
                               zip_of)
from test_coco_prepare import coco_archives  # noqa: F401 - the archives fixture


@pytest.fixture
def secret(tmp_path) -> Path:
    """An image outside every COCO root of these tests: it must never be read into a TSV or shard."""
    path = tmp_path / "outside" / "secret.jpg"
    write_jpeg(path, 99)
    return path


def outside_lines(err: str, root: Path, offenders: dict[int, str]) -> None:
    """One line per offender naming its image id and (quoted) path, and a final count line."""
    lines = err.splitlines()
    assert not any("Traceback" in line for line in lines), err
    for image_id, listed in offenders.items():
        hits = [line for line in lines if f"image {image_id} left out" in line]
        assert len(hits) == 1, (image_id, err)
        assert repr(listed)[1:-1] in hits[0] and f"leads outside {root}" in hits[0], hits[0]
    assert lines[-1] == f"coca: error: {len(offenders)} image paths in the annotations lead outside {root}, left out"


def tar_members(folder: Path) -> list[bytes]:
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return out


def test_official_captions_cannot_name_files_outside_the_root(tmp_path, secret, capsys):
    root = make_coco(tmp_path / "coco", "2014")
    storage = tmp_path / "storage" / "val2014"  # the user's own layout may link an image folder from elsewhere
    storage.parent.mkdir()
    (root / "val2014").rename(storage)
    (root / "val2014").symlink_to(storage)
    (storage / "sub").mkdir()
    (storage / "linked.jpg").symlink_to(secret)
    (root / "train2014" / "linkdir").symlink_to(secret.parent)
    hostile = {
        "val": {300: "../../outside/secret.jpg", 301: str(secret), 302: "sub/../../../outside/secret.jpg",
                303: "linked.jpg", 304: "COCO_val2014_000000000030.jpg\x00../../outside/secret.jpg"},
        "train": {310: "../../outside/secret.jpg", 311: "linkdir/secret.jpg", 312: str(secret.parent)},
    }
    for split, names in hostile.items():
        data = annotations("2014", split)
        data["images"] += [{"id": i, "file_name": name} for i, name in names.items()]
        data["annotations"] += [{"id": 9000 + i, "image_id": i, "caption": "a secret"} for i in names]
        (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps(data))
    shards = tmp_path / "shards"

    assert run_cli("prepare-coco", "--root", root, "--split-style", "official", "--shards", shards) == 1
    offenders = {i: str(root / f"{split}2014" / name) for split, names in hostile.items() for i, name in names.items()}
    outside_lines(capsys.readouterr().err, root, offenders)
    for split, folder, ids in (("val", "../storage/val2014", [30, 34, 36, 42]), ("train", "train2014", [9, 25])):
        rows = read_tsv(root / f"{split}2014.tsv")
        assert {r["filepath"] for r in rows} == {f"{folder}/{image_name('2014', split, i)}" for i in ids}
        assert "a secret" not in {r["title"] for r in rows}
        members = tar_members(shards / f"{split}2014")
        assert len(members) == len(ids) and secret.read_bytes() not in members
    assert [p.name for p in secret.parent.iterdir()] == ["secret.jpg"]  # nothing written outside either


def test_a_karpathy_file_from_the_network_cannot_name_files_outside_the_root(tmp_path, secret, capsys):
    root = make_coco(tmp_path / "coco", "2014")
    (root / "val2014" / "sub").mkdir()
    (root / "val2014" / "linked.jpg").symlink_to(secret)
    (root / "val2014" / "linkdir").symlink_to(secret.parent)
    (root / "val2014" / "alias.jpg").symlink_to(root / "train2014" / image_name("2014", "train", 9))  # stays inside
    good = image_name("2014", "val", 36)
    hostile = {  # id -> (filepath, filename)
        100: ("../outside", "secret.jpg"), 101: ("val2014", str(secret)), 102: (str(secret.parent), "secret.jpg"),
        103: ("val2014/sub", "../../../outside/secret.jpg"), 104: ("val2014", "linked.jpg"),
        105: ("val2014", "linkdir/secret.jpg"), 106: ("val2014", good + "\x00/../../../outside/secret.jpg"),
    }
    kept = {200: ("val2014", "alias.jpg"), 201: (str(root / "val2014"), good)}  # inside the root, however written
    data = karpathy_file()
    data["images"] += [{"filepath": path, "filename": name, "cocoid": i, "split": "test",
                        "sentences": [{"raw": f"caption {i}"}]} for i, (path, name) in {**hostile, **kept}.items()]
    source = tmp_path / "source"
    source.mkdir()
    (source / "dataset_coco.json").write_text(json.dumps(data))
    with ArchiveServer({"/karpathy/caption_datasets.zip": zip_of(source, ["dataset_coco.json"])}) as server:
        assert run_cli("prepare-coco", "--root", root, "--download", "--base-url", server.url, "--karpathy-url",
                       f"{server.url}/karpathy/caption_datasets.zip", "--shards", tmp_path / "shards") == 1
        assert server.gets("/karpathy/caption_datasets.zip") == [""]  # the rest was there already
    offenders = {i: str(root / path / name) for i, (path, name) in hostile.items()}
    outside_lines(capsys.readouterr().err, root, offenders)
    rows = read_tsv(root / "karpathy_test.tsv")
    assert [r["title"] for r in rows][-2:] == ["caption 200", "caption 201"]
    assert {r["filepath"] for r in rows} == {f"val2014/{image_name('2014', 'val', 42)}", "val2014/alias.jpg",
                                             f"val2014/{good}"}
    members = tar_members(tmp_path / "shards" / "karpathy_test")
    assert len(members) == 3 and secret.read_bytes() not in members
    for split in ("train", "val"):  # the other splits are whole
        assert len(read_tsv(root / f"karpathy_{split}.tsv")) == {"train": 20, "val": 5}[split]


# -- a .part download the server will not continue -------------------------------------------------

def answer_whole_file(data: bytes, start: int):
    return 200, {}, data


def answer_206_from_byte_0(data: bytes, start: int):
    return 206, {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}, data


def answer_from_an_earlier_block(data: bytes, start: int):
    block = start // 100 * 100
    return 206, {"Content-Range": f"bytes {block}-{len(data) - 1}/{len(data)}"}, data[block:]


def answer_206_without_content_range(data: bytes, start: int):
    return 206, {}, data[start:]


class MisrangingServer(LocalServer):
    """Serves files on 127.0.0.1: the whole file when asked for it, and Range requests answered by
    ``answer(data, start) -> (status, headers, body)``, the way some servers and proxies get them wrong."""

    def __init__(self, files: dict[str, bytes], answer):
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                asked = self.headers.get("Range", "")
                server.requests.append((self.path, asked))
                data = files[self.path]
                status, headers, body = answer(data, int(asked[6:].split("-")[0])) if asked else (200, {}, data)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)


@pytest.mark.parametrize("answer, asks_again", [
    (answer_whole_file, False), (answer_206_from_byte_0, False),
    (answer_from_an_earlier_block, True), (answer_206_without_content_range, True),
])
def test_a_partial_download_the_server_will_not_continue_is_started_again(tmp_path, coco_archives, answer,
                                                                           asks_again):
    root = tmp_path / "coco"
    root.mkdir()
    names = {"/annotations/annotations_trainval2014.zip": "annotations_trainval2014.zip",
             "/karpathy/caption_datasets.zip": "caption_datasets.zip", "/zips/val2014.zip": "val2014.zip"}
    garbage = {}
    for n, name in enumerate(names.values()):  # none a multiple of 100 bytes
        garbage[name] = bytes(range(256)) * (n + 1) + b"x" * 100 * n
        (root / f"{name}.part").write_bytes(garbage[name])
    files = {path: data for path, data in coco_archives.items() if path in names}
    with MisrangingServer(files, answer) as server:
        args = ["prepare-coco", "--root", root, "--download", "--base-url", server.url, "--karpathy-url",
                f"{server.url}/karpathy/caption_datasets.zip", "--splits", "val,test", "--keep-archives"]
        assert run_cli(*args) == 0
        for path, name in names.items():
            sent = [asked for p, asked in server.requests if p == path]
            assert sent == [f"bytes={len(garbage[name])}-"] + ([""] if asks_again else [])
            assert (root / name).read_bytes() == files[path]
        assert not list(root.glob("*.part"))
        assert len(read_tsv(root / "karpathy_val.tsv")) == 5 and len(read_tsv(root / "karpathy_test.tsv")) == 5
        server.requests.clear()
        assert run_cli(*args) == 0 and server.requests == []  # done: nothing asked again
