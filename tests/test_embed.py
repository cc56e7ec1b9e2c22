"""`coca embed` on real photos (the examples and scikit-image's) with a converted random-weight
coca_tiny: the files are clip-retrieval's layout, the rows are the vectors `embed_images` and
`embed_texts` give, a stopped run finishes as if it never stopped, two processes write what one
does, and bad input is one line."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import one_error_line, reference_image_features, run_cli, subprocess_env
from test_score import CAPTIONS, write_shards, write_table


@pytest.fixture(scope="module")
def native(tiny):
    return str(tiny[1])


@pytest.fixture(scope="module")
def loaded(native):
    """(model, transform, tokenizer) as the command loads them."""
    from coca_cli.cli.classify import load_contrastive

    return load_contrastive(None, native, "cpu", "fp32")


def expected_images(loaded, paths) -> torch.Tensor:
    from coca_cli.tasks.embeddings import embed_images

    net, transform, _ = loaded
    return embed_images(net, transform, paths).features


def expected_texts(loaded, texts) -> torch.Tensor:
    from coca_cli.tasks.embeddings import embed_texts

    net, _, tokenizer = loaded
    return embed_texts(net, tokenizer, list(texts))


def files(folder) -> dict:
    """{path inside ``folder``: bytes} of every file in it."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_metadata(folder) -> list[dict]:
    """Every metadata row, parts in name order, as clip-retrieval's back end concatenates them."""
    return [row for part in sorted((folder / "metadata").iterdir()) for row in read_metadata_part(part) or []]


def assert_aligned(folder) -> None:
    """What embedding-reader (autofaiss's reader) relies on: the sorted .npy parts of each kind
    and the sorted metadata parts pair up one to one, with as many rows each, none empty."""
    metadata = [len(rows) for rows in map(read_metadata_part, sorted((folder / "metadata").glob("metadata_*.*")))
                if rows is not None]
    for kind in ("img_emb", "text_emb"):
        if (folder / kind).exists():
            assert [len(np.load(part)) for part in sorted((folder / kind).glob("*.npy"))] == metadata
    assert metadata and all(metadata)


def read_metadata_part(part):
    """A metadata part's rows; None for an empty part's marker."""
    if part.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(part).to_pylist()
    return [json.loads(line) for line in part.read_text().splitlines()] if part.suffix == ".jsonl" else None


def read_embeddings(folder, kind="img_emb") -> np.ndarray:
    """Every part's rows in name order, as autofaiss's embedding reader takes them."""
    return np.concatenate([np.load(part) for part in sorted((folder / kind).glob("*.npy"))])


def test_a_folder_of_photos_becomes_clip_retrievals_layout(native, tiny, loaded, photo_dir, tmp_path, capsys):
    out = tmp_path / "embeddings"
    assert run_cli("embed", photo_dir, "--output", out, "--pretrained", native) == 0
    assert capsys.readouterr().err.strip() == f"embedded 5 rows into 1 parts: wrote {out}"
    assert sorted(files(out)) == ["coca-embed.json", "img_emb/img_emb_0.npy", "metadata/metadata_0.parquet"]
    vectors = np.load(out / "img_emb" / "img_emb_0.npy")
    assert vectors.dtype == np.float16
    paths = sorted(photo_dir.iterdir())
    assert [row["image_path"] for row in read_metadata(out)] == [str(p) for p in paths]
    torch.testing.assert_close(torch.from_numpy(vectors).float(), expected_images(loaded, paths), rtol=0, atol=1e-3)
    torch.testing.assert_close(torch.from_numpy(vectors).float(), reference_image_features(tiny[0], paths), rtol=0,
                               atol=1e-3)  # open_clip's own
    assert_aligned(out)
    manifest = json.loads((out / "coca-embed.json").read_text())
    assert manifest["finished"] == [0] and manifest["dtype"] == "float16" and set(manifest["model"]) == {"image"}

    same_photos = f"{photo_dir}/../{photo_dir.name}"  # spelled another way
    assert run_cli("embed", same_photos, "--output", out, "--pretrained", native) == 0
    assert capsys.readouterr().err.strip() == f"all 1 parts are already embedded in {out}"


def test_a_table_in_many_parts_both_modalities(native, loaded, photo_dir, tmp_path, capsys):
    """11 rows in parts of 1: part numbers padded to two digits, as clip-retrieval pads them, so
    that name order is part order; each image row with its caption's embedding on the same row."""
    table = write_table(photo_dir.parent / "eleven.csv", photo_dir)
    with open(table, "a") as f:
        f.writelines(f"{5 + i},{photo_dir.name}/astronaut.jpg,an astronaut number {i},examples\n" for i in range(6))
    out = tmp_path / "embeddings"
    assert run_cli("embed", table, "--output", out, "--pretrained", native, "--modality", "both", "--part-size", "1",
                   "--dtype", "float32", "--metadata-format", "jsonl") == 0
    assert capsys.readouterr().err.strip() == f"embedded 11 rows into 11 parts: wrote {out}"
    numbers = [f"{i:02d}" for i in range(11)]
    assert sorted(files(out)) == sorted(["coca-embed.json"] + [f"img_emb/img_emb_{n}.npy" for n in numbers]
                                        + [f"text_emb/text_emb_{n}.npy" for n in numbers]
                                        + [f"metadata/metadata_{n}.jsonl" for n in numbers])
    assert_aligned(out)
    rows = read_metadata(out)
    captions = list(CAPTIONS.values()) + [f"an astronaut number {i}" for i in range(6)]
    assert [row["caption"] for row in rows] == captions
    images = [photo_dir / name for name in CAPTIONS] + [photo_dir / "astronaut.jpg"] * 6
    assert [row["image_path"] for row in rows] == [str(p) for p in images]
    image_rows, text_rows = read_embeddings(out), read_embeddings(out, "text_emb")
    assert image_rows.dtype == text_rows.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(image_rows), expected_images(loaded, images), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(text_rows), expected_texts(loaded, captions), rtol=0, atol=1e-5)


def test_shards_one_part_each_with_keys_and_urls(native, loaded, photo_dir, tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", photo_dir)
    out = tmp_path / "embeddings"
    assert run_cli("embed", shards, "--output", out, "--pretrained", native, "--modality", "both") == 0
    assert capsys.readouterr().err.splitlines() == ["00000.tar: 3 embedded", "00001.tar: 2 embedded, skipped 1 no caption",
                                                    f"embedded 5 rows into 2 parts: wrote {out}"]
    assert sorted(files(out)) == ["coca-embed.json", "img_emb/img_emb_0.npy", "img_emb/img_emb_1.npy",
                                  "metadata/metadata_0.parquet", "metadata/metadata_1.parquet",
                                  "text_emb/text_emb_0.npy", "text_emb/text_emb_1.npy"]
    assert_aligned(out)
    rows = read_metadata(out)
    keys = [name.split(".")[0] for name in CAPTIONS]
    assert [row["key"] for row in rows] == [row["image_path"] for row in rows] == keys
    assert [row["caption"] for row in rows] == list(CAPTIONS.values())
    assert [row["url"] for row in rows] == [None, None, "http://example.com/c.jpg", None, None]
    torch.testing.assert_close(torch.from_numpy(read_embeddings(out)).float(),
                               expected_images(loaded, [photo_dir / name for name in CAPTIONS]), rtol=0, atol=1e-3)
    torch.testing.assert_close(torch.from_numpy(read_embeddings(out, "text_emb")).float(),
                               expected_texts(loaded, CAPTIONS.values()), rtol=0, atol=1e-3)


def test_a_broken_shard_gets_no_part_and_is_embedded_when_run_again(native, photo_dir, tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", photo_dir)
    whole = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(whole[:len(whole) // 2])
    out = tmp_path / "embeddings"
    assert run_cli("embed", shards, "--output", out, "--pretrained", native) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "00000.tar: 3 embedded" and "00001.tar is cut short or damaged" in err[1]
    assert err[-1] == "coca: error: 1 of 2 shards could not be read whole; run again to retry them"
    assert sorted(files(out)) == ["coca-embed.json", "img_emb/img_emb_0.npy", "metadata/metadata_0.parquet"]
    (shards / "00001.tar").write_bytes(whole)
    assert run_cli("embed", shards, "--output", out, "--pretrained", native) == 0
    assert capsys.readouterr().err.splitlines() == ["00001.tar: 3 embedded",  # image only: a caption is not needed
                                                    f"embedded 3 rows into 1 parts (1 of 2 were done before): "
                                                    f"wrote {out}"]
    assert [row["key"] for row in read_metadata(out)] == [name.split(".")[0] for name in CAPTIONS] + ["uncaptioned"]
    assert read_metadata(out)[-1]["caption"] is None


def test_without_pyarrow_the_metadata_is_json_lines(native, photo_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    assert run_cli("embed", photo_dir, "--output", tmp_path / "a", "--pretrained", native,
                   "--metadata-format", "parquet") == 2
    assert "--metadata-format parquet needs pyarrow: pip install 'coca-cli[parquet]'" in one_error_line(capsys)
    assert not (tmp_path / "a").exists()
    assert run_cli("embed", photo_dir, "--output", tmp_path / "b", "--pretrained", native) == 0
    assert sorted(files(tmp_path / "b"))[1:] == ["img_emb/img_emb_0.npy", "metadata/metadata_0.jsonl"]
    assert len(read_metadata(tmp_path / "b")) == 5


def test_an_unreadable_image_is_reported_and_every_other_row_written(native, photo_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(photo_dir, photos)
    broken = photos / "broken.jpg"
    broken.write_bytes((photo_dir / "coffee.jpg").read_bytes()[:300])
    out = tmp_path / "embeddings"
    assert run_cli("embed", photos, "--output", out, "--pretrained", native, "--part-size", "4") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"skipped {broken}: ")
    assert err[1:] == [f"embedded 5 rows into 2 parts: wrote {out}", "coca: error: 1 of 6 images could not be embedded"]
    assert [row["image_path"] for row in read_metadata(out)] == [str(p) for p in sorted(photos.iterdir()) if p != broken]
    assert [len(np.load(part)) for part in sorted((out / "img_emb").iterdir())] == [3, 2]
    assert_aligned(out)


def test_a_part_without_a_readable_image_leaves_only_its_marker(native, photo_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg"):
        shutil.copy(photo_dir / name, photos)
    (photos / "broken.jpg").write_bytes(b"not an image")  # alone in part 1 (sorted: astronaut, broken, coffee)
    out = tmp_path / "embeddings"
    assert run_cli("embed", photos, "--output", out, "--pretrained", native, "--part-size", "1") == 1
    assert capsys.readouterr().err.splitlines()[-1] == "coca: error: 1 of 3 images could not be embedded"
    assert sorted(files(out)) == ["coca-embed.json", "img_emb/img_emb_0.npy", "img_emb/img_emb_2.npy",
                                  "metadata/metadata_0.parquet", "metadata/metadata_1.empty",
                                  "metadata/metadata_2.parquet"]
    assert_aligned(out)
    assert json.loads((out / "coca-embed.json").read_text())["finished"] == [0, 1, 2]
    assert run_cli("embed", photos, "--output", out, "--pretrained", native, "--part-size", "1") == 0
    assert capsys.readouterr().err.strip() == f"all 3 parts are already embedded in {out}"


def test_a_run_stopped_after_a_part_finishes_the_rest_as_if_never_stopped(native, photo_dir, tmp_path, capsys,
                                                                           monkeypatch):
    from coca_cli.tasks import embedding_export

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = ["--pretrained", native, "--part-size", "2", "--metadata-format", "jsonl"]
    assert run_cli("embed", photo_dir, "--output", whole, *args) == 0
    write_metadata = embedding_export._write_metadata
    calls = []

    def stopped_on_the_second_part(path, *rest):
        calls.append(path)
        if len(calls) == 2:  # part 1's embeddings are written, its metadata is not
            raise KeyboardInterrupt
        write_metadata(path, *rest)

    monkeypatch.setattr(embedding_export, "_write_metadata", stopped_on_the_second_part)
    assert run_cli("embed", photo_dir, "--output", resumed, *args) == 130
    assert "coca: error: interrupted" in capsys.readouterr().err
    assert sorted(files(resumed)) == ["coca-embed.json", "img_emb/img_emb_0.npy", "img_emb/img_emb_1.npy",
                                      "metadata/metadata_0.jsonl"]  # no temporary file left, no half part
    first = (resumed / "img_emb" / "img_emb_0.npy").stat()
    monkeypatch.setattr(embedding_export, "_write_metadata", write_metadata)
    assert run_cli("embed", photo_dir, "--output", resumed, *args) == 0
    assert capsys.readouterr().err.strip() == f"embedded 3 rows into 2 parts (1 of 3 were done before): wrote {resumed}"
    assert (resumed / "img_emb" / "img_emb_0.npy").stat().st_mtime_ns == first.st_mtime_ns  # not embedded again
    assert files(resumed) == files(whole)
    assert json.loads((resumed / "coca-embed.json").read_text())["finished"] == [0, 1, 2]


def test_two_processes_write_what_one_writes(native, photo_dir, tmp_path):
    table = write_table(photo_dir.parent / "pairs.csv", photo_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["embed", str(table), "--pretrained", native, "--modality", "both", "--part-size", "2", "--device", "cpu"]
    assert run_cli(*args, "--output", one) == 0
    result = subprocess.run([sys.executable, "-m", "coca_cli", *args, "--output", str(two), "--gpus", "2"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=1800, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"embedded 5 rows into 3 parts: wrote {two}" in result.stderr
    assert len(files(two)) == 10 and files(two) == files(one)


# -- bad input: one line, exit 2, nothing written or replaced -------------------------------------

@pytest.fixture
def earlier(native, photo_dir, tmp_path):
    """An output folder that a run of photo_dir wrote."""
    out = tmp_path / "embeddings"
    assert run_cli("embed", photo_dir, "--output", out, "--pretrained", native, "--part-size", "3") == 0
    return out


def other_model(native, folder):
    """The tiny model with one image-tower weight changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(native, folder)
    weights = load_file(folder / "model.safetensors")
    name = next(name for name in weights if name.startswith("visual."))
    weights[name] = weights[name] + 0.01
    save_file(weights, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("args, message", [
    (["--pretrained", "OTHER"], "holds the embeddings of another model: finish them with the same --model"),
    (["--dtype", "float32"], "holds the embeddings of other settings (dtype float16 there, float32 now)"),
    (["--part-size", "2"], "holds the embeddings of other settings (part_size 3 there, 2 now)"),
    (["--metadata-format", "jsonl"], "other settings (metadata_format parquet there, jsonl now)"),
    (["--modality", "text"], "--modality text needs captions, and image files have none"),
    (["--dtype", "float64"], "Invalid value for '--dtype'"),
])
def test_another_run_into_the_same_folder_is_refused(native, photo_dir, earlier, tmp_path, capsys, args, message):
    args = [str(other_model(native, tmp_path / "other")) if arg == "OTHER" else arg for arg in args]
    before = files(earlier)
    pretrained = [] if "--pretrained" in args else ["--pretrained", native]
    assert run_cli("embed", photo_dir, "--output", earlier, "--part-size", "3", *pretrained, *args) == 2
    assert message in one_error_line(capsys)
    assert files(earlier) == before


def test_other_inputs_and_folders_coca_did_not_write_are_refused(native, photo_dir, earlier, tmp_path, capsys):
    before = files(earlier)
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    shutil.copy(photo_dir / "rocket.png", fewer)
    assert run_cli("embed", fewer, "--output", earlier, "--pretrained", native, "--part-size", "3") == 2
    assert "holds the embeddings of other inputs: give the same inputs and settings" in one_error_line(capsys)
    assert files(earlier) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert run_cli("embed", photo_dir, "--output", notes, "--pretrained", native) == 2
    assert "holds files coca did not write (todo.txt)" in one_error_line(capsys)
    assert files(notes) == {"todo.txt": b"mine"}
    (earlier / "stats").mkdir()
    assert run_cli("embed", photo_dir, "--output", earlier, "--pretrained", native, "--part-size", "3") == 2
    assert "holds files coca did not write (stats)" in one_error_line(capsys)


@pytest.mark.parametrize("inputs, args, message", [
    (["SHARDS"], ["--part-size", "10"], "--part-size is for image files and tables"),
    (["SHARDS", "PHOTOS"], [], "not several kinds at once"),
    (["TABLE"], ["--modality", "text", "--caption-key", "text"], "has no column 'text'"),
])
def test_inputs_that_do_not_fit_are_one_line(native, photo_dir, tmp_path, capsys, inputs, args, message):
    shards = write_shards(tmp_path / "shards", photo_dir)
    table = write_table(tmp_path / "pairs.csv", photo_dir)
    named = {"SHARDS": shards, "PHOTOS": photo_dir, "TABLE": table}
    assert run_cli("embed", *[named[i] for i in inputs], "--output", tmp_path / "out", "--pretrained", native,
                   *args) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
