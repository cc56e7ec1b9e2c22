"""`coca retrieve`: open_clip's rankings, the reusable image index, the HTML page, bad input."""

import base64
import html
import io
import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image

from conftest import PHOTOS, ROOT, one_error_line, openclip_reference, reference_image_features, reference_text_features, run_cli

QUERIES = ["a cat on a sofa", "a cup of coffee", "a rocket on the launch pad"]
CAPTIONS = ["an astronaut in a white suit", "a tabby cat", "coffee in a cup", "a space rocket", "a man with a camera"]


def search_args(native, *images, query="a cat"):
    return ["retrieve", *(a for image in images for a in ("--images", image)), "--query", query,
            "--top-k", "10", "--json", "--pretrained", native]


def counts(err: str) -> tuple[int, int, int]:
    """(embedded, reused, removed) from the line the command prints on stderr."""
    found = re.search(r"embedded (\d+) new images, reused (\d+), removed (\d+)", err)
    assert found, err
    return tuple(int(n) for n in found.groups())


# -- rankings ----------------------------------------------------------------------------------

def test_text_to_image_rankings_match_open_clip(tiny, photo_dir, tmp_path, capsys):
    ref, native = tiny
    queries = [a for q in QUERIES for a in ("--query", q)]
    assert run_cli("retrieve", "--images", photo_dir, "--index", tmp_path / "index.pt", *queries, "--top-k", "10",
                   "--json", "--pretrained", native, "--batch-size", "2") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    paths = sorted(photo_dir.iterdir())
    scores = reference_text_features(ref, QUERIES) @ reference_image_features(ref, paths).T
    assert [row["query"] for row in rows] == QUERIES
    for row, expected in zip(rows, scores):
        best = expected.sort(descending=True)
        assert [hit["image"] for hit in row["hits"]] == [str(paths[i]) for i in best.indices]
        assert [hit["rank"] for hit in row["hits"]] == [1, 2, 3, 4, 5]
        torch.testing.assert_close(torch.tensor([hit["score"] for hit in row["hits"]]), best.values, rtol=0, atol=1e-5)


def test_image_to_text_rankings_match_open_clip(tiny, photo_dir, tmp_path, capsys):
    ref, native = tiny
    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(CAPTIONS) + "\n\n", encoding="utf-8")
    queries = [PHOTOS[0], photo_dir / "rocket.png"]
    assert run_cli("retrieve", "--texts", texts, "--image", queries[0], "--image", queries[1], "--top-k", "3",
                   "--json", "--pretrained", native) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    scores = reference_image_features(ref, queries) @ reference_text_features(ref, CAPTIONS).T
    assert [row["image"] for row in rows] == [str(q) for q in queries]
    for row, expected in zip(rows, scores):
        best = expected.topk(3)
        assert [hit["text"] for hit in row["hits"]] == [CAPTIONS[i] for i in best.indices]
        torch.testing.assert_close(torch.tensor([hit["score"] for hit in row["hits"]]), best.values, rtol=0, atol=1e-5)


def test_table_output(tiny, photo_dir, tmp_path, capsys):
    assert run_cli("retrieve", "--images", photo_dir, "--index", tmp_path / "i.pt", "--query", "a [red] car",
                   "--top-k", "2", "--pretrained", tiny[1], "--format", "table") == 0
    out = capsys.readouterr().out
    assert out.startswith("a [red] car\n") and "score" in out and "│ 2 │" in out and "│ 3 │" not in out


# -- the index ---------------------------------------------------------------------------------

@pytest.fixture
def collection(photo_dir, tmp_path):
    folder = tmp_path / "collection"
    shutil.copytree(photo_dir, folder)
    return folder


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Another coca_tiny with different random weights, as a native folder."""
    folder = tmp_path_factory.mktemp("other")
    torch.save(openclip_reference("coca_tiny", seed=1).state_dict(), folder / "weights.bin")
    assert run_cli("convert", folder / "weights.bin", "--model", "coca_tiny", "--output", folder / "native") == 0
    return folder / "native"


def test_index_is_reused_and_updated_incrementally(tiny, collection, other_model, capsys):
    native = tiny[1]

    def run(model=native):
        assert run_cli(*search_args(model, collection)) == 0
        captured = capsys.readouterr()
        return counts(captured.err), {hit["image"]: hit["score"] for hit in json.loads(captured.out)["hits"]}

    assert run()[0] == (5, 0, 0)
    index = collection / ".coca-index.pt"
    written = index.stat().st_mtime_ns
    again, first_hits = run()
    assert again == (0, 5, 0)  # the second query embeds nothing...
    assert index.stat().st_mtime_ns == written  # ...and leaves the index file alone

    coffee = collection / "coffee.jpg"
    stat = coffee.stat()
    os.utime(coffee, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))  # touched
    changed, hits = run()
    assert changed == (1, 4, 0) and hits == pytest.approx(first_hits)

    shutil.copy(collection / "astronaut.jpg", collection / "chelsea.jpg")  # replaced by another photo
    changed, hits = run()
    assert changed == (1, 4, 0)
    assert hits[str(collection / "chelsea.jpg")] == pytest.approx(hits[str(collection / "astronaut.jpg")])

    shutil.copy(collection / "rocket.png", collection / "rocket2.png")  # added
    assert run()[0] == (1, 5, 0)

    coffee.unlink()  # deleted
    changed, hits = run()
    assert changed == (0, 5, 1) and str(coffee) not in hits

    assert run(other_model)[0] == (5, 0, 0)  # another model never reuses embeddings
    assert run(other_model)[0] == (0, 5, 0)


def test_index_at_a_chosen_path_for_single_files(tiny, tmp_path, capsys):
    index = tmp_path / "cache" / "photos.idx"
    args = search_args(tiny[1], PHOTOS[0], PHOTOS[2])
    assert run_cli(*args, "--index", index) == 0
    assert counts(capsys.readouterr().err) == (2, 0, 0) and index.is_file()
    assert run_cli(*args, "--index", index) == 0
    assert counts(capsys.readouterr().err) == (0, 2, 0)
    assert run_cli(*args) == 0  # files without --index: nothing stored anywhere
    err = capsys.readouterr().err
    assert counts(err) == (2, 0, 0) and "no index" in err
    assert not (ROOT / "examples" / "images" / ".coca-index.pt").exists()


def test_a_damaged_index_is_rebuilt(tiny, collection, capsys):
    (collection / ".coca-index.pt").write_bytes(b"\x00garbage")
    assert run_cli(*search_args(tiny[1], collection)) == 0
    assert counts(capsys.readouterr().err) == (5, 0, 0)
    assert run_cli(*search_args(tiny[1], collection)) == 0
    assert counts(capsys.readouterr().err) == (0, 5, 0)


def test_index_api(tiny, collection):
    from coca_cli import create_model_and_transforms
    from coca_cli.tasks.embeddings import embed_images, iter_image_features
    from coca_cli.tasks.retrieval import ImageIndex, model_fingerprint

    model, _, transform = create_model_and_transforms(None, pretrained=tiny[1])
    paths = sorted(collection.iterdir())
    index = ImageIndex(collection / "i.pt", model_fingerprint(model))
    for batch in iter_image_features(model, transform, index.stale(paths), batch_size=2):
        index.add(batch)
    index.save()
    reopened = ImageIndex(collection / "i.pt", model_fingerprint(model))
    assert reopened.stale(paths) == [] and reopened.reused == 5
    found = reopened.lookup(paths[1:])
    assert found.paths == paths[1:] and reopened.removed == 1
    torch.testing.assert_close(found.features, embed_images(model, transform, paths[1:]).features)
    assert ImageIndex(collection / "i.pt", "another-model").stale(paths) == paths


# -- HTML --------------------------------------------------------------------------------------

def test_html_page_shows_the_hits_with_escaped_text(tiny, photo_dir, tmp_path, capsys):
    page = tmp_path / "report" / "hits.html"
    query = 'a <script>alert("x")</script> & "cat"'
    assert run_cli("retrieve", "--images", photo_dir, "--index", tmp_path / "i.pt", "--query", query, "--top-k", "3",
                   "--json", "--html", page, "--pretrained", tiny[1]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    text = page.read_text(encoding="utf-8")
    assert "<script>" not in text and html.escape(query) in text
    for hit in hits:
        assert html.escape(hit["image"]) in text and f"{hit['score']:.4f}" in text
    thumbnails = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text)
    assert len(thumbnails) == 3
    assert max(Image.open(io.BytesIO(base64.b64decode(thumbnails[0]))).size) <= 160

    texts = tmp_path / "captions.txt"
    texts.write_text("<b>bold</b> & co\na tabby cat\n", encoding="utf-8")
    assert run_cli("retrieve", "--texts", texts, "--image", PHOTOS[1], "--html", page, "--pretrained", tiny[1]) == 0
    text = page.read_text(encoding="utf-8")
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt; &amp; co" in text and "a tabby cat" in text
    assert len(re.findall("data:image/jpeg;base64,", text)) == 1  # the query image


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ([], "search images with --images"),
    (["--query", "a cat"], "search images with --images"),
    (["--images", "x", "--query", "a", "--image", "y"], "search images with --images"),
    (["--texts", "t.txt", "--image", "y", "--index", "i.pt"], "--index belongs to an --images collection"),
])
def test_usage_errors_are_one_line(tiny, args, message, capsys):
    assert run_cli("retrieve", *args, "--pretrained", tiny[1]) == 2
    assert message in one_error_line(capsys)


def test_missing_and_empty_inputs_are_one_line(tiny, tmp_path, capsys):
    assert run_cli(*search_args(tiny[1], tmp_path / "nope")) == 2
    assert "no such file or directory" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert run_cli(*search_args(tiny[1], tmp_path / "empty")) == 2
    assert "no images found" in one_error_line(capsys)
    (tmp_path / "texts.txt").write_text("\n\n")
    assert run_cli("retrieve", "--texts", tmp_path / "texts.txt", "--image", PHOTOS[0], "--pretrained", tiny[1]) == 2
    assert "is empty" in one_error_line(capsys)


def test_unreadable_images_are_reported_and_the_rest_searched(tiny, collection, capsys):
    (collection / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    for _ in range(2):  # a broken file is tried again next time, never stored
        assert run_cli(*search_args(tiny[1], collection)) == 1
        captured = capsys.readouterr()
        hits = [hit["image"] for hit in json.loads(captured.out)["hits"]]
        assert len(hits) == 5 and str(collection / "broken.jpg") not in hits
        err = captured.err.splitlines()
        assert err[0].startswith(f"skipped {collection / 'broken.jpg'}: ") and "Traceback" not in captured.err
        assert err[-1] == "coca: error: 1 of 6 images could not be read"
    assert counts(captured.err) == (0, 5, 0)

    only_broken = collection / "broken.jpg"
    assert run_cli(*search_args(tiny[1], only_broken)) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "coca: error: none of the 1 images could be read"


# -- output for pipes and files ------------------------------------------------------------------

def test_pipes_get_json_lines_and_files_take_their_format_from_the_suffix(tiny, photo_dir, tmp_path, capsys):
    import csv

    args = ["retrieve", "--images", photo_dir, "--index", tmp_path / "i.pt", "--query", "a cat", "--query", "a cup",
            "--top-k", "3", "--pretrained", tiny[1]]
    assert run_cli(*args) == 0  # stdout is not a terminal: JSON Lines, no table
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["query"] for row in rows] == ["a cat", "a cup"] and all(len(row["hits"]) == 3 for row in rows)
    assert run_cli(*args, "--output", tmp_path / "hits.tsv") == 0
    assert capsys.readouterr().out == ""
    table = list(csv.DictReader((tmp_path / "hits.tsv").read_text().splitlines(), delimiter="\t"))
    assert [(r["query"], int(r["rank"]), r["image"], float(r["score"])) for r in table] == [
        (row["query"], hit["rank"], hit["image"], hit["score"]) for row in rows for hit in row["hits"]]
    assert run_cli(*args, "--output", tmp_path / "hits.html") == 2
    assert "unsupported output file type '.html'" in one_error_line(capsys)


def test_texts_for_images_as_csv(tiny, tmp_path, capsys):
    import csv

    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    assert run_cli("retrieve", "--texts", texts, "--image", PHOTOS[0], "--top-k", "2", "--format", "csv",
                   "--pretrained", tiny[1]) == 0
    table = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert table[0] == ["image", "rank", "text", "score"] and [r[:2] for r in table[1:]] == [[str(PHOTOS[0]), "1"],
                                                                                             [str(PHOTOS[0]), "2"]]
