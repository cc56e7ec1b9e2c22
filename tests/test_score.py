"""`coca score` on real photos (the examples and scikit-image's) with a converted random-weight
coca_tiny: the scores are open_clip's cosine similarities, tables and shards are written back
whole and filtered right, and bad input is one line."""

import csv
import io
import json
import tarfile

import pytest
import torch

from conftest import one_error_line, reference_image_features, reference_text_features, run_cli

CAPTIONS = {"astronaut.jpg": "an astronaut in front of a flag", "chelsea.jpg": 'a cat, "Chelsea", looking up',
            "coffee.jpg": "a cup of coffee", "rocket.png": "a rocket on the launch pad",
            "camera.png": "a man with a camera"}


@pytest.fixture(scope="module")
def native(tiny):
    return str(tiny[1])


@pytest.fixture(scope="module")
def reference(tiny, photo_dir):
    """{image name: open_clip's cosine of the photo with its caption}."""
    paths = [photo_dir / name for name in CAPTIONS]
    cosines = (reference_image_features(tiny[0], paths) * reference_text_features(tiny[0], CAPTIONS.values())).sum(-1)
    return dict(zip(CAPTIONS, cosines.tolist()))


def write_table(path, photo_dir, separator=","):
    """A table with a column before and after the two it is scored on; image paths relative to it."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f, delimiter=separator)
        rows.writerow(["id", "filepath", "title", "source"])
        for i, (name, caption) in enumerate(CAPTIONS.items()):
            rows.writerow([i, f"{photo_dir.name}/{name}", caption, "skimage" if name.endswith(".png") else "examples"])
    return path


def read_table(path, separator=","):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=separator))


@pytest.fixture
def pairs(photo_dir):
    return write_table(photo_dir.parent / "pairs.csv", photo_dir)


def test_a_table_gets_open_clips_cosine_as_a_last_column(native, pairs, reference, tmp_path, capsys):
    out = tmp_path / "scored.csv"
    assert run_cli("score", pairs, "--output", out, "--pretrained", native) == 0
    assert capsys.readouterr().err.strip() == f"scored 5 pairs: wrote {out}"
    rows = read_table(out)
    original = read_table(pairs)
    assert rows[0] == original[0] + ["clip_score"]
    assert [row[:-1] for row in rows[1:]] == original[1:]  # every field as it was, in order
    scores = {row[1].split("/")[-1]: float(row[-1]) for row in rows[1:]}
    torch.testing.assert_close(torch.tensor([scores[n] for n in CAPTIONS]), torch.tensor(list(reference.values())),
                               rtol=0, atol=1e-5)


def test_a_tsv_with_its_own_separator_and_columns_comes_back_as_the_output_names_it(native, photo_dir, reference,
                                                                                 tmp_path):
    table = tmp_path / "pairs.tsv"
    with open(table, "w", newline="") as f:
        rows = csv.writer(f, delimiter=";")
        rows.writerow(["image", "text"])
        rows.writerows([str(photo_dir / name), caption] for name, caption in CAPTIONS.items())
    out = tmp_path / "scored.tsv"
    assert run_cli("score", "--pretrained", native, table, "--output", out, "--separator", ";", "--img-key", "image",
                   "--caption-key", "text", "--column", "similarity") == 0
    rows = read_table(out, "\t")
    assert rows[0] == ["image", "text", "similarity"] and len(rows) == 6
    for row in rows[1:]:
        assert float(row[2]) == pytest.approx(reference[row[0].split("/")[-1]], abs=1e-5)


@pytest.mark.parametrize("rule", [["--top-fraction", "0.4"], ["--min-score", "MEDIAN"]])
def test_filters_keep_the_best_rows(native, pairs, reference, tmp_path, capsys, rule):
    ranked = sorted(reference, key=reference.get, reverse=True)
    median = reference[ranked[2]]
    rule = [value.replace("MEDIAN", repr(median - 1e-6)) for value in rule]
    out = tmp_path / "best.csv"
    assert run_cli("score", pairs, "--output", out, "--pretrained", native, *rule) == 0
    kept = [row[1].split("/")[-1] for row in read_table(out)[1:]]
    expected = ranked[:2] if rule[0] == "--top-fraction" else ranked[:3]
    assert sorted(kept) == sorted(expected)
    assert kept == [name for name in CAPTIONS if name in expected]  # in the table's order
    assert capsys.readouterr().err.startswith(f"kept {len(expected)} of 5 scored pairs (")


def test_an_unreadable_image_is_reported_and_its_row_kept_unscored(native, pairs, photo_dir, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((photo_dir / "coffee.jpg").read_bytes()[:300])
    with open(pairs, "a", newline="") as f:
        csv.writer(f).writerow([9, broken, "a broken cup", "examples"])
    out, best = tmp_path / "scored.csv", tmp_path / "best.csv"
    assert run_cli("score", pairs, "--output", out, "--pretrained", native) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"skipped {broken} ({pairs}, line 7): ")
    assert err[-1] == "coca: error: 1 of 6 pairs could not be scored"
    rows = read_table(out)
    assert len(rows) == 7 and rows[-1][-1] == "" and all(rows[i][-1] for i in range(1, 6))
    assert run_cli("score", pairs, "--output", best, "--pretrained", native, "--min-score", "-1") == 1
    assert len(read_table(best)) == 6  # every pair with a score, not the one without


# -- shards --------------------------------------------------------------------------------------

def write_shards(folder, photo_dir):
    """Two shards in webdataset's layout: each photo with a .txt caption (or a .json one) and a
    .cls file, plus a sample with no caption; and their sizes.json."""
    import webdataset as wds

    folder.mkdir()
    names = list(CAPTIONS)
    for i, part in enumerate([names[:3], names[3:]]):
        with wds.TarWriter(str(folder / f"{i:05d}.tar")) as sink:
            for name in part:
                sample = {"__key__": name.split(".")[0], name.split(".")[1]: (photo_dir / name).read_bytes(),
                          "cls": b"7"}
                if name == "coffee.jpg":
                    sample["json"] = json.dumps({"caption": CAPTIONS[name], "url": "http://example.com/c.jpg"})
                else:
                    sample["txt"] = CAPTIONS[name]
                sink.write(sample)
            if i == 1:
                sink.write({"__key__": "uncaptioned", "jpg": (photo_dir / "chelsea.jpg").read_bytes()})
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 3, "00001.tar": 3}))
    return folder


def members(shard):
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_shards_get_scores_then_filtered_shards_with_the_samples_as_they_were(native, photo_dir, reference,
                                                                              tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", photo_dir)
    out = tmp_path / "scored"
    assert run_cli("score", shards, "--output", out, "--pretrained", native) == 0
    assert capsys.readouterr().err.splitlines() == ["00000.tar: 3 scored", "00001.tar: 2 scored, skipped 1 no caption"]
    assert sorted(p.name for p in out.iterdir()) == ["00000.jsonl", "00001.jsonl"]
    scores = {row["key"]: row["score"] for name in ("00000.jsonl", "00001.jsonl")
              for row in map(json.loads, (out / name).read_text().splitlines())}
    assert scores == pytest.approx({name.split(".")[0]: value for name, value in reference.items()}, abs=1e-5)

    # a second run reuses the scores (no model is loaded: --pretrained names none) and filters
    assert run_cli("score", shards, "--output", out, "--pretrained", tmp_path / "absent", "--top-fraction", "0.6") == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["2 of 2 shards were already scored in " + str(out),
                   f"kept 3 of 5 scored pairs (the top 0.6): wrote 2 shards to {out}"]
    best = set(sorted(scores, key=scores.get, reverse=True)[:3])
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {name: sum(key in best for key in keys) for name, keys in
                     [("00000.tar", ["astronaut", "chelsea", "coffee"]), ("00001.tar", ["rocket", "camera"])]}
    for name in sizes:
        kept = members(out / name)
        assert kept == [(member, data) for member, data in members(shards / name) if member.split(".")[0] in best]
    # the filtered shards read back as coca's (and open_clip's) training data
    from coca_cli.data.shards import resolve_shards, shard_sizes, tar_samples

    assert shard_sizes(resolve_shards(str(out))) == 3
    assert sorted(s["__key__"] for shard in resolve_shards(str(out)) for s in tar_samples(shard)) == sorted(best)


def test_a_broken_shard_gets_no_scores_and_no_filtered_shards_are_written(native, photo_dir, tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", photo_dir)
    data = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(data[:len(data) // 2])
    out = tmp_path / "scored"
    assert run_cli("score", shards, "--output", out, "--pretrained", native, "--min-score", "0") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "00000.tar: 3 scored" and "00001.tar is cut short or damaged" in err[1]
    assert err[-1] == ("coca: error: 1 of 2 shards could not be read whole; run again to retry them "
                       "(no filtered shards were written)")
    assert sorted(p.name for p in out.iterdir()) == ["00000.jsonl"]


def test_two_processes_score_the_shards_and_the_launcher_filters_once(native, photo_dir, tmp_path, capfd,
                                                                     monkeypatch):
    """--gpus 2 (torchrun, CPU here): each process scores every second shard, then the launching
    process filters once, over all the scores: the files one process writes. Under a launcher that
    started the processes itself, a filter (which needs every shard's scores) is refused."""
    shards = write_shards(tmp_path / "shards", photo_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--pretrained", native, "--top-fraction", "0.6", "--device", "cpu"]
    assert run_cli("score", shards, "--output", one, *common) == 0
    capfd.readouterr()
    assert run_cli("score", shards, "--output", two, *common, "--gpus", "2") == 0
    err = capfd.readouterr().err.splitlines()
    assert sorted(line for line in err if line.endswith("scored") or "skipped" in line) == [
        "00000.tar: 3 scored", "00001.tar: 2 scored, skipped 1 no caption"]
    assert err[-1] == f"kept 3 of 5 scored pairs (the top 0.6): wrote 2 shards to {two}"
    for name in ("00000.jsonl", "00001.jsonl"):
        a, b = ([json.loads(line) for line in (out / name).read_text().splitlines()] for out in (one, two))
        assert [r["key"] for r in a] == [r["key"] for r in b]
        assert [r["score"] for r in b] == pytest.approx([r["score"] for r in a], abs=1e-6)
    assert json.loads((two / "sizes.json").read_text()) == json.loads((one / "sizes.json").read_text())
    for name in ("00000.tar", "00001.tar"):
        assert members(two / name) == members(one / name)

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert run_cli("score", shards, "--output", tmp_path / "three", *common) == 2
    assert "a filter needs the scores of every shard" in capfd.readouterr().err
    assert not (tmp_path / "three").exists()


def test_processes_that_fail_end_with_their_own_line_and_exit_code(tmp_path):
    """coca's torchrun (train.torchrun, which every --gpus relaunch runs): torchrun itself followed
    the processes' one-line errors with its traceback and failure report, and exited 1 whatever
    they exited with."""
    import subprocess
    import sys

    from conftest import subprocess_env

    result = subprocess.run([sys.executable, "-m", "coca_cli.train.torchrun", "--nproc_per_node", "2", "--standalone",
                             "-m", "coca_cli", "score", "missing/", "--output", "out", "--device", "cpu"],
                            capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=600)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["coca: error: no such file or folder of shards: missing/"] * 2


def test_weights_that_cannot_be_loaded_fail_once_before_processes_start(photo_dir, tmp_path, capfd):
    """Checked (and downloaded) once by the launching process, not in every one (prefetch); so is
    score's output folder."""
    shards = write_shards(tmp_path / "shards", photo_dir)
    for command in (["score", shards], ["caption", "--data", shards], ["embed", shards]):
        assert run_cli(*command, "--output", tmp_path / "out", "--pretrained", tmp_path / "absent", "--gpus", "2",
                       "--device", "cpu") == 2
        assert capfd.readouterr().err.splitlines() == [
            f"coca: error: pretrained weights '{tmp_path / 'absent'}' not found: no such file or published tag"]
    assert run_cli("score", shards, "--output", photo_dir, "--pretrained", tmp_path / "absent", "--gpus", "2") == 2
    [line] = capfd.readouterr().err.splitlines()
    assert "holds files coca did not write" in line


def test_a_table_is_scored_by_one_process(native, pairs, tmp_path, capsys):
    assert run_cli("score", pairs, "--output", tmp_path / "s.csv", "--pretrained", native, "--gpus", "2") == 2
    assert "--gpus splits shards over processes; a table is scored by one" in one_error_line(capsys)


# -- bad input: one line, exit 2, nothing replaced -----------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--min-score", "0.2", "--top-fraction", "0.5"], "give --min-score or --top-fraction, not both"),
    (["--top-fraction", "0"], "--top-fraction must be in (0, 1], not 0.0"),
    (["--top-fraction", "1.5"], "--top-fraction must be in (0, 1], not 1.5"),
    (["--min-score", "nan"], "--min-score must be a finite number, not nan"),
    (["--img-key", "path"], "has no column 'path' (columns: id, filepath, title, source); choose them with "
                            "--img-key and --caption-key"),
    (["--column", "source"], "already has a column 'source': name the scores' column with --column"),
])
def test_bad_options_are_one_line(native, pairs, tmp_path, capsys, args, message):
    assert run_cli("score", pairs, "--output", tmp_path / "s.csv", "--pretrained", native, *args) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "s.csv").exists()


def test_files_that_are_not_coca_s_are_never_replaced(native, pairs, photo_dir, tmp_path, capsys):
    notes = tmp_path / "notes.csv"
    notes.write_text("name,phone\nada,123\n")
    assert run_cli("score", pairs, "--output", notes, "--pretrained", native) == 2
    assert "exists and is not a table coca scored" in one_error_line(capsys)
    assert notes.read_text() == "name,phone\nada,123\n"
    assert run_cli("score", pairs, "--output", tmp_path / "s.json", "--pretrained", native) == 2
    assert "a scored table is written as .csv or .tsv" in one_error_line(capsys)

    shards = write_shards(tmp_path / "shards", photo_dir)
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    assert run_cli("score", shards, "--output", shards, "--pretrained", native, "--top-fraction", "0.5") == 2
    assert "holds the input shards (00000.tar)" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    assert run_cli("score", shards, "--output", photo_dir, "--pretrained", native) == 2
    assert "holds files coca did not write" in one_error_line(capsys)


@pytest.mark.parametrize("data, message", [("missing.csv", "no such file: missing.csv"),
                                           ("missing/", "no such file or folder of shards: missing/")])
def test_missing_data_is_one_line(native, tmp_path, capsys, monkeypatch, data, message):
    monkeypatch.chdir(tmp_path)
    assert run_cli("score", data, "--output", tmp_path / "out.csv", "--pretrained", native) == 2
    assert message in one_error_line(capsys)
