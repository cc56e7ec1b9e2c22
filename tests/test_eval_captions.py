"""`coca eval captions`: scoring existing captions, and captioning + scoring with a model."""

from __future__ import annotations

import json
import math

import pytest

from conftest import one_error_line, run_cli
from test_coco_prepare import CAPTIONS, make_coco, read_tsv

FAST = ["--seq-len", "8", "--min-seq-len", "2", "--num-beams", "2", "--num-beam-groups", "1"]


@pytest.fixture
def refs(tmp_path):
    """Two images with hand-checkable references: dog.jpg has two, cat.jpg one."""
    tsv = tmp_path / "data" / "refs.tsv"
    tsv.parent.mkdir()
    tsv.write_text("filepath\ttitle\nimages/dog.jpg\tA dog runs.\nimages/dog.jpg\tA dog is running.\n"
                   "images/cat.jpg\tA cat sleeps.\n")
    return tsv


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scores_existing_captions_by_hand(refs, tmp_path, capsys):
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"image": "images/dog.jpg", "caption": "a dog runs"},
                                                   {"image": "images/cat.jpg", "caption": "A bird flies."}])
    out = tmp_path / "results.json"
    assert run_cli("eval", "captions", "--data", refs, "--predictions", preds, "--output", out,
                   "--no-java-metrics", "--format", "table") == 0
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    # BLEU-1: 3 + 1 of 6 words match, no brevity penalty; ROUGE-L: 1 and 1/3; CIDEr-D: see
    # test_coco_metrics.test_scores_by_hand
    assert metrics["Bleu_1"] == pytest.approx(4 / 6, abs=1e-6)
    assert metrics["ROUGE_L"] == pytest.approx(2 / 3)
    assert metrics["CIDEr"] == pytest.approx(10 * (3 + 2 / math.sqrt(6) * math.exp(-1 / 72)) / 8 / 2)
    assert metrics["METEOR"] is None and "skipped" in result["unavailable"]["METEOR"]
    assert result["images"] == 2 and result["predictions"] == str(preds)
    dog = result["per_image"][0]
    assert dog["image"].endswith("dog.jpg") and dog["caption"] == "a dog runs"
    assert dog["references"] == ["A dog runs.", "A dog is running."] and dog["scores"]["ROUGE_L"] == 1.0
    table = capsys.readouterr().out
    assert "CIDEr" in table and f"{100 * metrics['CIDEr']:.2f}" in table and "66.67" in table


def test_java_metrics_are_reported(refs, tmp_path, capsys, monkeypatch):
    from coca_cli.tasks import caption_metrics as coco_metrics

    # METEOR's own run is checked against pycocoevalcap in test_coco_metrics; here, the plumbing
    monkeypatch.setattr(coco_metrics, "meteor", lambda gts, res: (0.25, {k: 0.25 for k in gts}))
    monkeypatch.setattr(coco_metrics, "java_metrics_status", lambda: {"METEOR": None, "SPICE": "needs Java (test)"})
    preds = write_jsonl(tmp_path / "p.jsonl", [{"image": "images/dog.jpg", "caption": "a dog"},
                                               {"image": "images/cat.jpg", "caption": "a cat"}])
    out = tmp_path / "r.json"
    assert run_cli("eval", "captions", "--data", refs, "--predictions", preds, "--output", out, "--format", "table") == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["METEOR"] == 0.25 and result["per_image"][1]["scores"]["METEOR"] == 0.25
    assert result["metrics"]["SPICE"] is None and result["unavailable"] == {"SPICE": "needs Java (test)"}
    table = capsys.readouterr().out
    assert "25.00" in table and "SPICE unavailable: needs Java (test)" in table


def test_predictions_from_coca_caption_files_match_by_path_or_name(refs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    csv_file = tmp_path / "captions.csv"  # what `coca caption --output captions.csv` writes
    csv_file.write_text(f'image,caption\n{tmp_path / "data" / "images" / "dog.jpg"},a dog runs\n'
                        'elsewhere/cat.jpg,a cat sleeps\n')
    out = tmp_path / "r.json"
    assert run_cli("eval", "captions", "--data", refs, "--predictions", csv_file, "--output", out,
                   "--no-java-metrics") == 0
    result = json.loads(out.read_text())
    assert [r["caption"] for r in result["per_image"]] == ["a dog runs", "a cat sleeps"]
    txt = tmp_path / "captions.txt"
    txt.write_text("data/images/cat.jpg\ta cat\n")
    assert run_cli("eval", "captions", "--data", refs, "--predictions", txt, "--no-java-metrics") == 1  # dog missing


def test_images_without_captions_and_captions_without_images(refs, tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"image": "images/dog.jpg", "caption": "a dog"},
                                               {"image": "images/horse.jpg", "caption": "a horse"}])
    out = tmp_path / "r.json"
    assert run_cli("eval", "captions", "--data", refs, "--predictions", preds, "--output", out,
                   "--no-java-metrics") == 1
    err = capsys.readouterr().err
    assert "1 captions in" in err and "horse.jpg" in err
    assert err.strip().splitlines()[-1] == f"coca: error: 1 of 2 images in {refs} have no caption in {preds}"
    assert json.loads(out.read_text())["images"] == 1  # the covered image is still scored and written


@pytest.mark.parametrize("content, message", [
    ('{"image": "images/dog.jpg", "caption": "a dog"}\n{"image": "images/cat.jpg", "caption": \n',
     "line 2: not valid JSON"),
    ('{"image": "images/dog.jpg", "caption": "a dog"}\n\n["images/cat.jpg", "a cat"]\n', "line 3: expected a JSON object"),
    ('{"image": "images/dog.jpg", "text": "a dog"}\n', "line 1: expected a JSON object with fields image and caption"),
    ('{"image": "images/dog.jpg", "caption": 5}\n', "line 1: expected an image path and a caption"),
    ('{"image": "a.jpg", "caption": "x"}\n{"image": "a.jpg", "caption": "y"}\n',
     "line 2: a.jpg already has a caption (line 1)"),
    ("", "no captions in"),
])
def test_malformed_predictions_are_one_line(refs, tmp_path, capsys, content, message):
    preds = tmp_path / "preds.jsonl"
    preds.write_text(content)
    assert run_cli("eval", "captions", "--data", refs, "--predictions", preds) == 2
    assert message in one_error_line(capsys)


def test_bad_data_is_one_line(tmp_path, capsys):
    tsv = tmp_path / "refs.tsv"
    tsv.write_text("image\tcaption\na.jpg\ta dog\n")
    preds = write_jsonl(tmp_path / "p.jsonl", [{"image": "a.jpg", "caption": "a dog"}])
    assert run_cli("eval", "captions", "--data", tsv, "--predictions", preds) == 2
    err = one_error_line(capsys)
    assert "no column 'filepath', 'title'" in err and "--img-key" in err
    assert run_cli("eval", "captions", "--data", tsv, "--predictions", preds, "--img-key", "image",
                   "--caption-key", "caption", "--no-java-metrics") == 0
    assert "with one image it is always 0" in capsys.readouterr().err  # CIDEr needs a corpus
    assert run_cli("eval", "captions", "--data", tmp_path / "nope.tsv", "--predictions", preds) == 2
    assert "no such file" in one_error_line(capsys)
    assert run_cli("eval", "captions", "--data", tsv, "--predictions", preds, "--pretrained", "x") == 2
    assert "drop --model/--pretrained" in one_error_line(capsys)


def test_scores_on_a_pipe_are_one_json_line(refs, tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"image": "images/dog.jpg", "caption": "a dog runs"},
                                               {"image": "images/cat.jpg", "caption": "a cat"}])
    assert run_cli("eval", "captions", "--data", refs, "--predictions", preds, "--no-java-metrics") == 0
    line = json.loads(capsys.readouterr().out)
    assert (line["task"], line["images"], line["predictions"]) == ("captioning", 2, str(preds))
    assert line["metrics"]["ROUGE_L"] > 0 and "per_image" not in line


def test_help_has_an_example(capsys):
    assert run_cli("eval", "captions", "--help") == 0
    out = capsys.readouterr().out
    assert "Example: coca eval captions --data" in out


# -- with a model --------------------------------------------------------------------------------

def test_captions_and_scores_a_prepared_coco_split(converted, tmp_path, capsys):
    import torch

    from coca_cli import create_model_and_transforms, decode
    from coca_cli.tasks.caption_metrics import score_captions
    from coca_cli.data.transforms import load_image

    root = make_coco(tmp_path / "coco", "2014")
    assert run_cli("prepare-coco", "--root", root, "--split-style", "official", "--splits", "val") == 0
    tiny = converted("coca_tiny")[1]
    out = tmp_path / "results.json"
    assert run_cli("eval", "captions", "--data", root / "val2014.tsv", "--pretrained", tiny, *FAST,
                   "--batch-size", "3", "--output", out, "--no-java-metrics", "--format", "table") == 0
    result = json.loads(out.read_text())
    assert result["generation"]["num_beams"] == 2 and result["pretrained"] == str(tiny)
    assert result["model"] == "coca_tiny"  # read from the folder's config.json
    # the same captions as the Python API, scored as score_captions scores them
    model, _, transform = create_model_and_transforms(None, pretrained=str(tiny))
    paths = [root / row["filepath"] for row in read_tsv(root / "val2014.tsv")][::5]
    with torch.no_grad():
        tokens = model.generate(torch.stack([transform(load_image(p)) for p in paths]), seq_len=8, min_seq_len=2,
                                num_beams=2, num_beam_groups=1)
    captions = [decode(t) for t in tokens]
    assert [r["caption"] for r in result["per_image"]] == captions
    assert [r["references"] for r in result["per_image"]] == [[" ".join(c.split()) for c in CAPTIONS[i]]
                                                              for i in (30, 34, 36, 42)]
    expected = score_captions({i: r["references"] for i, r in enumerate(result["per_image"])},
                              dict(enumerate(captions)), java=False)["metrics"]
    assert result["metrics"] == pytest.approx(expected)
    assert "Bleu_4" in capsys.readouterr().out


def test_unreadable_images_are_reported_and_the_rest_scored(converted, tmp_path, capsys):
    root = make_coco(tmp_path / "coco", "2014")
    assert run_cli("prepare-coco", "--root", root, "--split-style", "official", "--splits", "val") == 0
    bad = root / read_tsv(root / "val2014.tsv")[0]["filepath"]
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "r.json"
    tiny = converted("coca_tiny")[1]
    capsys.readouterr()
    assert run_cli("eval", "captions", "--data", root / "val2014.tsv", "--pretrained", tiny,
                   *FAST, "--limit", "2", "--output", out, "--no-java-metrics") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"skipped {bad}") and err[-1] == "coca: error: 1 of 2 images could not be captioned"
    assert json.loads(out.read_text())["images"] == 1


@pytest.mark.parametrize("args, message", [
    (["--num-beams", "5", "--num-beam-groups", "3"], "--num-beams (5)"),
    (["--seq-len", "5", "--min-seq-len", "5"], "--seq-len (5) must be larger than --min-seq-len (5)"),
    (["--generation-type", "top_p", "--top-p", "1.5"], "--top-p must be"),
])
def test_invalid_generation_settings_are_one_line(refs, capsys, args, message):
    # rejected before any model is looked for: the weights named here do not exist
    assert run_cli("eval", "captions", "--data", refs, "--pretrained", refs.parent / "missing", *args) == 2
    assert message in one_error_line(capsys)
